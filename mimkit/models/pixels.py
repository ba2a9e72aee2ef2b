"""Moved: the input normalisation and its inverse are the run's pixel spec's (``mimkit.pixels.PixelSpec.normalize`` /
``denormalize``; a model's spec is ``encoder.pixels``), not ImageNet's fixed numbers."""
from ..pixels import IMAGENET_MEAN as IMAGE_MEAN, IMAGENET_STD as IMAGE_STD  # noqa: F401

_MOVED = {"to_unit": "denormalize", "from_unit": "normalize"}


def __getattr__(name):
    if name in _MOVED:
        raise ImportError(f"mimkit.models.pixels.{name} is gone: use the run's pixel spec, "
                          f"mimkit.pixels.PixelSpec.{_MOVED[name]} (a model's: encoder.pixels.{_MOVED[name]}), "
                          f"which undoes the statistics the run used (PixelSpec() is ImageNet's)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
