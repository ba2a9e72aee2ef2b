"""Deterministic, resumable, DDP-shardable loading, with a fast in-memory path for small data sets.

Order: epoch ``e`` visits the images in ``randperm(n)`` seeded by (seed, e). Global batches are consecutive chunks
of ``batch_size * world_size`` of it and rank r takes the contiguous slice [r*bs, (r+1)*bs) of each, so the ranks'
batches concatenated in rank order are the single-process batch of size ``batch_size * world_size``.
Augmentation randomness depends only on (seed, epoch, image index) on the per-image path and on (seed, epoch,
global batch) on the batched path, never on num_workers, the rank split or where an epoch was resumed.
"""
import hashlib
import io
import logging
import os
import random
import struct
import time
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .decode import decode_tensor, load_image, pil_to_tensor, read_bytes
from ..errors import BadImage, DataError
from ..pixels import PixelSpec
from .inputs import load_input
from .source import ImageSource, open_images
from .transforms import AUGS, RECIPES, BatchAugment, TensorTransform, batched_form, build_transform

log = logging.getLogger(__name__)
CACHE_MAX_BYTES = 4 * 2 ** 30  # decode into memory when the uint8 images fit in this
DEVICE_CACHE_MAX_BYTES = 2 ** 30  # and keep them on the GPU when they fit in this


def mix_seed(*ints) -> int:
    """A well-mixed 63-bit seed from integers (seeds for nearby epochs/indices must not be correlated)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(ints)}q", *ints), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded_rng(seed):
    """Seed python, numpy and torch's CPU generator (torchvision and timm transforms draw from these). In the main
    process (num_workers=0) restore them afterwards so as not to disturb the caller's streams; in a worker nothing
    else uses them (and saving numpy's state costs more than the transform). Only the CPU generator:
    torch.manual_seed would also reseed CUDA."""
    main = get_worker_info() is None
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if main else None
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if main:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])




class ImageCache:
    """Decoded images of a subset, (N, C, H, W) uint8 (8-bit files) or float32 in [0, 1], with the files that
    failed to decode (``bad``: pos -> reason)."""

    def __init__(self, images: torch.Tensor, bad: dict):
        self.images, self.bad = images, bad
        self.valid = torch.ones(len(images), dtype=torch.bool)
        self.valid[list(bad)] = False


class ImageDataset(Dataset):
    """Map-style dataset over ``source[indices]``.

    ``ds[k]`` returns ``(tensor, label, source_index)``; ``ds[(k, seed)]`` does the same with the transform's
    randomness seeded by ``seed`` (what :class:`Loader` uses). A file that cannot be used comes back as
    ``(None, name, reason)``, so that :func:`collate` drops it and the main process can report it.
    Images smaller than ``min_size`` (e.g. one patch) count as bad files. With a non-RGB ``pixels`` spec the
    images are (C, H, W) tensors (:func:`mimkit.data.inputs.load_input`) and ``transform`` takes tensors.
    """

    def __init__(self, source: ImageSource, indices=None, transform=None, min_size: int = 1, cache: ImageCache = None,
                 pixels: PixelSpec = None):
        self.source, self.transform, self.min_size, self.cache = source, transform, min_size, cache
        self.indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
        self.pixels = None if pixels is None or pixels.is_rgb8 else pixels

    def __len__(self):
        return len(self.indices)

    def load(self, k: int) -> Image.Image:
        i = self.indices[k]
        if self.cache is not None:
            if k in self.cache.bad:
                raise BadImage(self.source.names[i], self.cache.bad[k])
            if self.pixels is not None:
                return self.cache.images[k]
            return Image.fromarray(self.cache.images[k].permute(1, 2, 0).numpy())
        if self.pixels is not None:
            x = load_input(self.source, i, self.pixels)
            if min(x.shape[1:]) < self.min_size:
                raise BadImage(self.source.names[i], f"{x.shape[2]}x{x.shape[1]} px is smaller than {self.min_size} px")
            return x
        img = load_image(self.source, i)
        if min(img.size) < self.min_size:
            raise BadImage(self.source.names[i], f"{img.size[0]}x{img.size[1]} px is smaller than {self.min_size} px")
        return img

    def __getitem__(self, key):
        k, seed = key if isinstance(key, tuple) else (key, None)
        i = self.indices[k]
        try:
            img = self.load(k)
        except BadImage as e:
            return None, e.name, e.reason
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with seeded_rng(seed):
                    img = self.transform(img)
        return img, self.source.labels[i], i


def collate(batch):
    """Stack the good items; return ``(images, labels, indices, bad)`` with bad = [(name, reason), ...]."""
    good = [b for b in batch if b[0] is not None]
    bad = [(b[1], b[2]) for b in batch if b[0] is None]
    if not good:
        return None, None, None, bad
    return (torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]),
            torch.tensor([b[2] for b in good]), bad)


def check_sample(source: ImageSource, min_size: int, n: int = 32, indices=None, pixels: PixelSpec = None):
    """Decode ``n`` evenly spaced images up front and raise DataError when none of them is usable: all are
    smaller than ``min_size`` (one patch; the error names one) or none decodes. A few bad or tiny files among
    good ones are not fatal: training skips and names each."""
    indices = range(len(source)) if indices is None else indices
    picks = sorted({indices[int(j)] for j in np.linspace(0, len(indices) - 1, min(n, len(indices)))})
    bad, small = [], []
    for i in picks:
        try:
            if pixels is None or pixels.is_rgb8:
                size = load_image(source, i).size
            else:
                size = tuple(load_input(source, i, pixels).shape[:0:-1])  # (W, H)
        except BadImage as e:
            bad.append(e)
            continue
        if min(size) < min_size:
            small.append((i, size))
    if small and len(small) + len(bad) == len(picks):
        i, (w, h) = small[0]
        raise DataError(f"{os.path.join(source.root, source.names[i])}: image is {w}x{h} px, smaller than "
                        f"{min_size} px (one patch); remove such images or use a smaller patch")
    if len(bad) == len(picks):
        raise DataError(f"{source.root}: none of {len(picks)} sampled images decodes, e.g. {bad[0]}")


class _NoCache(Exception):
    pass


class _DecodeSet(Dataset):
    def __init__(self, source, indices, size, min_size, pixels=None):
        self.source, self.indices, self.size, self.min_size = source, indices, size, min_size
        self.pixels = None if pixels is None or pixels.is_rgb8 else pixels

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i, S = self.indices[k], self.size
        name = self.source.names[i]
        if self.pixels is not None:
            return self._tensor(k, i, name, S)
        try:
            if S:  # draft: large JPEGs decode at a reduced scale that stays >= S
                img = load_image(self.source, i, draft=(S, S))
                w, h = img.size
            else:
                x = decode_tensor(read_bytes(self.source, i), name)
                h, w = x.shape[1:]
            if min(w, h) < self.min_size:  # draft never shrinks below S >= min_size, so this is the true size
                raise BadImage(name, f"{w}x{h} px is smaller than {self.min_size} px")
        except BadImage as e:
            return k, None, e.reason
        if S:  # shorter side to S, central S x S
            x = pil_to_tensor(img if (w, h) == (S, S) else ImageOps.fit(img, (S, S), Image.BICUBIC))
        return k, x, ""

    def _tensor(self, k, i, name, S):
        """Any channel count and bit depth: shorter side to S and central S x S with bicubic (clamped to the
        input's range), as ImageOps.fit does for the 8-bit RGB path."""
        try:
            x = load_input(self.source, i, self.pixels)
            h, w = x.shape[1:]
            if min(w, h) < self.min_size:
                raise BadImage(name, f"{w}x{h} px is smaller than {self.min_size} px")
        except BadImage as e:
            return k, None, e.reason
        if S and (h, w) != (S, S):
            s = S / min(h, w)
            rh, rw = max(S, round(h * s)), max(S, round(w * s))
            top, left = (rh - S) // 2, (rw - S) // 2
            dtype, top_value = x.dtype, 255 if x.dtype == torch.uint8 else 1
            y = torch.nn.functional.interpolate(x[None].float(), size=(rh, rw), mode="bicubic", antialias=True,
                                                align_corners=False)[0, :, top:top + S, left:left + S]
            y = y.clamp(0, top_value)
            x = (y.round().to(dtype) if dtype == torch.uint8 else y).contiguous()
        return k, x, ""


def _stack_decoded(items):  # runs in the worker: one shared-memory tensor per chunk instead of one per image
    ks = [k for k, x, _ in items if x is not None]
    xs = [x for _, x, _ in items if x is not None]
    bad = [(k, r) for k, x, r in items if x is None]
    same = len({tuple(x.shape) for x in xs}) <= 1
    return ks, (torch.stack(xs) if xs and same else xs), bad


def _check_same_size(source, indices, min_size, n=64):
    """Raise _NoCache when the headers of ``n`` evenly spaced images show more than one size (too small ones
    do not count: they are skipped anyway)."""
    seen = {}
    for j in np.linspace(0, len(indices) - 1, min(n, len(indices))).astype(int):
        name = source.names[indices[j]]
        try:
            wh = Image.open(io.BytesIO(source.read_bytes(indices[j]))).size
        except Exception:
            continue  # a bad file is reported when it is decoded
        if min(wh) >= min_size:
            seen.setdefault(wh, name)
        if len(seen) > 1:
            (a, na), (b, nb) = seen.items()
            raise _NoCache(f"images differ in size ({na} is {a[0]}x{a[1]} px, {nb} is {b[0]}x{b[1]} px); "
                           f"pass cache_size= to resize them")


def resolve_workers(num_workers: Optional[int], num_images: int, decode_only: bool = False) -> int:
    """The one ``--num-workers`` rule: a count >= 0 is used as given; None or -1 means automatic, which is no
    worker processes for a one-off decode of under 2,000 images (starting them costs more), else up to 8,
    leaving one core to the training process when workers feed training."""
    if num_workers is not None and num_workers >= 0:
        return int(num_workers)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if decode_only:
        return 0 if num_images < 2000 else min(8, cpus)
    return max(0, min(8, cpus - 1))


def build_cache(source: ImageSource, indices, size: int = None, min_size: int = 1, max_bytes: int = CACHE_MAX_BYTES,
                num_workers: int = None, pixels: PixelSpec = None) -> ImageCache:
    """Decode ``source[indices]`` once into memory, in parallel.

    ``size=None`` keeps the images as they are and requires one common size; ``size=S`` makes every image S x S
    (shorter side to S, central crop). Raises _NoCache (with the reason) when that fails or exceeds ``max_bytes``.
    """
    indices = [int(i) for i in indices]
    ds = _DecodeSet(source, indices, size, min_size, pixels)
    if size:
        hw = (size, size)
    else:
        _check_same_size(source, indices, min_size)  # cheap header look first: decoding to find out can take minutes
        hw = next((tuple(x.shape[1:]) for x in (ds[k][1] for k in range(min(len(ds), 64))) if x is not None), None)
        if hw is None:
            raise _NoCache("none of the first 64 images decodes")
    chans, dtype = 3, torch.uint8
    if pixels is not None and not pixels.is_rgb8:
        chans, dtype = pixels.in_chans, (torch.uint8 if pixels.dtype == "uint8" else torch.float32)
    nbytes = len(indices) * chans * hw[0] * hw[1] * dtype.itemsize
    if nbytes > max_bytes:
        raise _NoCache(f"{len(indices)} images of {hw[1]}x{hw[0]} px need {nbytes / 2**30:.1f} GiB, over "
                       f"{max_bytes / 2**30:.1f} GiB")
    num_workers = resolve_workers(num_workers, len(indices), decode_only=True)
    images, bad = torch.zeros(len(indices), chans, *hw, dtype=dtype), {}
    dl = DataLoader(ds, batch_size=256, num_workers=num_workers, collate_fn=_stack_decoded)
    for ks, xs, bad_chunk in dl:
        bad.update(bad_chunk)
        odd = [(k, x) for k, x in zip(ks, xs) if tuple(x.shape[1:]) != hw]
        if odd:
            k, x = odd[0]
            raise _NoCache(f"images differ in size ({source.names[indices[k]]} is {x.shape[2]}x{x.shape[1]} px, "
                           f"not {hw[1]}x{hw[0]}); pass cache_size= to resize them")
        if len(ks):
            images[ks] = xs
    return ImageCache(images, bad)


class _RankBatches:
    """Batch sampler for the per-image path: this rank's batches of (position, per-image seed)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        L = self.loader
        for _, pos in L._rank_batches():
            yield [(k, mix_seed(L.seed, L.epoch, L.indices[k])) for k in pos.tolist()]

    def __len__(self):
        return max(0, len(self.loader) - self.loader.start_batch)


class Loader:
    """Iterate ``(images float32 (B, C, S, S) normalised, labels long (B,))`` on ``device``; see :func:`make_loader`."""

    def __init__(self, source, indices=None, *, batch_size: int, recipe: str = "pretrain", img_size: int = 224,
                 aug: str = "rrc", seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = None,
                 device="cpu", cache: str = "auto", cache_size: int = None, drop_last: bool = True,
                 shuffle: bool = True, min_size: int = 1, with_index: bool = False, pixels: PixelSpec = None,
                 **transform_kwargs):
        if cache not in ("auto", "on", "off") or recipe not in RECIPES or aug not in AUGS:
            raise ValueError(f"expected cache in ('auto', 'on', 'off'), recipe in {RECIPES}, aug in {AUGS}; got "
                             f"{cache!r}, {recipe!r}, {aug!r}")
        self.source = source if isinstance(source, ImageSource) else open_images(source)
        self.indices = list(range(len(self.source))) if indices is None else [int(i) for i in indices]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last and shuffle  # in order = every image, e.g. for features
        self.device, self.with_index = torch.device(device), with_index
        self.epoch, self.start_batch, self.skipped = 0, 0, {}
        if not self.indices:
            raise DataError(f"{self.source.root}: the loader was given no images")
        if self.drop_last and len(self) == 0:
            raise DataError(f"{self.source.root}: {len(self.indices)} images are fewer than one global batch of "
                            f"{batch_size} x {world_size}")
        self.labels = torch.tensor([self.source.labels[i] for i in self.indices])

        self.cache = None
        if cache != "off":
            try:
                self.cache = build_cache(self.source, self.indices, cache_size, min_size, pixels=pixels)
            except _NoCache as e:
                if cache == "on":
                    raise DataError(f"{self.source.root}: cannot cache the images: {e}") from None
                log.info("%s: not caching the images (%s)", self.source.root, e)
        if self.cache is not None:
            for k in sorted(self.cache.bad):
                self._skip(self.source.names[self.indices[k]], self.cache.bad[k])

        if pixels is not None:  # the spec's statistics, batched and per image (RGB files too: --mean auto)
            transform_kwargs = dict(transform_kwargs, mean=pixels.mean, std=pixels.std)
        form = batched_form(recipe, aug, transform_kwargs)
        self.batched = self.cache is not None and form is not None
        if self.batched:  # decoded once, augmented on batched tensors on the device
            self.augment = BatchAugment(form[0], img_size, form[1], **form[2])
            if self.device.type != "cpu" and self.cache.images.numel() <= DEVICE_CACHE_MAX_BYTES:
                self.cache.images = self.cache.images.to(self.device)
            self._dl = None
        else:  # per image, in DataLoader workers; the epoch travels inside the sampler's keys, so persistent
            # workers stay deterministic
            if pixels is None or pixels.is_rgb8:
                transform = build_transform(recipe, img_size, aug, **transform_kwargs)
            else:  # any channel count and bit depth: tensors all the way
                transform = TensorTransform(recipe, img_size, aug, **transform_kwargs)
            ds = ImageDataset(self.source, self.indices, transform, min_size, self.cache, pixels)
            num_workers = resolve_workers(num_workers, len(self.indices))
            # own generator: DataLoader draws worker base seeds (unused here) from the global stream otherwise
            self._dl = DataLoader(ds, batch_sampler=_RankBatches(self), num_workers=num_workers, collate_fn=collate,
                                  pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
                                  generator=torch.Generator().manual_seed(seed))

    @property
    def num_images(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Select the epoch (its order and augmentations); ``start_batch`` skips that many batches without reading
        them, to resume mid-epoch. Stays in effect until the next call."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        """Batches per epoch for this rank (from batch 0; a resumed epoch yields len - start_batch)."""
        n, bs, G = len(self.indices), self.batch_size, self.batch_size * self.world_size
        if self.drop_last:
            return n // G
        return n // G + (n % G > self.rank * bs)

    def _rank_batches(self):
        n, bs = len(self.indices), self.batch_size
        G = bs * self.world_size
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        n_global = n // G if self.drop_last else -(-n // G)
        for b in range(self.start_batch, n_global):
            pos = order[b * G:(b + 1) * G][self.rank * bs:(self.rank + 1) * bs]
            if len(pos):
                yield b, pos

    def _skip(self, name, reason):
        if name not in self.skipped:
            self.skipped[name] = reason
            log.warning("skipping image %s: %s (%d skipped so far)", os.path.join(self.source.root, name), reason,
                        len(self.skipped))

    def _out(self, x, y, idx):
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return (x, y, idx) if self.with_index else (x, y)

    def __iter__(self):
        if not self.batched:
            for x, y, idx, bad in self._dl:
                for name, reason in bad:
                    self._skip(name, reason)
                if x is not None:
                    yield self._out(x, y, idx)
            return
        images, G = self.cache.images, self.batch_size * self.world_size
        H, W = images.shape[2:]
        for b, pos in self._rank_batches():
            # parameters for the whole global batch, then this rank's slice: independent of the rank split
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, b, 1))
            params = self.augment.sample(G, (H, W), g)
            start = self.rank * self.batch_size
            keep = self.cache.valid[pos]
            sel = torch.arange(start, start + len(pos))[keep]
            pos = pos[keep]
            if not len(pos):
                continue
            x = self.augment(images[pos.to(images.device)], {k: v[sel] for k, v in params.items()})
            yield self._out(x, self.labels[pos], torch.tensor([self.indices[k] for k in pos.tolist()]))


def make_loader(source, indices=None, *, batch_size: int, recipe: str = "pretrain", img_size: int = 224,
                aug: str = "rrc", seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = None,
                device="cpu", cache: str = "auto", cache_size: int = None, drop_last: bool = True, shuffle: bool = True,
                min_size: int = 1, with_index: bool = False, streams: int = 0, pixels: PixelSpec = None,
                **transform_kwargs) -> Loader:
    """A deterministic loader over ``source[indices]`` (a source or a path; all images when indices is None).

    recipe/aug/img_size: see :mod:`mimkit.data.transforms`; ``transform_kwargs`` go to the recipe (scale=,
    crop_pct=, or timm's create_transform options for finetune).
    cache: 'auto' decodes everything once into a uint8 tensor when the images share one size (or ``cache_size``
    is given: shorter side resized to it, central crop) and take under 4 GiB; 'on' insists (DataError if it
    cannot), 'off' decodes per image every epoch. Cached pretrain/eval batches are augmented as whole tensors on
    ``device``; finetune (RandAugment) always goes image by image through PIL, from the cache when there is one.
    num_workers: DataLoader workers for the per-image path (default min(8, cpus - 1)); the batched path uses none.
    shuffle=False keeps source order and returns every image (no drop_last), e.g. for feature extraction.
    Files that cannot be decoded, or are smaller than ``min_size``, are skipped, warned about once and listed in
    ``loader.skipped``; so a batch can be smaller than batch_size. with_index=True also yields source indices.
    Tar shards (a :class:`~mimkit.data.shards.ShardSource`) train through ``ShardLoader`` in ``streams`` read
    streams in all (0: processes x workers); see :mod:`mimkit.data.shards`.
    pixels: how files become input (:class:`mimkit.pixels.PixelSpec`: channels, value range, mean/std);
    None is the 8-bit RGB default.
    """
    if not isinstance(source, ImageSource):
        source = open_images(source)
    if shuffle and hasattr(source, "training_loader"):  # tar shards: streamed in order (mimkit.data.shards)
        return source.training_loader(indices, batch_size=batch_size, recipe=recipe, img_size=img_size, aug=aug,
                                      seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                                      device=device, min_size=min_size, with_index=with_index, streams=streams,
                                      **transform_kwargs)
    return Loader(source, indices, batch_size=batch_size, recipe=recipe, img_size=img_size, aug=aug, seed=seed,
                  rank=rank, world_size=world_size, num_workers=num_workers, device=device, cache=cache,
                  cache_size=cache_size, drop_last=drop_last, shuffle=shuffle, min_size=min_size,
                  with_index=with_index, pixels=pixels, **transform_kwargs)


def benchmark_loader(loader, n_batches: int) -> float:
    """Images per second over ``n_batches`` batches, after one warm-up batch (worker start, first decode)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _, batch in zip(range(n_batches), it):
        n += batch[0].shape[0]
    if torch.device(loader.device).type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def fit_images(source, train_idx, num_images: int, img_size: int, pixels: PixelSpec = None) -> torch.Tensor:
    """Up to ``num_images`` normalised training images (``train_idx`` of the opened ``source``, evenly spread over
    it, no augmentation), on the CPU: what palettes and PCA bases are fitted on. Every process gets the same ones."""
    if not train_idx:
        raise DataError(f"--data {getattr(source, 'root', '')}: no training images to fit on")
    step = max(1, len(train_idx) // num_images)
    chosen = train_idx[::step][:num_images]
    loader = make_loader(source, chosen, batch_size=256, recipe="eval", img_size=img_size, shuffle=False,
                         num_workers=0, cache="off", device="cpu", pixels=pixels)
    return torch.cat([images for images, _ in loader])
