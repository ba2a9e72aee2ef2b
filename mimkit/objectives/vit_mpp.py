"""ViT's masked patch prediction (Dosovitskiy et al. 2020, appendix B.1.2), BERT-style on patches.

Corrupt half of the patches: of those, 80% get a learned mask embedding, 10% the embedding of
another random patch (from any image of the batch), 10% stay as they are. The encoder sees the
full sequence; a linear head predicts, for every corrupted patch, one of three targets:

- ``mean_colour``: its mean colour at 3 bits per channel, one of 512 classes (the paper's best);
- ``mosaic``: a 4x4 downsized version at 3 bits per channel, 48 predictions of 8 classes;
- ``pixels``: all its pixels, regressed with L2.

objective_args: ``target``; ``mask_ratio`` (share corrupted; default ``--mask-ratio``, else 0.5); ``mask_prob`` (0.8) and
``random_prob`` (0.1) of the corrupted; ``bits`` (3); ``mosaic_size`` (4, must divide the patch size).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import opt
from ..errors import ConfigError
from ..masking import random_masking, uniform
from ..models import MaskedViT
from .base import MaskTokenObjective, ObjectiveOptions, check_fraction, check_positive, make_encoder, masked_mean, \
    patch_grid, require_rgb, resolve_mask_ratio
from .targets import mean_colour_classes, mosaic_classes, pixel_target

TARGETS = ("mean_colour", "mosaic", "pixels")


@dataclass
class ViTMPPOptions(ObjectiveOptions):
    target: str = opt("mean_colour", "mean_colour (512 classes, the paper's best) | mosaic (4x4 at 3 bits) | pixels",
                      list(TARGETS))
    mask_ratio: Optional[float] = opt(None, "share of patches corrupted (default: --mask-ratio, else the paper's 0.5)")
    mask_prob: float = opt(0.8, "of the corrupted: share given the mask embedding")
    random_prob: float = opt(0.1, "of the corrupted: share given another random patch's embedding")
    bits: int = opt(3, "bits per colour channel of the targets")
    mosaic_size: int = opt(4, "target mosaic: side of the downsized patch (must divide the patch size)")

    def validate(self):
        check_fraction(self, "mask_ratio")
        for key in ("mask_prob", "random_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.mask_prob + self.random_prob > 1:
            raise ConfigError("mask_prob + random_prob must be <= 1")
        check_positive(self, "bits", "mosaic_size")


# what each patch gets: kept as is, the mask embedding, another random patch's embedding
KEEP, MASK, RANDOM = 0, 1, 2


def corrupt(u_select: torch.Tensor, u_kind: torch.Tensor, ratio: float, mask_prob: float, random_prob: float):
    """From (B, L) uniform noise: ``corrupted`` (B, L) bool, exactly the ``ratio`` share per image, and
    ``kind`` (B, L) long in {KEEP, MASK, RANDOM}, drawn per corrupted patch with probabilities
    (1 - mask_prob - random_prob, mask_prob, random_prob); KEEP for the untouched patches."""
    corrupted = random_masking(*u_select.shape, ratio, noise=u_select).mask
    kind = torch.where(u_kind < mask_prob, MASK, torch.where(u_kind < mask_prob + random_prob, RANDOM, KEEP))
    return corrupted, torch.where(corrupted, kind, KEEP)


class ViTMPPObjective(MaskTokenObjective):
    name = "vit_mpp"
    description = "ViT's masked patch prediction (Dosovitskiy et al. 2020): BERT-style corruption, 3-bit colour targets"
    paper_mask_ratio = 0.5
    Options = ViTMPPOptions

    def __init__(self, encoder: MaskedViT, target: str = "mean_colour", mask_ratio: float = 0.5,
                 mask_prob: float = 0.8, random_prob: float = 0.1, bits: int = 3, mosaic_size: int = 4):
        p = encoder.patch_size
        out = {"mean_colour": 2 ** (3 * bits), "mosaic": mosaic_size ** 2 * 3 * 2 ** bits,
               "pixels": p * p * encoder.in_chans}[target]
        super().__init__(encoder, out)
        self.arch = dict(encoder=dict(encoder.arch), target=target, mask_ratio=mask_ratio, mask_prob=mask_prob,
                         random_prob=random_prob, bits=bits, mosaic_size=mosaic_size)
        self.target, self.mask_ratio, self.mask_prob, self.random_prob = target, mask_ratio, mask_prob, random_prob
        self.bits, self.mosaic_size = bits, mosaic_size

    @classmethod
    def from_config(cls, cfg, options: ViTMPPOptions) -> "ViTMPPObjective":
        ratio = resolve_mask_ratio(cfg, options.mask_ratio, cls.paper_mask_ratio)
        encoder = make_encoder(cfg)
        if options.target != "pixels":
            require_rgb(encoder.in_chans, f"--objective-args: target {options.target} of objective vit_mpp",
                        "an RGB colour class", ": use target: pixels")
        if options.target == "mosaic" and encoder.patch_size % options.mosaic_size:
            raise ConfigError(f"--objective-args: mosaic_size {options.mosaic_size} must divide the patch size "
                              f"{encoder.patch_size} of {cfg.model}")
        return cls(encoder, target=options.target, mask_ratio=ratio, mask_prob=options.mask_prob,
                   random_prob=options.random_prob, bits=options.bits, mosaic_size=options.mosaic_size)

    def corrupt_tokens(self, tokens: torch.Tensor, rng=None):
        """(B, L, D) patch embeddings -> corrupted embeddings, the (B, L) corrupted mask and the (B, L) kinds."""
        b, n, d = tokens.shape
        u = uniform(rng, b, n, 3, device=tokens.device)
        corrupted, kind = corrupt(u[..., 0], u[..., 1], self.mask_ratio, self.mask_prob, self.random_prob)
        # another patch: any position of any image in the batch, except this very one
        flat = tokens.reshape(b * n, d)
        src = (u[..., 2] * (b * n - 1)).long().clamp_(max=b * n - 2)
        own = torch.arange(b * n, device=tokens.device).view(b, n)
        src = src + (src >= own).long()
        out = torch.where((kind == MASK)[..., None], self.mask_token.to(tokens.dtype), tokens)
        out = torch.where((kind == RANDOM)[..., None], flat[src.flatten()].view(b, n, d), out)
        return out, corrupted, kind

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        p = self.encoder.patch_size
        if self.target == "pixels":
            return pixel_target(images, p, normalize=False)
        unit = self.encoder.pixels.denormalize(images)  # colours on the true pixels, by the run's statistics
        if self.target == "mean_colour":
            return mean_colour_classes(unit, p, self.bits)
        return mosaic_classes(unit, p, self.mosaic_size, self.bits)

    def forward(self, images, labels=None, rng=None):
        p = self.encoder.patch_size
        grid = patch_grid(images, p)
        tokens, corrupted, _ = self.corrupt_tokens(self.encoder.patch_tokens(images), rng)
        pred = self.head(self.encoder.forward_tokens(tokens, grid_hw=grid)[:, 1:]).float()
        with torch.no_grad():
            target = self.targets(images)
        if self.target == "mean_colour":
            per = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        elif self.target == "mosaic":
            levels = 2 ** self.bits
            per = F.cross_entropy(pred.reshape(-1, levels), target.flatten(), reduction="none")
            per = per.view(target.shape).mean(-1)
        else:
            per = (pred - target).pow(2).mean(-1)
        return masked_mean(per, corrupted)
