"""Sharded data: webdataset-style tar shards (``train-{000000..000127}.tar``, local or anything fsspec opens),
streamed in order and never held whole in memory.

Why not webdataset's own reader: its pipeline cannot skip to a batch mid-epoch without reading what comes before,
and its order depends on how shards fall to processes and workers. We keep webdataset's format, brace notation
(``braceexpand``) and writer (:func:`write_shards`), and read with one index of the shards' members instead.

The index (one pass over the tar headers when a shard is first opened: key, image member offset and size, label
from the ``.cls`` member; kept under ``~/.cache/mimkit/shard-index``, keyed by each shard's version) gives:

* ``ShardSource``, an :class:`~mimkit.data.source.ImageSource` with random access (seek + read), for what reads a
  few images or reads in order: the held-out split, feature extraction, the sample check, figures;
* ``ShardLoader``, the training loader. Epoch ``e`` permutes the shards (seeded by seed and e); the samples in that
  order form one stream, cut into ``streams`` contiguous, equal parts. Each stream is read front to back (seek +
  read, so only forward) and shuffled locally through a buffer of ``shuffle_buffer`` images (seeded by seed, e and
  the stream). A global batch is the concatenation of every stream's sub-batch, in stream order; rank r reads the
  streams ``[r * L, (r + 1) * L)`` (L streams per process, spread over its worker processes) and its slice of the
  global batch is their sub-batches. So every image is read by one process, once per epoch; the order depends on
  the seed and the number of streams only (``streams = processes x streams per process``): two processes with one
  stream each give the same global batches as one process with two. Resuming at batch k skips the images of the
  first k batches without reading them (their positions are known), so a resumed epoch is bit-identical.
  Augmentation is seeded per image by (seed, epoch, image index), as on the folder path.
"""
import hashlib
import json
import logging
import os
import re
import tarfile
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import BadImage, DataError
from ..files import write_json
from .decode import decode_image
from .loader import mix_seed, resolve_workers, seeded_rng
from .source import IMG_EXTENSIONS, ImageSource, name_sort_key, register_source
from .transforms import build_transform
from .source import open_images

log = logging.getLogger(__name__)
SHUFFLE_BUFFER = 1000  # images held per stream for the local shuffle (webdataset's usual size)
INDEX_CACHE = "~/.cache/mimkit/shard-index"  # MIMKIT_SHARD_INDEX_CACHE overrides; '' there turns it off
_IMG_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)


def is_shard_spec(path) -> bool:
    """A brace pattern (``x-{000..009}.tar``) or a URL fsspec opens (``s3://b/x.tar``, not ``hf://``)."""
    s = str(path)
    return bool(re.search(r"\{[^{}]*\.\.[^{}]*\}", s)) or (re.match(r"^[a-z][a-z0-9+.-]*://", s) is not None
                                                            and not s.startswith("hf://"))


def expand(spec: str) -> List[str]:
    """The shard URLs of a brace pattern, in order; DataError naming the first local shard that is missing."""
    from braceexpand import braceexpand
    urls = list(braceexpand(str(spec)))
    for u in urls:
        if "://" not in u and not os.path.isfile(os.path.expanduser(u)):
            raise DataError(f"{spec}: shard {u} does not exist ({len(urls)} shards in the pattern)")
    return urls


def _open(url: str):
    if "://" not in url:
        return open(os.path.expanduser(url), "rb")
    import fsspec
    return fsspec.open(url, "rb").open()


def _split_key(member: str):
    """webdataset's convention: the key is the path up to the first dot of the file name, the rest its field."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(url: str):
    """[(key, image field, data offset, size, label or -1)] of one shard, in member order; DataError when the shard
    is not a readable tar or is truncated."""
    samples, labels = {}, {}
    try:
        with _open(url) as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if not m.isreg():
                        continue
                    if m.offset_data + m.size > size:
                        raise DataError(f"{url}: shard is truncated (member {m.name} ends at byte "
                                        f"{m.offset_data + m.size}, the file has {size})")
                    key, ext = _split_key(m.name)
                    if ext in _IMG_EXTS and key not in samples:
                        samples[key] = (ext, m.offset_data, m.size)
                    elif ext == "cls":
                        text = tf.extractfile(m).read().decode("utf-8", "replace").strip()
                        try:
                            labels[key] = int(text)
                        except ValueError:
                            raise DataError(f"{url}: {m.name} holds {text[:20]!r}, not an integer class") from None
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{url}: not a readable tar shard ({e})".replace("\n", " ")) from None
    except OSError as e:
        raise DataError(f"{url}: cannot read the shard ({e})".replace("\n", " ")) from None
    return [(k, ext, off, n, labels.get(k, -1)) for k, (ext, off, n) in samples.items()]


# what names one version of a remote object, in the order fsspec's filesystems report it (S3/GCS/Azure/HTTP, local)
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "generation", "version_id", "LastModified", "last_modified", "mtime",
                   "created")


def shard_version(url: str) -> Optional[str]:
    """What identifies this exact shard for the index cache: its path, size and modification time (local), or its
    URL, size and the store's version field (ETag, modification time: fsspec's ``info``). None when it cannot be
    told (no such field, or the shard cannot be stat'ed): an index cached without a version could be stale."""
    try:
        if "://" not in url:
            path = os.path.abspath(os.path.expanduser(url))
            st = os.stat(path)
            return f"v1|{path}|{st.st_size}|{st.st_mtime_ns}"
        import fsspec
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except (OSError, ValueError, ImportError):
        return None
    version = next((info[k] for k in _VERSION_FIELDS if info.get(k) not in (None, "")), None)
    return None if version is None else f"v1|{url}|{info.get('size')}|{version}"


def indexed_shard(url: str):
    """:func:`scan_shard`, kept on disk keyed by :func:`shard_version` (so a rewritten or truncated shard is scanned
    again): a set of a million images, local or in an object store, is scanned once, not at every open and in every
    process (the scan reads each member's header in Python, about 0.5 ms an image, plus a round trip per member
    for a remote shard)."""
    root = os.environ.get("MIMKIT_SHARD_INDEX_CACHE", INDEX_CACHE)
    version = shard_version(url) if root else None
    if version is None:
        return scan_shard(url)  # which names any problem with the shard
    cached = os.path.join(os.path.expanduser(root), hashlib.sha1(version.encode()).hexdigest() + ".json")
    try:
        with open(cached) as f:
            return [tuple(r) for r in json.load(f)]
    except (OSError, ValueError):
        pass
    samples = scan_shard(url)
    try:
        write_json(cached, samples, indent=None)
    except OSError as e:  # a read-only or full cache folder costs the next open a scan, nothing else
        log.debug("shard index not cached (%s)", e)
    return samples


class ShardSource(ImageSource):
    """The images of a list of tar shards, in shard and member order; ``read_bytes(i)`` seeks to image ``i``.

    ``shard_of[i]`` is the shard holding image i; ``names[i]`` is ``shard-file:key.ext``; labels come from the
    ``.cls`` members (-1 where a sample has none)."""

    def __init__(self, spec: str):
        self.root, self.urls = str(spec), expand(spec)
        shard_of, names, offsets, labels = [], [], [], []
        for s, url in enumerate(self.urls):
            base = url.rsplit("/", 1)[-1]
            for key, ext, off, n, y in indexed_shard(url):
                shard_of.append(s)
                names.append(f"{base}:{key}.{ext}")
                offsets.append((off, n))
                labels.append(y)
        if not names:
            raise DataError(f"{spec}: the {len(self.urls)} shard(s) hold no images ({' '.join(_IMG_EXTS)})")
        self.names, self.labels = names, labels
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        self.classes = [str(c) for c in range(max(labels) + 1)] if max(labels) >= 0 else []
        self._files, self._pid = {}, None

    def sort_key(self, i: int):
        """The sample's key (``class/name.ext``, without the shard file), compared as a folder's names are: the
        held-out split is the source folder's, however the shards were shuffled."""
        return name_sort_key(self.names[i].split(":", 1)[1])

    def read_bytes(self, i: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker opens its own handles
            self._files, self._pid = {}, os.getpid()
        s = int(self.shard_of[i])
        f = self._files.get(s)
        if f is None:
            if len(self._files) >= 4:  # a few shards open at a time
                self._files.pop(next(iter(self._files))).close()
            f = self._files[s] = _open(self.urls[s])
        off, n = (int(v) for v in self.offsets[i])
        f.seek(off)
        data = f.read(n)
        if len(data) != n:
            raise OSError(f"{self.urls[s]} ends inside the image (truncated shard)")
        return data

    def __getstate__(self):  # file handles do not pickle; reopened lazily
        return {**self.__dict__, "_files": {}, "_pid": None}

    def training_loader(self, indices=None, **options) -> "ShardLoader":
        """What ``make_loader`` returns for a shuffled (training) loader: the streamed one."""
        return ShardLoader(self, indices, **options)


def open_shards(spec: str, **_) -> ShardSource:
    return ShardSource(spec)


register_source(is_shard_spec, open_shards)


# the training loader --------------------------------------------------------------------------------------
def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``size`` gives a stream of n items (webdataset's shuffle): each item read
    replaces a random one of the buffer, which is emitted. Computed on positions, so that a resumed epoch can skip
    emitted items without reading them, and so that at most ``size`` items wait in memory."""
    out, buf = np.empty(n, dtype=np.int64), []
    k = 0
    for p in range(n):
        buf.append(p)
        if len(buf) >= size:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    rest = np.asarray(buf, dtype=np.int64)
    rng.shuffle(rest)
    out[k:] = rest
    return out


def split_sizes(total: int, parts: int) -> List[int]:
    return [total // parts + (j < total % parts) for j in range(parts)]


class _Streams(IterableDataset):
    """Runs in each worker: the sub-batches of this worker's streams, batch by batch, as
    (batch, stream, images, labels, indices, bad [(name, reason)])."""

    def __init__(self, loader, streams):
        self.L, self.streams = loader, streams

    def __iter__(self):
        info = get_worker_info()
        mine = self.streams[info.id::info.num_workers] if info is not None else self.streams
        gens = [self.L.stream_batches(s) for s in mine]
        for _ in range(self.L.start_batch, self.L.batches_per_epoch):
            for s, g in zip(mine, gens):
                yield next(g)


def _as_is(item):
    return item


class ShardLoader:
    """Streams ``source[indices]`` (a :class:`ShardSource`) for training; the same interface as
    :class:`~mimkit.data.loader.Loader` (set_epoch, len, skipped, iteration of (images, labels)). See the module
    docstring for the order."""

    def __init__(self, source: ShardSource, indices=None, *, batch_size: int, recipe: str = "pretrain",
                 img_size: int = 224, aug: str = "rrc", seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: Optional[int] = None, device="cpu", min_size: int = 1, with_index: bool = False,
                 streams: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER, **transform_kwargs):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world_size, self.min_size = rank, world_size, min_size
        self.device, self.with_index, self.shuffle_buffer = torch.device(device), with_index, shuffle_buffer
        self.indices = np.arange(len(source)) if indices is None else np.asarray(sorted(int(i) for i in indices))
        self.epoch, self.start_batch, self.skipped = 0, 0, {}
        workers = resolve_workers(num_workers, len(self.indices))
        per_rank = streams // world_size if streams else max(1, workers)
        if streams and streams % world_size:
            raise DataError(f"--shard-streams {streams} is not a multiple of the {world_size} processes")
        if per_rank > batch_size:
            raise DataError(f"{source.root}: {per_rank} read streams per process need a batch of at least "
                            f"{per_rank} images; got --batch-size {batch_size} (lower --shard-streams)")
        self.streams = per_rank * world_size
        self.sizes = split_sizes(batch_size, per_rank) * world_size  # sub-batch size of each stream
        # the worker count: the largest that divides this process's streams evenly (each reads as many)
        self.workers = max([w for w in range(1, min(workers, per_rank) + 1) if per_rank % w == 0], default=0)
        self.workers = self.workers if workers > 0 else 0
        n = len(self.indices)
        self.batches_per_epoch = min(c // s for c, s in zip(split_sizes(n, self.streams), self.sizes))
        if self.batches_per_epoch == 0:
            raise DataError(f"{source.root}: {n} images are fewer than one global batch of {batch_size} x "
                            f"{world_size} in {self.streams} streams")
        self.transform = build_transform(recipe, img_size, aug, **transform_kwargs)

    @property
    def num_images(self) -> int:
        return len(self.indices)

    def __len__(self):
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Select the epoch (its order and augmentations); ``start_batch`` skips that many batches without reading
        their images, to resume mid-epoch."""
        self.epoch, self.start_batch = epoch, start_batch

    def stream(self, s: int) -> np.ndarray:
        """Source indices of stream ``s`` this epoch, in the order they are used."""
        src = self.source
        shard_order = torch.randperm(len(src.urls), generator=torch.Generator().manual_seed(
            mix_seed(self.seed, self.epoch, 7))).numpy()
        rank_of_shard = np.empty(len(shard_order), dtype=np.int64)
        rank_of_shard[shard_order] = np.arange(len(shard_order))
        shards = src.shard_of[self.indices]
        # the epoch's stream: shards in their permuted order, members in file order (indices are sorted)
        epoch_stream = self.indices[np.argsort(rank_of_shard[shards], kind="stable")]
        bounds = np.cumsum([0] + split_sizes(len(epoch_stream), self.streams))
        part = epoch_stream[bounds[s]:bounds[s + 1]]
        order = buffer_order(len(part), self.shuffle_buffer, np.random.default_rng(mix_seed(self.seed, self.epoch, s)))
        return part, order

    def stream_batches(self, s: int):
        """Sub-batches of stream ``s`` from ``start_batch`` on: read forward through the stream, holding only the
        images the shuffle buffer still waits to emit."""
        part, order = self.stream(s)
        size = self.sizes[s]
        start = self.start_batch * size
        wanted = np.zeros(len(part), dtype=bool)
        wanted[order[start:self.batches_per_epoch * size]] = True
        held, next_read = {}, 0
        for b in range(self.start_batch, self.batches_per_epoch):
            xs, ys, ids, bad = [], [], [], []
            for p in order[b * size:(b + 1) * size]:
                while p not in held:  # read forward to p, keeping what later batches of this epoch use
                    if wanted[next_read]:
                        held[next_read] = self._read(int(part[next_read]))
                    next_read += 1
                i, data = int(part[p]), held.pop(p)
                try:
                    if isinstance(data, BadImage):
                        raise data
                    img = decode_image(data, self.source.names[i])
                    if min(img.size) < self.min_size:
                        raise BadImage(self.source.names[i], f"{img.size[0]}x{img.size[1]} px is smaller than "
                                                             f"{self.min_size} px")
                except BadImage as e:
                    bad.append((e.name, e.reason))
                    continue
                with seeded_rng(mix_seed(self.seed, self.epoch, i)):
                    xs.append(self.transform(img))
                ys.append(self.source.labels[i])
                ids.append(i)
            x = torch.stack(xs) if xs else None
            yield b, s, x, torch.tensor(ys, dtype=torch.long), torch.tensor(ids, dtype=torch.long), bad

    def _read(self, i: int):
        try:
            return self.source.read_bytes(i)
        except OSError as e:
            return BadImage(self.source.names[i], f"cannot read ({e})")

    def _skip(self, name, reason):
        if name not in self.skipped:
            self.skipped[name] = reason
            log.warning("skipping image %s: %s (%d skipped so far)", name, reason, len(self.skipped))

    def __iter__(self):
        per_rank = self.streams // self.world_size
        mine = list(range(self.rank * per_rank, (self.rank + 1) * per_rank))
        ds = _Streams(self, mine)
        items = DataLoader(ds, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                           pin_memory=self.device.type == "cuda") if self.workers else iter(ds)
        pending = {}
        for b, s, x, y, idx, bad in items:
            for name, reason in bad:
                self._skip(name, reason)
            got = pending.setdefault(b, {})
            got[s] = (x, y, idx)
            if len(got) < per_rank:
                continue
            del pending[b]
            parts = [got[s] for s in mine if got[s][0] is not None]
            if not parts:
                continue
            x = torch.cat([p[0] for p in parts]).to(self.device, non_blocking=True)
            y = torch.cat([p[1] for p in parts]).to(self.device, non_blocking=True)
            yield (x, y, torch.cat([p[2] for p in parts])) if self.with_index else (x, y)


# writing ------------------------------------------------------------------------------------------------------
def write_shards(src, out, shard_size: int = 1000, prefix: str = "shard", shuffle: bool = True,
                 seed: int = 0) -> str:
    """Write the images of ``src`` (a path ``open_images`` takes, or a source) as tar shards of ``shard_size``
    images with webdataset's ShardWriter: each sample is ``KEY.EXT`` (the file's bytes, not re-encoded) and, when
    the images sit in class folders, ``KEY.cls`` (the class index). Returns the brace pattern of the shards.

    ``shuffle`` writes the images in a seeded random order, as webdataset advises: the reader shuffles only
    within a buffer, so shards of a class-sorted folder would give training batches of one class (measured on
    CIFAR-10: a noisier loss and a lower k-NN than the same recipe from the archive). The held-out split does not
    depend on it (``split_train_val`` sorts each class by key). Written in a hidden folder in ``out`` and moved
    into place when complete, so a stopped run leaves no shard that looks whole."""
    import shutil
    import tempfile
    try:
        import webdataset as wds
    except ImportError:
        raise DataError("writing shards needs webdataset: pip install 'mimkit[shards]'") from None
    source = src if isinstance(src, ImageSource) else open_images(src)
    out = os.path.expanduser(str(out))
    os.makedirs(out, exist_ok=True)
    if any(f.startswith(prefix + "-") and f.endswith(".tar") for f in os.listdir(out)):
        raise DataError(f"{out}: already holds {prefix}-*.tar shards; write to an empty folder")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=out)
    try:
        keys = set()
        order = np.random.default_rng(seed).permutation(len(source)) if shuffle else range(len(source))
        with wds.ShardWriter(os.path.join(tmp, f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for i in order:
                i, name = int(i), source.names[i]
                stem, _, ext = name.rpartition(".")
                key = (stem or name).replace(".", "_")  # a dot would end the key (webdataset's convention)
                if key in keys:
                    key = f"{key}~{i}"
                keys.add(key)
                sample = {"__key__": key, (ext or "jpg").lower(): source.read_bytes(i)}
                if source.labels[i] >= 0:
                    sample["cls"] = source.labels[i]
                sink.write(sample)
        written = sorted(f for f in os.listdir(tmp) if f.endswith(".tar"))
        for f in written:
            os.replace(os.path.join(tmp, f), os.path.join(out, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out, f"{prefix}-{{000000..{len(written) - 1:06d}}}.tar")


def shards_command(cfg) -> str:
    """``mimkit shards DATA OUTPUT``: write the shards and print the ``--data`` pattern that reads them."""
    pattern = write_shards(cfg.data, cfg.output, cfg.shard_size, shuffle=cfg.shuffle, seed=cfg.seed)
    print(f"shards: wrote {len(expand(pattern))} shards of up to {cfg.shard_size} images; train with --data '{pattern}'",
          flush=True)
    return pattern
