"""Segmentation data: images paired with masks of class ids; the images read exactly as pretraining reads them.

Pairs come from a folder (or archive, or list) of images and a folder of masks matched by relative path and stem
(``a/x.jpg`` <-> ``a/x.png``), a ``.csv`` of ``image,mask`` rows, or a Hugging Face dataset (``hfds:DIR``) with an
image and a mask column. :func:`scan_masks` reads every mask once before training: sizes against their images,
values against the classes, the class count when it is not given, binary 0/255 masks (mapped to 0/1, logged).
:class:`JointAugment` crops, rescales and flips an image and its mask together (nearest for the mask; what falls
outside the image is the ignore index); :class:`PairLoader` serves them to ``engine.fit``.
"""
import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BadImage, ConfigError, DataError
from ..pixels import PixelSpec
from .decode import decode_array, decode_mask, read_bytes
from .hfdata import HFDatasetSource, is_hf_dataset
from .inputs import to_input
from .loader import CACHE_MAX_BYTES, mix_seed, resolve_workers
from .source import ImageSource, name_sort_key, open_images, read_regular_file
from .transforms import resample

log = logging.getLogger("mimkit")
BINARY = (0, 255)


class PathSource(ImageSource):
    """Files named by their paths (a .csv's column), in the given order."""

    def __init__(self, root, paths):
        self.root, self.paths = str(root), list(paths)
        self.names = [os.path.relpath(p, root).replace(os.sep, "/") for p in self.paths]
        self.classes, self.labels = [], [-1] * len(self.paths)

    def read_bytes(self, i):
        return read_regular_file(self.paths[i])


class Pairs:
    """Image ``image_ids[k]`` of ``images`` with mask ``mask_ids[k]`` of ``masks``; sorted by image name."""

    def __init__(self, images: ImageSource, masks: ImageSource, image_ids, mask_ids, fixed_split=None):
        order = sorted(range(len(image_ids)), key=lambda k: name_sort_key(images.names[image_ids[k]]))
        self.images, self.masks = images, masks
        self.image_ids = [image_ids[k] for k in order]
        self.mask_ids = [mask_ids[k] for k in order]
        self.fixed_split = fixed_split  # a Hugging Face dataset's named splits: pair k is row k, never reordered
        if fixed_split is not None:
            self.image_ids, self.mask_ids = list(image_ids), list(mask_ids)

    def __len__(self):
        return len(self.image_ids)

    def name(self, k: int) -> str:
        return self.images.names[self.image_ids[k]]

    def image_path(self, k: int) -> str:
        return os.path.join(self.images.root, self.images.names[self.image_ids[k]])

    def mask_path(self, k: int) -> str:
        return os.path.join(self.masks.root, self.masks.names[self.mask_ids[k]])

    def read_image(self, k: int) -> np.ndarray:
        return decode_array(read_bytes(self.images, self.image_ids[k]), self.image_path(k))

    def read_mask(self, k: int) -> np.ndarray:
        return decode_mask(read_bytes(self.masks, self.mask_ids[k]), self.mask_path(k))


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def open_pairs(data: str, masks: str = "", *, image_column: str = "image", mask_column: str = "mask",
               train_split: str = "train", val_split: str = "auto") -> Pairs:
    """Images and masks as :class:`Pairs`: ``data`` a folder/archive/list with ``masks`` a folder of masks of the same
    relative paths and stems; ``data`` a .csv of image,mask rows; or ``hfds:DIR`` with image and mask columns."""
    if is_hf_dataset(data):
        opts = dict(label_column="", train_split=train_split, val_split=val_split)
        images = HFDatasetSource(data, image_column=image_column, **opts)
        mask_src = HFDatasetSource(data, image_column=mask_column, **opts)
        ids = list(range(len(images)))
        return Pairs(images, mask_src, ids, ids, fixed_split=images.fixed_split)
    if str(data).lower().endswith(".csv") and not masks:
        return _csv_pairs(Path(data))
    if not masks:
        raise ConfigError(f"--masks is required with --data {data}: a folder of masks with the images' relative "
                          f"paths and stems (or give a .csv of image,mask rows, or hfds:DIR)")
    images, mask_src = open_images(data), open_images(masks)
    by_stem = {}
    for j, n in enumerate(mask_src.names):
        if _stem(n) in by_stem:
            raise DataError(f"{masks}: two masks for {_stem(n)}: {mask_src.names[by_stem[_stem(n)]]} and {n}")
        by_stem[_stem(n)] = j
    image_ids, mask_ids, seen = [], [], {}
    for i, n in enumerate(images.names):
        s = _stem(n)
        if s in seen:
            raise DataError(f"{data}: two images for one mask stem {s}: {images.names[seen[s]]} and {n}")
        seen[s] = i
        if s not in by_stem:
            raise DataError(f"{os.path.join(data, n)}: no mask {s}.* in {masks} (masks match images by relative "
                            f"path and stem)")
        image_ids.append(i)
        mask_ids.append(by_stem[s])
    extra = sorted(set(by_stem) - set(seen))
    if extra:
        raise DataError(f"{os.path.join(masks, mask_src.names[by_stem[extra[0]]])}: a mask with no image in {data}"
                        f"{f' ({len(extra)} such masks)' if len(extra) > 1 else ''}")
    return Pairs(images, mask_src, image_ids, mask_ids)


def _csv_pairs(path: Path) -> Pairs:
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r and r[0].strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["image", "mask"]:
        rows = rows[1:]
    base = path.parent
    paths = []
    for n, r in enumerate(rows, 1):
        if len(r) != 2:
            raise DataError(f"{path}: row {n} has {len(r)} fields ({','.join(r)}); expected image,mask")
        pair = [str(Path(c.strip()) if Path(c.strip()).is_absolute() else base / c.strip()) for c in r]
        for p in pair:
            if not os.path.isfile(p):
                raise DataError(f"{path}: row {n} names {p}, which does not exist")
        paths.append(pair)
    if not paths:
        raise DataError(f"{path}: no image,mask rows")
    ids = list(range(len(paths)))
    return Pairs(PathSource(base, [p[0] for p in paths]), PathSource(base, [p[1] for p in paths]), ids, ids)


def split_pairs(pairs: Pairs, val_fraction: float):
    """The fixed held-out split: the last ``val_fraction`` of the pairs in sorted image-name order (a Hugging Face
    dataset's validation split where it has one). Returns (train, val) lists of pair indices."""
    if pairs.fixed_split is not None:
        return pairs.fixed_split
    k = math.floor(len(pairs) * val_fraction + 0.5)
    return list(range(len(pairs) - k)), list(range(len(pairs) - k, len(pairs)))


# reading and checking ---------------------------------------------------------------------------------------------
@dataclass
class MaskInfo:
    num_classes: int
    names: List[str]
    ignore_index: int
    binary: bool = False  # masks stored as 0/255: 255 read as class 1
    counts: Optional[np.ndarray] = None  # pixels per class over the scanned masks
    cache: dict = field(default_factory=dict)  # pair index -> (input tensor, mask tensor), when they fit

    def convert(self, mask: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(mask)
        if self.binary:
            m = torch.where(m == 255, 1, m)
        return m.to(torch.int16 if self.num_classes < 32767 and abs(self.ignore_index) < 32767 else torch.int32)


def read_class_names(path: str) -> List[str]:
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the class names ({e})") from None
    if not names:
        raise DataError(f"{path}: no class names (one a line)")
    return names


def scan_masks(pairs: Pairs, indices, spec: PixelSpec, *, classes: int = 0, class_names: str = "",
               ignore_index: int = 255, binary: Optional[bool] = None, keep: bool = True) -> MaskInfo:
    """Read every pair of ``indices`` once, before training: a one-line DataError for a mask whose size differs
    from its image's, a mask value outside the classes (not ``ignore_index``), an unreadable file; the class count
    from ``classes``, the names file, or the largest value + 1. Masks holding only 0 and 255 (the usual way to
    store binary masks) are read as 0/1 with a log line rather than losing their foreground to the ignore index; with
    a class count other than 2 given they are refused, saying how. ``binary`` forces the choice (a trained
    model's). The decoded pairs are kept in memory (``MaskInfo.cache``) when they fit."""
    names = read_class_names(class_names) if class_names else []
    if names and classes and len(names) != classes:
        raise ConfigError(f"--classes {classes} but {class_names} names {len(names)} classes")
    seen, first, sizes, budget = set(), {}, 0, CACHE_MAX_BYTES if keep else 0
    cache = {}
    for n, k in enumerate(indices):
        try:
            image, mask = pairs.read_image(k), pairs.read_mask(k)
        except BadImage as e:
            raise DataError(f"{e.name}: {e.reason}") from None
        if image.shape[:2] != mask.shape:
            raise DataError(f"{pairs.mask_path(k)}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                            f"{pairs.image_path(k)} is {image.shape[1]}x{image.shape[0]}")
        for v in np.unique(mask).tolist():
            if v not in seen:
                seen.add(v)
                first[v] = k
        if budget:
            x = to_input(image, spec, pairs.image_path(k))
            sizes += x.numel() * x.element_size() + mask.size * 2
            if sizes > budget:
                log.info("the pairs do not fit in %.1f GB: each step decodes its images again", budget / 1024 ** 3)
                cache, budget = {}, 0
            else:
                cache[k] = (x, mask)
        if (n + 1) % 5000 == 0:
            log.info("masks: %d/%d read", n + 1, len(indices))
    if binary is None:
        binary = seen <= set(BINARY) and 255 in seen and ignore_index == 255 and classes in (0, 2) \
            and len(names) in (0, 2)
    if not binary and seen == set(BINARY) and ignore_index == 255:  # never lose a foreground to the ignore index
        raise DataError(f"{pairs.masks.root}: the masks hold only 0 and 255, so with --ignore-index 255 there is "
                        f"nothing but class 0 to learn; for binary masks saved as 0/255 leave --classes out (or give "
                        f"2): 255 is then read as class 1")
    if binary:
        log.warning("masks hold only the values 0 and 255 (binary masks): 255 is read as class 1 (foreground), not "
                    "as the ignore index")
        seen = {1 if v == 255 else v for v in seen}
        first = {(1 if v == 255 else v): k for v, k in first.items()}
    values = sorted(v for v in seen if v != ignore_index)
    if not values:
        raise DataError(f"{pairs.masks.root}: the masks hold only the ignore index {ignore_index}")
    if values[0] < 0:
        raise DataError(f"{pairs.mask_path(first[values[0]])}: holds the negative value {values[0]}; class ids are "
                        f">= 0 (or --ignore-index)")
    num = classes or len(names) or values[-1] + 1
    if values[-1] >= num:
        raise DataError(f"{pairs.mask_path(first[values[-1]])}: holds the value {values[-1]}, outside the {num} "
                        f"classes 0..{num - 1} and not the ignore index {ignore_index} (--classes, --class-names, "
                        f"--ignore-index)")
    info = MaskInfo(num, names or [str(c) for c in range(num)], ignore_index, bool(binary))
    info.cache = {k: (x, info.convert(m)) for k, (x, m) in cache.items()}
    return info


def check_model_classes(info_classes: int, model_classes: int, where: str):
    if info_classes != model_classes:
        raise ConfigError(f"{where}: the trained model predicts {model_classes} classes but --classes is "
                          f"{info_classes}")


# augmentation and batches -----------------------------------------------------------------------------------------
def normalise(x: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """A decoded input (uint8, or float in [0, 1]) -> the model's normalised float input, (..., C, H, W)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


class JointAugment:
    """One image and its mask, cropped, rescaled and flipped together, as mmsegmentation's training pipeline
    (random rescale by ``resize_range``, random crop of ``size``, flip; the paper's ADE20K setup): one crop box in
    the image's own pixels resamples the image (bicubic, as pretraining's crops) and the mask (nearest) at the same
    positions, so they stay aligned; what falls outside the image is padded (0 for the image, the ignore index for
    the mask). Our own code: torchvision's v2 transforms take a mask but neither a box reaching outside the image
    nor a custom pad value for the mask when the image is not 3-channel."""

    def __init__(self, size: int, spec: PixelSpec, ignore_index: int, resize_range=(0.5, 2.0)):
        self.size, self.spec, self.ignore, self.range = size, spec, ignore_index, resize_range

    def sample(self, hw, g: torch.Generator):
        H, W = hw
        u = torch.rand(4, generator=g, dtype=torch.float64)
        lo, hi = self.range
        side = self.size / (lo + (hi - lo) * float(u[0]))  # source pixels the crop covers
        top, left = (H - side) * float(u[1]), (W - side) * float(u[2])  # inside, or the image inside the crop
        return torch.tensor([[top, left, side, side]], dtype=torch.float32), torch.tensor([bool(u[3] < 0.5)])

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, g: torch.Generator):
        box, flip = self.sample(mask.shape, g)
        byte = x.dtype == torch.uint8
        xi = resample(x[None].float(), box, flip, self.size, "zeros")[0]
        xi = xi.clamp_(0, 255).div_(255) if byte else xi.clamp_(0, 1)  # bicubic overshoots
        mi = resample((mask[None, None].float() + 1), box, flip, self.size, "zeros", mode="nearest")[0, 0].long() - 1
        mi[mi < 0] = self.ignore  # outside the image (stored values are >= 0)
        return normalise(xi, self.spec), mi


class _PairSet(Dataset):
    def __init__(self, pairs: Pairs, spec: PixelSpec, info: MaskInfo, augment: Optional[JointAugment], seed: int):
        self.pairs, self.spec, self.info, self.augment, self.seed = pairs, spec, info, augment, seed

    def load(self, k: int):
        if k in self.info.cache:
            return self.info.cache[k]
        try:
            x = to_input(self.pairs.read_image(k), self.spec, self.pairs.image_path(k))
            m = self.pairs.read_mask(k)
        except BadImage as e:
            raise DataError(f"{e.name}: {e.reason}") from None
        if tuple(x.shape[1:]) != m.shape:
            raise DataError(f"{self.pairs.mask_path(k)}: mask is {m.shape[1]}x{m.shape[0]} but its image is "
                            f"{x.shape[2]}x{x.shape[1]}")
        return x, self.info.convert(m)

    def __getitem__(self, key):
        k, epoch = key
        x, m = self.load(k)
        if self.augment is None:
            return normalise(x, self.spec), m.long()
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, k))  # the same crop on any resume or rank
        return self.augment(x, m.long(), g)

    def __len__(self):
        return len(self.pairs)


def _stack(items):
    return torch.stack([x for x, _ in items]), torch.stack([m for _, m in items])


class PairLoader:
    """Augmented (images, masks) batches for ``engine.fit``: each epoch a permutation drawn from (seed, epoch), each
    process its share of every global batch, incomplete last batches dropped; ``set_epoch(epoch, start_batch)``
    resumes mid-epoch, ``num_images``, ``skipped``."""

    def __init__(self, pairs: Pairs, indices, spec: PixelSpec, info: MaskInfo, augment: JointAugment, *,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = -1):
        self.indices, self.batch_size, self.seed = list(indices), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.dataset = _PairSet(pairs, spec, info, augment, seed)
        self.num_images = len(self.indices)
        self.workers = resolve_workers(num_workers, self.num_images)
        self.skipped = {}
        self.epoch, self.start_batch = 0, 0

    def __len__(self):
        return self.num_images // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = [self.indices[j] for j in torch.randperm(self.num_images, generator=g).tolist()]
        glob = self.batch_size * self.world_size
        batches = [[(k, self.epoch) for k in order[b * glob + self.rank * self.batch_size:
                                                    b * glob + (self.rank + 1) * self.batch_size]]
                   for b in range(self.start_batch, len(self))]
        return iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_stack,
                               persistent_workers=False))


def eval_items(pairs: Pairs, indices, spec: PixelSpec, info: MaskInfo):
    """(pair index, normalised image (C, H, W), mask (H, W) int64) of every pair, in order, unaugmented."""
    data = _PairSet(pairs, spec, info, None, 0)
    for k in indices:
        x, m = data[(k, 0)]
        yield k, x, m
