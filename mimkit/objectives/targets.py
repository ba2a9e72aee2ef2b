"""What the lineage objectives predict, computed without gradient from the input batch: pixel targets from the
normalised batch, colour targets from true [0, 1] pixels (the batch back through the run's pixel spec,
``encoder.pixels.denormalize``: the one inverse of the input normalisation).

- ``pixel_target``: MAE's patches of pixels, optionally normalised per patch (``models.normalize_patches``,
  the one MAE's own loss uses);
- ``PCATarget``: whitened coefficients of the largest principal components of patch pixels (MAE Table 1);
- ``mean_colour_classes`` / ``mosaic_classes``: the ViT paper's 3-bit colour targets;
- iGPT's palette pixels: ``Palette`` lives in :mod:`mimkit.models.igpt` (its centres are part of iGPT's network).

Masks live in :mod:`mimkit.masking`; the encoder factory and mask-token encoding in :mod:`.base`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import normalize_patches, patchify

__all__ = ["pixel_target", "quantize", "mean_colour_classes", "mosaic_classes", "PCATarget"]


# pixels -------------------------------------------------------------------------------------------
def pixel_target(images: torch.Tensor, patch: int, normalize: bool) -> torch.Tensor:
    """(B, L, p*p*3) patches; with ``normalize`` each patch by its own mean and (unbiased) variance, as MAE."""
    t = patchify(images.float(), patch)
    return normalize_patches(t) if normalize else t


def quantize(unit: torch.Tensor, bits: int) -> torch.Tensor:
    """[0, 1] values to integer levels 0 .. 2**bits - 1 (equal-width bins)."""
    levels = 2 ** bits
    return (unit * levels).floor().clamp_(0, levels - 1).long()


def mean_colour_classes(unit: torch.Tensor, patch: int, bits: int = 3) -> torch.Tensor:
    """The ViT paper's first target: each patch's mean colour at ``bits`` per channel, one class of
    2**(3*bits) (512 for 3 bits), numbered r * 64 + g * 8 + b. ``unit``: (B, 3, H, W) pixels in [0, 1]. (B, L) long."""
    mean = F.avg_pool2d(unit, patch)  # (B, 3, gh, gw)
    q = quantize(mean, bits)
    levels = 2 ** bits
    cls = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    return cls.flatten(1)


def mosaic_classes(unit: torch.Tensor, patch: int, size: int = 4, bits: int = 3) -> torch.Tensor:
    """The ViT paper's second target: each patch downsized to ``size`` x ``size`` at ``bits`` per channel,
    (B, L, size*size*3) levels in (row, col, channel) order, each predicted as one of 2**bits classes.
    ``unit``: (B, 3, H, W) pixels in [0, 1]."""
    if patch % size:
        raise ValueError(f"the mosaic size {size} must divide the patch size {patch}")
    small = F.avg_pool2d(unit, patch // size)  # (B, 3, gh*size, gw*size)
    return patchify(quantize(small, bits), size)


class PCATarget(nn.Module):
    """Whitened coefficients of the ``k`` largest principal components of (B, L, D) patch vectors.

    Fitted once on patches of the training data; the basis is kept as buffers so a checkpoint holds it.
    """

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(k, dim))  # rows: principal directions
        self.register_buffer("scale", torch.ones(k))  # 1 / sqrt(eigenvalue)

    @torch.no_grad()
    def fit(self, patches: torch.Tensor) -> "PCATarget":
        x = patches.reshape(-1, patches.shape[-1]).double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = evals.argsort(descending=True)[:self.k]
        self.mean.copy_(mean.float())
        self.components.copy_(evecs[:, order].T.float())
        self.scale.copy_(evals[order].clamp_min(1e-8).rsqrt().float())
        return self

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        with torch.autocast(patches.device.type, enabled=False):  # a target: full precision
            return ((patches.float() - self.mean) @ self.components.T) * self.scale
