"""Moved: the spec is :mod:`mimkit.pixels` (``PixelSpec``, ``default_spec``), reading files by it is
:mod:`mimkit.data.inputs`. These names stay importable from here for code written before."""
from ..pixels import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD, PixelSpec, default_spec  # noqa: F401
from .inputs import (channel_stats, dtype_range, encoder_pixels, load_input, match_channels,  # noqa: F401
                     resolve_pixels, reuse_pixels, to_input)

__all__ = ["MEAN", "STD", "PixelSpec", "default_spec", "channel_stats", "dtype_range", "encoder_pixels", "load_input",
           "match_channels", "resolve_pixels", "reuse_pixels", "to_input"]
