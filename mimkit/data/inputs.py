"""Files to model input: decoding by a :class:`mimkit.pixels.PixelSpec`, and resolving a run's spec from its options
and data.

Pretraining resolves the spec from the options and a sample of the training images (:func:`resolve_pixels`);
every later command reads the encoder's (``encoder.pixels``) and checks the files against it
(:func:`reuse_pixels`), matching its bands to the data's by name where both are named. The spec itself, its
stored form and the normalisation live in :mod:`mimkit.pixels` (the ground floor), so models and checkpoints use
it without the data layer.

Values map to [0, 1] by the range of the file's dtype (uint8 0..255, uint16 0..65535, int16 -32768..32767,
floats 0..1), or by ``--value-range LOW,HIGH``, or by per-channel percentiles of the training images
(``--value-range p1,p99``); an explicit range clips what falls outside it. Mean and std are in those [0, 1]
units, as ImageNet's are. Band names come from ``--band-names`` or the TIFF's band descriptions; ``--bands``
gives the red, green and blue roles.
"""
import logging
import os
from dataclasses import replace
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import BadImage, ConfigError, DataError
from ..pixels import PixelOptions, PixelSpec, default_spec, match_bands, parse_pixel_options, resolve_roles
from .decode import check_finite, decode_array, read_bytes, tiff_band_names

log = logging.getLogger("mimkit")
PROBE_IMAGES = 64  # files whose channel count and dtype are checked before any work starts
STATS_IMAGES = 500  # training images (evenly spaced) that `auto` statistics and percentile ranges are computed on
PERCENTILE_PIXELS = 65536  # pixels per image (a fixed stride) that percentile ranges look at, to bound memory


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


def spec_channels(arr: np.ndarray, spec: PixelSpec, name: str) -> np.ndarray:
    """(H, W, C) -> (H, W, in_chans) in the model's band order (:attr:`PixelSpec.order`), grey/RGB converted."""
    if spec.order is not None:
        if arr.shape[2] != len(spec.order):
            raise BadImage(name, f"has {arr.shape[2]} channel(s), the bands {','.join(spec.band_names or ())} are "
                                 f"{len(spec.order)}")
        arr = arr[:, :, list(spec.order)]
    return match_channels(arr, spec.in_chans, name)


def to_input(arr: np.ndarray, spec: PixelSpec, name: str) -> torch.Tensor:
    """A decoded file (H, W, C) -> (in_chans, H, W): uint8 on the 8-bit path, else float32 in [0, 1]."""
    if spec.dtype == "uint8":
        if arr.dtype != np.uint8:
            raise BadImage(name, f"is {arr.dtype}, the run reads 8-bit files")
        # a copy: PIL arrays are read-only
        return torch.from_numpy(np.array(spec_channels(arr, spec, name).transpose(2, 0, 1)))
    if spec.low is None:
        lo, hi = dtype_range(arr.dtype)
        if arr.dtype.kind == "f" and (arr.min() < 0 or arr.max() > 1):
            raise BadImage(name, f"float values span [{arr.min():.4g}, {arr.max():.4g}], outside 0..1; pass "
                                 f"--value-range LOW,HIGH or pA,pB")
    else:
        lo, hi = np.asarray(spec.low, np.float32), np.asarray(spec.high, np.float32)
    x = spec_channels(arr, spec, name).astype(np.float32)
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
                   stats_images: int = STATS_IMAGES, band_names: str = "", bands: str = "") -> PixelSpec:
    """The run's PixelSpec from its options and a sample of ``source[indices]`` (the training images).

    ``in_chans`` 0 takes the channel count from the files when they agree (grey and RGB together read as RGB,
    as always); ``value_range`` '' is the dtype's range; ``mean`` / ``std`` '' are ImageNet's for 3 channels
    and ``auto`` otherwise; ``band_names`` '' takes the TIFF's band descriptions where present; ``bands`` names
    the red, green and blue roles. Mixed channel counts or dtypes, and files the run cannot take, are one-line
    DataErrors naming a file, raised here, before any training.
    """
    return resolve_spec(source, indices, parse_pixel_options(in_chans, value_range, mean, std, band_names, bands),
                        stats_images)


def resolve_spec(source, indices, opts: PixelOptions, stats_images: int = STATS_IMAGES,
                 order: Optional[Tuple[int, ...]] = None) -> PixelSpec:
    """:func:`resolve_pixels` from parsed options; ``order``: read the file channels in this order first (a
    checkpoint's band order, :func:`reuse_pixels`)."""
    in_chans = opts.in_chans
    probe = _probe(source, indices, PROBE_IMAGES)
    if not probe:
        return default_spec(in_chans or 3)  # nothing decodes: check_sample names the problem
    counts = {}
    for i, a in probe:
        counts.setdefault(a.shape[2], i)
    if order is not None:
        in_chans = len(order)
    elif not in_chans:
        if len(counts) == 1:
            in_chans = next(iter(counts))
        elif set(counts) <= {1, 3}:
            in_chans = 3  # grey files among RGB photos become RGB, as they always have
        else:
            (c1, i1), (c2, i2) = list(counts.items())[:2]
            raise DataError(f"{_path(source, i2)}: has {c2} channel(s) but {_path(source, i1)} has {c1}; one run "
                            f"takes one channel count (or pass --in-chans 1 or 3 to convert grey and RGB)")
    base = PixelSpec(in_chans=in_chans, order=order, mean=default_spec(in_chans).mean, std=default_spec(in_chans).std)
    for i, a in probe:
        try:
            spec_channels(a[:1, :1], base, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason}") from None
    dtypes = {}
    for i, a in probe:
        dtypes.setdefault(a.dtype.str, i)
    if len(dtypes) > 1 and not opts.value_range and in_chans == 3 and all(np.dtype(d).kind == "u" for d in dtypes):
        # a folder of RGB photos with a stray 16-bit PNG: each file maps by its own dtype's range to the same [0, 1]
        # scale, as such folders always have been read (scans and multi-band data, where a stray bit depth means a
        # wrong file, are refused below)
        (d1, i1), (d2, i2) = list(dtypes.items())[:2]
        log.warning("%s is %s but %s is %s: each RGB file is mapped by its own dtype's range", _path(source, i2),
                    np.dtype(d2), _path(source, i1), np.dtype(d1))
    elif len(dtypes) > 1 and not opts.value_range:
        (d1, i1), (d2, i2) = list(dtypes.items())[:2]
        raise DataError(f"{_path(source, i2)}: is {np.dtype(d2)} but {_path(source, i1)} is {np.dtype(d1)}; "
                        f"files of one run share a dtype, or pass --value-range LOW,HIGH to map all alike")
    dtype = "uint8" if set(dtypes) == {np.dtype(np.uint8).str} and not opts.value_range else "float"
    spec = replace(base, dtype=dtype)
    if opts.value_range and opts.value_range[0] == "percentiles":
        lo, hi = _percentiles(source, indices, spec, list(opts.value_range[1:]), stats_images)
        spec = replace(spec, low=tuple(lo), high=tuple(hi))
    elif opts.value_range:
        spec = replace(spec, low=(opts.value_range[1],) * in_chans, high=(opts.value_range[2],) * in_chans)
    for i, a in probe:  # dtype and range problems of the sampled files, before training
        try:
            to_input(a, spec, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason}") from None
    mean, std = opts.mean, opts.std
    if mean == "auto" or std == "auto" or (in_chans != 3 and not (mean and std)):  # what is not given, from data
        m, s = channel_stats(source, _evenly(indices, stats_images), spec)
        spec = replace(spec, mean=tuple(m), std=tuple(s))
        log.info("pixel statistics from %d training images: mean %s, std %s", min(stats_images, len(indices)),
                 _fmt(spec.mean), _fmt(spec.std))
    for name, v in (("--mean", mean), ("--std", std)):
        if isinstance(v, tuple) and len(v) != in_chans:
            raise ConfigError(f"{name} has {len(v)} value(s) but the data has {in_chans} channel(s)")
    spec = replace(spec, mean=mean if isinstance(mean, tuple) else spec.mean,
                   std=std if isinstance(std, tuple) else spec.std)
    if order is not None:
        return spec
    names = opts.band_names or _file_band_names(source, [i for i, _ in probe], in_chans)
    if names and len(names) != in_chans:
        raise ConfigError(f"--band-names names {len(names)} band(s) but the data has {in_chans} channel(s)")
    return replace(spec, band_names=names, rgb=resolve_roles(opts.bands, names, in_chans))


def _file_band_names(source, indices, in_chans: int):
    """The band descriptions of the first of ``indices`` that is a TIFF carrying them (for every band)."""
    for i in indices[:1]:
        try:
            names = tiff_band_names(read_bytes(source, i))
        except BadImage:
            return None
        if names and len(names) == in_chans:
            log.info("band names from the TIFF's band descriptions (%s): %s", _path(source, i), ",".join(names))
            return names
    return None


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
            a = spec_channels(decode_array(read_bytes(source, i), source.names[i]), spec, source.names[i])
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
    """The spec an encoder ``arch`` records (the default for its channel count when it has none). A model carries
    it already: ``encoder.pixels``."""
    return PixelSpec.from_dict(arch.get("pixels"), in_chans)


def reuse_pixels(stored: PixelSpec, source, indices, in_chans: int = 0, value_range: str = "", mean: str = "",
                 std: str = "", band_names: str = "", bands: str = "") -> PixelSpec:
    """The spec a command that reads a trained encoder uses on ``source[indices]``: the encoder's ``stored`` one,
    with any option given explicitly taking its place (logged); the files are checked against it first (a file
    of another channel count or dtype is a one-line DataError naming it).

    Bands meet by name: when the encoder and the data (``band_names``, else the TIFF's band descriptions) both
    name theirs, the data's are read in the encoder's order, and a band set that differs is a DataError naming
    both lists; without names on either side, channels meet by position, with a warning for multi-band data.
    ``bands`` (red,green,blue roles, by name or 1-based data channel) replace the encoder's roles, and for three
    bands without names (an RGB encoder and BGR files) read each band into the encoder's channel of its role."""
    opts = parse_pixel_options(in_chans, value_range, mean, std, band_names, bands)
    if opts.in_chans and opts.in_chans != stored.in_chans:
        raise ConfigError(f"--in-chans {opts.in_chans}: the encoder takes {stored.in_chans} channel(s)")
    data_names = opts.band_names or _file_band_names(source, indices[:1], stored.in_chans)
    order = _band_order(stored, data_names, source.root)
    rgb = stored.rgb
    if opts.bands:  # names: the encoder's (or the data's, the same set); numbers: the data's channels, 1-based
        data_roles = resolve_roles(opts.bands, data_names or stored.band_names, stored.in_chans)
        theirs = stored.rgb or ((0, 1, 2) if stored.in_chans == 3 and not stored.band_names else None)
        if order is None and stored.in_chans == 3 and theirs and tuple(theirs) != data_roles:
            # three bands, all with roles on both sides (an RGB encoder, BGR files): each read into its role's channel
            order = tuple(data_roles[theirs.index(j)] for j in range(3))
            log.info("bands by role: the data's channels %s read as the encoder's red, green, blue",
                     ",".join(str(i + 1) for i in data_roles))
            rgb = stored.rgb
        else:
            rgb = tuple(order.index(i) for i in data_roles) if order else data_roles
    spec = replace(stored, order=order, rgb=rgb)
    if opts.value_range or opts.mean or opts.std:
        given = replace(opts, in_chans=stored.in_chans, mean=opts.mean or stored.mean, std=opts.std or stored.std,
                        band_names=None, bands=None)
        fresh = resolve_spec(source, indices, given, order=order)
        if not opts.value_range and stored.low is not None:
            fresh = replace(fresh, dtype="float", low=stored.low, high=stored.high)
        spec = replace(fresh, order=order, band_names=stored.band_names, rgb=rgb)
        log.info("input: %s (options given here, in place of the encoder's %s)", spec.describe(), stored.describe())
        return spec
    for i, a in _probe(source, indices, PROBE_IMAGES):
        try:
            to_input(a, spec, source.names[i])
        except BadImage as e:
            raise DataError(f"{_path(source, i)}: {e.reason} (the encoder's input: {stored.describe()})") from None
    return spec


def _band_order(stored: PixelSpec, data_names, root) -> Optional[Tuple[int, ...]]:
    """The data channel each of the encoder's bands is read from (None: as they are), by name; see
    :func:`reuse_pixels`."""
    if stored.band_names and data_names:
        try:
            order = match_bands(stored.band_names, data_names)
        except ValueError as e:
            raise DataError(f"{root}: {e}; pass --band-names to name the data's bands") from None
        if order:
            log.info("bands by name: the data's %s read as the checkpoint's %s", ",".join(data_names),
                     ",".join(stored.band_names))
        return order
    if stored.band_names:
        log.warning("the checkpoint's bands are %s; the data names none (--band-names NAMES or TIFF band "
                    "descriptions): channels are read in file order", ",".join(stored.band_names))
    elif data_names:
        log.warning("the data's bands are %s; the checkpoint names none: channels are matched by position",
                    ",".join(data_names))
    elif stored.in_chans not in (1, 3):
        log.warning("%d bands matched to the checkpoint by position: name them (pretrain --band-names) so that "
                    "other data is checked and reordered by name", stored.in_chans)
    return None
