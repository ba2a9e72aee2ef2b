"""Moved: ImageNet's mean and std live in :mod:`mimkit.pixels`; importable from here for code written before."""
from ..pixels import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401
