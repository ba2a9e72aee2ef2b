"""Where images come from: a folder searched recursively, a tar archive read in place, or the built-in sample.

A source is only an index (sorted relative names, labels) plus ``read_bytes(i)``; decoding is separate
(:mod:`mimkit.data.decode`) so that a loader can decode in worker processes.
"""
import itertools
import math
import os
import random
import stat
import tarfile
from pathlib import Path

import numpy as np
from ..errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SAMPLE_DIR = Path(__file__).parent / "sample"
BUILTIN = ("builtin", "builtin:sample")
MAX_GZ_BYTES = 2 * 1024 ** 3  # a compressed tar larger than this is not read into memory


def _is_image(relpath: str) -> bool:
    # hidden files and folders are skipped: macOS '._x.jpg' resource forks, '.ipynb_checkpoints', ...
    return relpath.lower().endswith(IMG_EXTENSIONS) and not any(p.startswith(".") for p in relpath.split("/"))


def _sort_key(name: str):
    return name.split("/")  # component-wise, so a class folder's files stay together in folder order


class ImageSource:
    """Sorted relative image ``names`` with ``labels`` from the first-level folder (-1 for images in the root)."""

    def __init__(self, root, names):
        self.root = str(root)
        self.names = sorted(names, key=_sort_key)
        # classes: first-level folders holding images, sorted as torchvision's ImageFolder does
        self.classes = sorted({n.split("/", 1)[0] for n in self.names if "/" in n})
        idx = {c: i for i, c in enumerate(self.classes)}
        self.labels = [idx[n.split("/", 1)[0]] if "/" in n else -1 for n in self.names]

    def __len__(self):
        return len(self.names)

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


class FolderSource(ImageSource):
    def __init__(self, root):
        names, seen = [], set()
        # follow symlinked folders, but visit every real folder once so that symlink loops terminate;
        # sorted descent makes the choice between two links to one folder deterministic
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            names += [f if rel == "." else f"{rel}/{f}" for f in filenames if _is_image(f)]
        super().__init__(root, names)

    def read_bytes(self, i):
        # non-blocking open + fstat: a named pipe or device called *.jpg must fail, not block the loader forever
        fd = os.open(os.path.join(self.root, self.names[i]), os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            return f.read()


class FileSource(FolderSource):
    """A single image file, unlabeled."""

    def __init__(self, path):
        ImageSource.__init__(self, Path(path).parent, [Path(path).name])


class TarSource(ImageSource):
    """A tar archive read without extracting.

    Uncompressed: the index keeps each member's data offset and every process (DataLoader worker) lazily opens
    its own file handle and seeks. Compressed (.tar.gz): random access would decompress from the start each time,
    so all image bytes are read into one in-memory buffer at open time (one buffer, not one bytes object per file,
    so that forked workers share its pages instead of copying them through reference counting).
    If every image sits under one top folder (``tar -czf x.tgz cifar10-train``) that folder is the root.
    """

    def __init__(self, path):
        path = str(path)
        self._fh, self._pid, self._blob = None, None, None
        try:
            with tarfile.open(path, "r:") as tf:  # raises ReadError when the archive is compressed
                members = [(m.name, m.offset_data, m.size) for m in tf if m.isreg() and not m.issparse()]
        except tarfile.ReadError:
            members = self._read_compressed(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read the archive ({e})") from None
        members = [(_strip_dot(n), o, s) for n, o, s in members]
        members = [m for m in members if _is_image(m[0])]
        tops = {n.split("/", 1)[0] for n, _, _ in members}
        if len(tops) == 1 and all("/" in n for n, _, _ in members):
            members = [(n.split("/", 1)[1], o, s) for n, o, s in members]
        super().__init__(path, [n for n, _, _ in members])
        where = {n: (o, s) for n, o, s in members}
        self._offsets = np.array([where[n] for n in self.names], dtype=np.int64).reshape(-1, 2)

    def _read_compressed(self, path):
        size = os.path.getsize(path)
        if size > MAX_GZ_BYTES:
            raise DataError(f"{path}: a compressed tar of {size / 2**30:.1f} GiB is too large to hold in memory and "
                            f"too slow to read at random; extract it (tar -xf) or use an uncompressed .tar")
        blob, members = bytearray(), []
        try:
            with tarfile.open(path, "r|*") as tf:  # one sequential pass
                for m in tf:
                    if m.isreg() and _is_image(_strip_dot(m.name)):
                        members.append((m.name, len(blob), m.size))
                        blob += tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable tar archive ({e})") from None
        self._blob = blob
        return members

    def read_bytes(self, i):
        off, size = (int(v) for v in self._offsets[i])
        if self._blob is not None:
            return bytes(memoryview(self._blob)[off:off + size])
        if self._pid != os.getpid():  # first read in this process (main or a forked worker): open our own handle
            self._fh, self._pid = open(self.root, "rb"), os.getpid()
        self._fh.seek(off)
        return self._fh.read(size)

    def __getstate__(self):  # for spawned workers: file handles do not pickle; reopened lazily
        return {**self.__dict__, "_fh": None, "_pid": None}


def _strip_dot(name):
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


SOURCE_OPENERS = []  # (claims(path) -> bool, open(path, **dataset_options)) of the sources defined in other modules


def register_source(claims, opener):
    """Let ``open_images`` open the paths ``claims`` accepts with ``opener`` (how shards and HF datasets plug in
    without this module importing them)."""
    SOURCE_OPENERS.append((claims, opener))


def open_images(path, **dataset_options) -> ImageSource:
    """A folder of images (recursive), a .tar/.tar.gz/.tgz of one, or ``'builtin'`` (the embedded CIFAR-10 sample);
    tar shards (``x-{000000..000127}.tar``: :mod:`.shards`) or a Hugging Face dataset (``hfds:DIR``: :mod:`.hfdata`,
    which takes ``dataset_options``: image_column, label_column, train_split, val_split).

    Labels come from first-level folder names (sorted); images in the root are -1 (unlabeled).
    """
    if str(path) in BUILTIN:
        path = SAMPLE_DIR
    for claims, opener in SOURCE_OPENERS:  # tar shards, Hugging Face datasets (registered by mimkit.data)
        if claims(path):
            return opener(str(path), **dataset_options)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        src = FolderSource(p)
    elif p.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        src = TarSource(p)
    elif _is_image(p.name):  # one file, e.g. `mimkit reconstruct --images photo.jpg`
        src = FileSource(p)
    else:
        raise DataError(f"{path}: not a folder or a .tar/.tar.gz/.tgz archive of images")
    if not len(src):
        raise DataError(f"{path}: no images found (looked recursively for {' '.join(IMG_EXTENSIONS)}, any case)")
    return src


def split_train_val(source: ImageSource, val_fraction: float = 0.1):
    """Fixed split: per class, the last round(n_c * val_fraction) images in sorted order are validation.

    Unlabeled images (-1) form one group, so an unlabeled source gives the last fraction overall.
    Rounding is half-up (45 * 0.1 -> 5). Returns two sorted lists of source indices.
    A source with named splits (a Hugging Face dataset's train and validation) returns those instead.
    """
    if getattr(source, "fixed_split", None):
        return source.fixed_split
    groups = {}
    for i, y in enumerate(source.labels):
        groups.setdefault(y, []).append(i)  # source order is sorted, so each group is too
    train, val = [], []
    for idx in groups.values():
        k = math.floor(len(idx) * val_fraction + 0.5)
        train += idx[:len(idx) - k]
        val += idx[len(idx) - k:]
    return sorted(train), sorted(val)


def spread_over_classes(source: ImageSource, indices, seed: int = 0) -> list:
    """``indices`` reordered so that any first few of them spread over the classes: round-robin over the classes
    (in label order), each class's images in a seeded random order. A figure of the first eight then shows eight
    classes (or eight random images of an unlabeled folder), not the first folder's first files."""
    groups = {}
    for i in indices:
        groups.setdefault(source.labels[i], []).append(i)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    rounds = itertools.zip_longest(*(groups[y] for y in sorted(groups)))
    return [i for round_ in rounds for i in round_ if i is not None]

