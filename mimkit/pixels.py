"""The pixel spec: how a file's values become the model's input, in one object every layer can import.

A :class:`PixelSpec` says, once per run: the channel count, the file dtype path (8-bit bytes or floats), the value
range that maps to [0, 1], the per-channel mean and std the input is normalised with, the bands' names and which
bands play red, green and blue (for figures and for starting from RGB weights). Pretraining resolves it from the
options and the data (:mod:`mimkit.data.inputs`), the encoder carries it (``encoder.pixels``; its ``arch["pixels"]``
is :meth:`PixelSpec.to_dict`), checkpoints and exports store that dict, and every later command reads it back.
:meth:`normalize` / :meth:`denormalize` are the one way between [0, 1] pixels and model input, for colour targets,
palettes and figures alike. The default is the 8-bit RGB path exactly: values / 255, ImageNet's mean and std.

The options that build a spec (``--in-chans --value-range --mean --std --band-names --bands``) are parsed here
too (:func:`parse_pixel_options`), for the config's checks and for the data layer's resolution alike.
"""
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

from .errors import ConfigError

if TYPE_CHECKING:  # the spec itself needs no torch: config imports it
    import torch

# the one home of ImageNet's statistics (MAE's and timm's numbers: timm.data.IMAGENET_DEFAULT_MEAN / _STD)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Floats = Tuple[float, ...]


@dataclass(frozen=True)
class PixelSpec:
    in_chans: int = 3
    dtype: str = "uint8"  # uint8: 8-bit files kept as bytes until the batch (/255); float: decoded to [0, 1] float32
    low: Optional[Floats] = None  # per channel; None: the range of each file's dtype
    high: Optional[Floats] = None
    mean: Floats = IMAGENET_MEAN  # in [0, 1] units, as ImageNet's are
    std: Floats = IMAGENET_STD
    band_names: Optional[Tuple[str, ...]] = None  # one per channel, in the model's order; None: unnamed
    rgb: Optional[Tuple[int, int, int]] = None  # 0-based channels playing red, green, blue; None: not given
    order: Optional[Tuple[int, ...]] = None  # the file channel each input channel is read from (None: in order)

    def __post_init__(self):
        for name, t in (("low", float), ("high", float), ("mean", float), ("std", float), ("band_names", str),
                        ("rgb", int), ("order", int)):  # lists (YAML, JSON, callers) become tuples
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(t(x) for x in v))
        c = self.in_chans
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"in_chans must be a positive integer, got {c!r}")
        if self.dtype not in ("uint8", "float"):
            raise ValueError(f"dtype must be uint8 or float, got {self.dtype!r}")
        for name in ("low", "high", "mean", "std", "band_names", "order"):
            v = getattr(self, name)
            if v is not None and len(v) != c:
                raise ValueError(f"{name} has {len(v)} value(s) for {c} channel(s)")
        if (self.low is None) != (self.high is None):
            raise ValueError("low and high go together")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be > 0, got {list(self.std)}")
        if self.band_names is not None and len(set(self.band_names)) != c:
            raise ValueError(f"band names repeat: {','.join(self.band_names)}")
        if self.rgb is not None and (len(self.rgb) != 3 or len(set(self.rgb)) != 3
                                     or not all(0 <= i < c for i in self.rgb)):
            raise ValueError(f"rgb must be three different channels in 0..{c - 1}, got {list(self.rgb)}")

    @property
    def is_rgb8(self) -> bool:
        """The default path: 8-bit RGB files decoded by PIL / libjpeg into uint8 caches, channels in file order."""
        return self.in_chans == 3 and self.dtype == "uint8" and self.low is None and self.order is None

    # stored form -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain lists and numbers (YAML, JSON, a checkpoint's arch); the fields added after the first format
        (band_names, rgb, order) only when set, so RGB runs record what they always did."""
        d = {}
        for k, v in asdict(self).items():
            if k in ("band_names", "rgb", "order") and v is None:
                continue
            d[k] = None if v is None else ([float(x) for x in v] if k in ("low", "high", "mean", "std") else
                                           (list(v) if isinstance(v, tuple) else v))
        return d

    @classmethod
    def from_dict(cls, d, in_chans: int = 3) -> "PixelSpec":
        """A stored spec (``arch["pixels"]``, config.yaml's ``pixels``, an export's ``mimkit_pixels``); None or {}
        (RGB checkpoints, foreign files) is the default for ``in_chans`` channels. A spec passes through."""
        if isinstance(d, PixelSpec):
            return d
        if not d:
            return default_spec(in_chans)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown pixel spec key(s) {', '.join(unknown)}")
        return cls(**d)

    # numbers -----------------------------------------------------------------------------------------------------
    def normalize(self, unit: "torch.Tensor") -> "torch.Tensor":
        """(B, C, H, W) [0, 1] pixels -> model input."""
        mean = unit.new_tensor(self.mean).view(1, -1, 1, 1)
        std = unit.new_tensor(self.std).view(1, -1, 1, 1)
        return (unit - mean) / std

    def denormalize(self, images: "torch.Tensor") -> "torch.Tensor":
        """Model input (B, C, H, W) -> [0, 1] pixels (float32, clamped): the one inverse of the input
        normalisation, used by every colour target, palette and figure."""
        x = images.float()
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def display_channels(self) -> Tuple[int, ...]:
        """The channels shown as red, green, blue: the RGB roles where given, else the first three (one channel:
        grey)."""
        return self.rgb or tuple(min(i, self.in_chans - 1) for i in range(3))

    # words -------------------------------------------------------------------------------------------------------
    def band(self, i: int) -> str:
        """Channel ``i`` by name where named, else 1-based number."""
        return self.band_names[i] if self.band_names else f"band {i + 1}"

    def describe(self) -> str:
        rng = "the dtype's range" if self.low is None else f"low {_fmt(self.low)}, high {_fmt(self.high)}"
        text = (f"{self.in_chans} channel(s), {self.dtype} files, values to [0, 1] by {rng}; "
                f"mean {_fmt(self.mean)}, std {_fmt(self.std)}")
        if self.band_names:
            text += f"; bands {','.join(self.band_names)}"
        if self.rgb:
            text += f"; red,green,blue = {','.join(self.band(i) for i in self.rgb)}"
        if self.order:
            text += f"; read from file channels {','.join(str(i + 1) for i in self.order)}"
        return text


def default_spec(in_chans: int = 3) -> PixelSpec:
    """RGB: ImageNet's statistics; any other channel count: 0.5 / 0.5 until `auto` or numbers are given."""
    if in_chans == 3:
        return PixelSpec()
    return PixelSpec(in_chans=in_chans, mean=(0.5,) * in_chans, std=(0.5,) * in_chans)


def _fmt(values) -> str:
    return ",".join(f"{v:.6g}" for v in values)


# options -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelOptions:
    """``--in-chans --value-range --mean --std --band-names --bands`` parsed: what the data layer resolves a spec
    from. ``value_range``: None (the dtype's), ("values", lo, hi) or ("percentiles", a, b); ``mean`` / ``std``:
    None (the default), "auto" or a tuple; ``bands``: three names or 1-based numbers, as given."""
    in_chans: int = 0
    value_range: Optional[tuple] = None
    mean: object = None
    std: object = None
    band_names: Optional[Tuple[str, ...]] = None
    bands: Optional[Tuple[str, str, str]] = None


def parse_floats(text: str, option: str) -> list:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{option} must be finite comma-separated numbers, got {text!r}")
    return values


def parse_band_names(text: str, option: str = "--band-names") -> Optional[Tuple[str, ...]]:
    """``B02,B03,B04,B08``, or ``@FILE`` naming a file of names (comma- or line-separated); '' : none."""
    if not text:
        return None
    if text.startswith("@"):
        path = os.path.expanduser(text[1:])
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().replace("\n", ",")
        except OSError as e:
            raise ConfigError(f"{option} {text}: cannot read {path} ({e.strerror or e})") from None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError(f"{option}: no band names in {text!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{option}: band name(s) {', '.join(dup)} repeat")
    return names


def parse_pixel_options(in_chans: int = 0, value_range: str = "", mean: str = "", std: str = "",
                        band_names: str = "", bands: str = "") -> PixelOptions:
    """One-line ConfigErrors for the options alone, before any file is read; the parsed values otherwise."""
    if in_chans < 0:
        raise ConfigError(f"--in-chans must be >= 0 (0: from the data), got {in_chans}")
    vr = None
    if value_range:
        parts = [p.strip() for p in str(value_range).split(",")]
        if len(parts) != 2:
            raise ConfigError(f"--value-range must be LOW,HIGH or pA,pB (percentiles), got {value_range!r}")
        if all(p.lower().startswith("p") for p in parts):
            a, b = parse_floats(",".join(p[1:] for p in parts), "--value-range")
            if not 0 <= a < b <= 100:
                raise ConfigError(f"--value-range percentiles must satisfy 0 <= A < B <= 100, got {value_range!r}")
            vr = ("percentiles", a, b)
        else:
            lo, hi = parse_floats(value_range, "--value-range")
            if not lo < hi:
                raise ConfigError(f"--value-range needs LOW < HIGH, got {value_range!r}")
            vr = ("values", lo, hi)
    stats = {}
    for name, text in (("--mean", mean), ("--std", std)):
        stats[name] = text or None
        if text and text != "auto":
            values = parse_floats(text, name)
            if in_chans and len(values) != in_chans:
                raise ConfigError(f"{name} has {len(values)} value(s) but --in-chans is {in_chans}")
            if name == "--std" and min(values) <= 0:
                raise ConfigError(f"--std values must be > 0, got {text!r}")
            stats[name] = tuple(values)
    names = parse_band_names(band_names)
    if names and in_chans and len(names) != in_chans:
        raise ConfigError(f"--band-names names {len(names)} band(s) but --in-chans is {in_chans}")
    roles = None
    if bands:
        roles = tuple(b.strip() for b in str(bands).split(","))
        if len(roles) != 3 or not all(roles) or len(set(roles)) != 3:
            raise ConfigError(f"--bands must be three different bands for red,green,blue, by name or 1-based "
                              f"number (e.g. B04,B03,B02 or 3,2,1); got {bands!r}")
    return PixelOptions(in_chans, vr, stats["--mean"], stats["--std"], names, roles)


def resolve_roles(bands: Optional[Sequence[str]], names: Optional[Sequence[str]], in_chans: int,
                  option: str = "--bands") -> Optional[Tuple[int, int, int]]:
    """``--bands`` (three band names, or 1-based numbers where a part names no band) -> 0-based channels."""
    if not bands:
        return None
    out = []
    for b in bands:
        if names and b in names:
            out.append(list(names).index(b))
        elif b.isdigit() and 1 <= int(b) <= in_chans:
            out.append(int(b) - 1)
        else:
            known = f"the bands {','.join(names)} or " if names else ""
            raise ConfigError(f"{option} {','.join(bands)}: {b!r} is not one of {known}1..{in_chans}")
    if len(set(out)) != 3:
        raise ConfigError(f"{option} {','.join(bands)}: three different bands are needed")
    return tuple(out)


def match_bands(want: Sequence[str], have: Sequence[str], labels=("the checkpoint's", "the data's")
                ) -> Optional[Tuple[int, ...]]:
    """Where each band of ``want`` is in ``have`` (None: already in order); a ValueError naming both lists (as
    ``labels``: whose is ``want``, whose ``have``) when they are not the same set."""
    want, have = list(want), list(have)
    if want == have:
        return None
    if sorted(want) != sorted(have):
        raise ValueError(f"{labels[0]} bands {','.join(want)} do not match {labels[1]} {','.join(have)}")
    return tuple(have.index(n) for n in want)
