"""Pixel space: the input normalisation undone and redone (colour targets and iGPT's palette work on [0, 1] pixels).

The data pipeline normalises with ImageNet's statistics, as MAE; timm's constants are the same numbers.
"""
import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGE_MEAN, IMAGENET_DEFAULT_STD as IMAGE_STD

__all__ = ["IMAGE_MEAN", "IMAGE_STD", "to_unit", "from_unit"]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Undo the input normalisation: (B, 3, H, W) in [0, 1]."""
    mean = images.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def from_unit(pixels: torch.Tensor) -> torch.Tensor:
    mean = pixels.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std
