"""How a file's values become the model's input: channel count, value range, per-channel mean and std.

A :class:`PixelSpec` says it once per run; pretraining resolves it from the options and a sample of the
training images (:func:`resolve_pixels`), stores it in the encoder's ``arch`` (so checkpoints and exports carry
it) and every later command reads it back from there. Its default is the RGB path exactly: 8-bit files, three
channels, values / 255, ImageNet's mean and std.

Values map to [0, 1] by the range of the file's dtype (uint8 0..255, uint16 0..65535, int16 -32768..32767,
floats 0..1), or by ``--value-range LOW,HIGH``, or by per-channel percentiles of the training images
(``--value-range p1,p99``); an explicit range clips what falls outside it. Mean and std are in those [0, 1]
units, as ImageNet's are.
"""
import logging
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..config import check_pixel_options, parse_floats
from ..errors import BadImage, ConfigError, DataError
from .decode import check_finite, decode_array, read_bytes
from .stats import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD

log = logging.getLogger("mimkit")
PROBE_IMAGES = 64  # files whose channel count and dtype are checked before any work starts
STATS_IMAGES = 500  # training images (evenly spaced) that `auto` statistics and percentile ranges are computed on
PERCENTILE_PIXELS = 65536  # pixels per image (a fixed stride) that percentile ranges look at, to bound memory


@dataclass
class PixelSpec:
    in_chans: int = 3
    dtype: str = "uint8"  # uint8: 8-bit files kept as bytes until the batch (/255); float: decoded to [0, 1] float32
    low: Optional[List[float]] = None  # per channel; None: the range of each file's dtype
    high: Optional[List[float]] = None
    mean: Tuple[float, ...] = MEAN
    std: Tuple[float, ...] = STD

    @property
    def is_rgb8(self) -> bool:
        """The default: 8-bit RGB files on the original decode path (PIL / libjpeg, uint8 caches)."""
        return self.in_chans == 3 and self.dtype == "uint8" and self.low is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = [float(v) for v in self.mean], [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, d: Optional[dict], in_chans: int = 3) -> "PixelSpec":
        """A stored spec; None (RGB checkpoints, foreign files) is the default for ``in_chans`` channels."""
        if not d:
            return default_spec(in_chans)
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def describe(self) -> str:
        rng = "the dtype's range" if self.low is None else f"low {_fmt(self.low)}, high {_fmt(self.high)}"
        return (f"{self.in_chans} channel(s), {self.dtype} files, values to [0, 1] by {rng}; "
                f"mean {_fmt(self.mean)}, std {_fmt(self.std)}")


def default_spec(in_chans: int = 3) -> PixelSpec:
    """RGB: ImageNet's statistics; any other channel count: 0.5 / 0.5 until `auto` or numbers are given."""
    if in_chans == 3:
        return PixelSpec()
    return PixelSpec(in_chans=in_chans, mean=(0.5,) * in_chans, std=(0.5,) * in_chans)


def _fmt(values) -> str:
    return ",".join(f"{v:.6g}" for v in values)


# files -> model input ----------------------------------------------------------------------------------------------
def dtype_range(dtype: np.dtype) -> Tuple[float, float]:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def match_channels(arr: np.ndarray, in_chans: int, name: str) -> np.ndarray:
    """(H, W, C) -> (H, W, in_chans): as is, grey repeated to RGB, or RGB to grey (ITU-R 601 luma, as PIL's
    convert('L'), in integers for 8-bit files); any other count is a BadImage naming the file."""
    c = arr.shape[2]
    if c == in_chans:
        return arr
    if c == 1 and in_chans == 3:
        return np.repeat(arr, 3, axis=2)
    if c == 3 and in_chans == 1:
        if arr.dtype == np.uint8:  # PIL's integer formula, so 8-bit grey matches convert('L') exactly
            r, g, b = (arr[:, :, i].astype(np.uint32) for i in range(3))
            return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, :, None]
        return (arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[:, :, None].astype(np.float32)
    raise BadImage(name, f"has {c} channel(s), the run takes {in_chans} (only 1 <-> 3 convert)")


def to_input(arr: np.ndarray, spec: PixelSpec, name: str) -> torch.Tensor:
    """A decoded file (H, W, C) -> (in_chans, H, W): uint8 on the 8-bit path, else float32 in [0, 1]."""
    if spec.dtype == "uint8":
        if arr.dtype != np.uint8:
            raise BadImage(name, f"is {arr.dtype}, the run reads 8-bit files")
        return torch.from_numpy(np.array(match_channels(arr, spec.in_chans, name).transpose(2, 0, 1)))  # a copy: PIL arrays are read-only
    if spec.low is None:
        lo, hi = dtype_range(arr.dtype)
        if arr.dtype.kind == "f" and (arr.min() < 0 or arr.max() > 1):
            raise BadImage(name, f"float values span [{arr.min():.4g}, {arr.max():.4g}], outside 0..1; pass "
                                 f"--value-range LOW,HIGH or pA,pB")
    else:
        lo, hi = np.asarray(spec.low, np.float32), np.asarray(spec.high, np.float32)
    x = match_channels(arr, spec.in_chans, name).astype(np.float32)
    x = np.clip((x - lo) / (np.asarray(hi, np.float32) - lo), 0, 1)  # an explicit range clips, as asked
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def load_input(source, i: int, spec: PixelSpec) -> torch.Tensor:
    """Read, decode and convert image ``i`` of a source (BadImage for a file that cannot be used)."""
    name = source.names[i]
    return to_input(decode_array(read_bytes(source, i), name), spec, name)


# resolving a run's spec from its options and data -----------------------------------------------------------------
def _evenly(indices, n: int) -> List[int]:
    indices = list(indices)
    return [indices[int(j)] for j in dict.fromkeys(np.linspace(0, len(indices) - 1, min(n, len(indices))).astype(int))]


def _probe(source, indices, n: int):
    """[(index, array)] of ``n`` evenly spaced files that decode (the others are reported by the loader); a file
    that decodes to NaN or infinite values is a DataError naming it."""
    out = []
    for i in _evenly(indices, n):
        try:
            a = decode_array(read_bytes(source, i), source.names[i], finite=False)
        except BadImage:
            continue
        try:
            check_finite(a, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason}") from None
        out.append((i, a))
    return out


def _path(source, i) -> str:
    return os.path.join(source.root, source.names[i])


def resolve_pixels(source, indices, in_chans: int = 0, value_range: str = "", mean: str = "", std: str = "",
                   stats_images: int = STATS_IMAGES) -> PixelSpec:
    """The run's PixelSpec from its options and a sample of ``source[indices]`` (the training images).

    ``in_chans`` 0 takes the channel count from the files when they agree (grey and RGB together read as RGB,
    as always); ``value_range`` '' is the dtype's range; ``mean`` / ``std`` '' are ImageNet's for 3 channels
    and ``auto`` otherwise. Mixed channel counts or dtypes, and files the run cannot take, are one-line
    DataErrors naming a file, raised here, before any training.
    """
    check_pixel_options(in_chans, value_range, mean, std)
    probe = _probe(source, indices, PROBE_IMAGES)
    if not probe:
        return default_spec(in_chans or 3)  # nothing decodes: check_sample names the problem
    counts = {}
    for i, a in probe:
        counts.setdefault(a.shape[2], i)
    if not in_chans:
        if len(counts) == 1:
            in_chans = next(iter(counts))
        elif set(counts) <= {1, 3}:
            in_chans = 3  # grey files among RGB photos become RGB, as they always have
        else:
            (c1, i1), (c2, i2) = list(counts.items())[:2]
            raise DataError(f"{_path(source, i2)}: has {c2} channel(s) but {_path(source, i1)} has {c1}; one run "
                            f"takes one channel count (or pass --in-chans 1 or 3 to convert grey and RGB)")
    for i, a in probe:
        try:
            match_channels(a[:1, :1], in_chans, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason}") from None
    dtypes = {}
    for i, a in probe:
        dtypes.setdefault(a.dtype.str, i)
    if len(dtypes) > 1 and not value_range and in_chans == 3 and all(np.dtype(d).kind == "u" for d in dtypes):
        # a folder of RGB photos with a stray 16-bit PNG: each file maps by its own dtype's range to the same [0, 1]
        # scale, as such folders always have been read (scans and multi-band data, where a stray bit depth means a
        # wrong file, are refused below)
        (d1, i1), (d2, i2) = list(dtypes.items())[:2]
        log.warning("%s is %s but %s is %s: each RGB file is mapped by its own dtype's range", _path(source, i2),
                    np.dtype(d2), _path(source, i1), np.dtype(d1))
    elif len(dtypes) > 1 and not value_range:
        (d1, i1), (d2, i2) = list(dtypes.items())[:2]
        raise DataError(f"{_path(source, i2)}: is {np.dtype(d2)} but {_path(source, i1)} is {np.dtype(d1)}; "
                        f"files of one run share a dtype, or pass --value-range LOW,HIGH to map all alike")
    dtype = "uint8" if set(dtypes) == {np.dtype(np.uint8).str} and not value_range else "float"
    spec = PixelSpec(in_chans=in_chans, dtype=dtype, mean=default_spec(in_chans).mean, std=default_spec(in_chans).std)
    if value_range:
        parts = [p.strip() for p in value_range.split(",")]
        if all(p.lower().startswith("p") for p in parts):
            spec.low, spec.high = _percentiles(source, indices, spec, [float(p[1:]) for p in parts], stats_images)
        else:
            lo, hi = parse_floats(value_range, "--value-range")
            spec.low, spec.high = [lo] * in_chans, [hi] * in_chans
    for i, a in probe:  # dtype and range problems of the sampled files, before training
        try:
            to_input(a, spec, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason}") from None
    if mean == "auto" or std == "auto" or (in_chans != 3 and not (mean and std)):  # what is not given, from data
        m, s = channel_stats(source, _evenly(indices, stats_images), spec)
        spec.mean, spec.std = tuple(m), tuple(s)
        log.info("pixel statistics from %d training images: mean %s, std %s", min(stats_images, len(indices)),
                 _fmt(spec.mean), _fmt(spec.std))
    if mean and mean != "auto":
        spec.mean = tuple(parse_floats(mean, "--mean"))
    if std and std != "auto":
        spec.std = tuple(parse_floats(std, "--std"))
    for name, v in (("--mean", spec.mean), ("--std", spec.std)):
        if len(v) != in_chans:
            raise ConfigError(f"{name} has {len(v)} value(s) but the data has {in_chans} channel(s)")
    return spec


def _inputs(source, indices, spec):
    for i in indices:
        try:
            yield i, load_input(source, i, spec)
        except BadImage:
            continue  # the training loader names it


def channel_stats(source, indices, spec: PixelSpec) -> Tuple[List[float], List[float]]:
    """Per-channel mean and (population) std of the [0, 1] input values over every pixel of ``source[indices]``
    (sums in float64, so they equal numpy's mean/std over the concatenated pixels)."""
    c = spec.in_chans
    s, ss, n = np.zeros(c), np.zeros(c), 0
    for _, x in _inputs(source, indices, spec):
        x = x.double().reshape(c, -1)
        if spec.dtype == "uint8":
            x = x / 255
        s += x.sum(1).numpy()
        ss += (x * x).sum(1).numpy()
        n += x.shape[1]
    if not n:
        raise DataError(f"{source.root}: none of {len(indices)} sampled images decodes; cannot compute statistics")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean ** 2, 0))
    if (std <= 0).any():
        raise DataError(f"{source.root}: channel {int(np.argmin(std))} is constant over {len(indices)} sampled "
                        f"images (std 0); pass --std")
    return mean.tolist(), std.tolist()


def _percentiles(source, indices, spec, q, stats_images):
    """Per-channel percentiles of the raw file values (after channel conversion) of a sample of the images."""
    c, chunks = spec.in_chans, []
    for i in _evenly(indices, stats_images):
        try:
            a = match_channels(decode_array(read_bytes(source, i), source.names[i]), c, source.names[i])
        except BadImage:
            continue
        a = a.reshape(-1, c)
        chunks.append(a[::max(1, len(a) // PERCENTILE_PIXELS)].astype(np.float64))
    if not chunks:
        raise DataError(f"{source.root}: no sampled image decodes; cannot compute --value-range percentiles")
    lo, hi = np.percentile(np.concatenate(chunks), q, axis=0)
    if (hi <= lo).any():
        raise DataError(f"{source.root}: --value-range p{q[0]:g},p{q[1]:g} is empty for channel "
                        f"{int(np.argmax(hi <= lo))} (constant values); pass LOW,HIGH")
    return lo.tolist(), hi.tolist()


def encoder_pixels(arch: dict, in_chans: int) -> PixelSpec:
    """The spec a trained encoder records in its ``arch`` (the default for its channel count when it has none:
    RGB checkpoints, foreign files)."""
    return PixelSpec.from_dict(arch.get("pixels"), in_chans)


def reuse_pixels(stored: PixelSpec, source, indices, in_chans: int = 0, value_range: str = "", mean: str = "",
                 std: str = "") -> PixelSpec:
    """The spec a command that reads a trained encoder uses on ``source[indices]``: the encoder's ``stored`` one,
    with any option given explicitly taking its place (logged); the files are checked against it first (a file
    of another channel count or dtype is a one-line DataError naming it)."""
    if in_chans and in_chans != stored.in_chans:
        raise ConfigError(f"--in-chans {in_chans}: the encoder takes {stored.in_chans} channel(s)")
    if value_range or mean or std:
        spec = resolve_pixels(source, indices, stored.in_chans, value_range,
                              mean or _fmt(stored.mean), std or _fmt(stored.std))
        if not value_range and stored.low is not None:
            spec.dtype, spec.low, spec.high = "float", stored.low, stored.high
        log.info("input: %s (options given here, in place of the encoder's %s)", spec.describe(), stored.describe())
        return spec
    for i, a in _probe(source, indices, PROBE_IMAGES):
        try:
            to_input(a, stored, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason} (the encoder's input: {stored.describe()})") from None
    return stored
