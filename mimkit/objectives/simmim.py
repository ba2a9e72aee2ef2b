"""SimMIM-style masked image modeling (Xie et al. 2021): the encoder itself takes the mask tokens.

Hide patches (random, or block-wise), replace their embeddings by one learned mask token, run the
encoder over the whole sequence, and regress each hidden patch's pixels with a single linear head.
This is the "an encoder given mask tokens is MAE's decoder" variant: no separate decoder, every
position costs encoder compute.

objective_args: ``target`` pixels | norm_pixels (per-patch normalised, as MAE's default);
``loss`` l1 (SimMIM's) | l2; ``masking`` random | block; ``mask_ratio`` (default ``--mask-ratio``, else 0.75);
``min_block`` (block masking's smallest block, in patches).
"""
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F

from ..config import opt
from ..masking import draw_mask
from ..models import MaskedViT
from .base import (MaskTokenObjective, ObjectiveOptions, check_fraction, check_positive, encode_with_mask_tokens,
                   make_encoder, masked_mean, patch_grid, resolve_mask_ratio)
from .targets import pixel_target


@dataclass
class SimMIMOptions(ObjectiveOptions):
    target: str = opt("pixels", "pixels | norm_pixels (per-patch normalised, as MAE's default)",
                      ["pixels", "norm_pixels"])
    loss: str = opt("l1", "l1 (SimMIM's) | l2", ["l1", "l2"])
    masking: str = opt("random", "random | block", ["random", "block"])
    mask_ratio: Optional[float] = opt(None, "fraction hidden (default: --mask-ratio, else 0.75)")
    min_block: Optional[int] = opt(None, "masking block: smallest block in patches")

    def validate(self):
        check_fraction(self, "mask_ratio")
        check_positive(self, "min_block")


class SimMIMObjective(MaskTokenObjective):
    name = "simmim"
    description = "SimMIM (Xie et al. 2021): mask tokens in the encoder, a linear head regresses pixels"
    paper_mask_ratio = 0.75  # mimkit's default for it so far (SimMIM's paper used 0.6 with 32 px mask patches)
    Options = SimMIMOptions

    def __init__(self, encoder: MaskedViT, mask_ratio: float = 0.6, target: str = "pixels", loss: str = "l1",
                 masking: str = "random", min_block=None):
        super().__init__(encoder, encoder.patch_size ** 2 * encoder.in_chans)  # the head predicts each patch's pixels
        self.arch = dict(encoder=dict(encoder.arch), mask_ratio=mask_ratio, target=target, loss=loss, masking=masking,
                         min_block=min_block)
        self.mask_ratio, self.target, self.loss, self.masking, self.min_block = mask_ratio, target, loss, masking, min_block

    @classmethod
    def from_config(cls, cfg, options: SimMIMOptions) -> "SimMIMObjective":
        return cls(make_encoder(cfg), mask_ratio=resolve_mask_ratio(cfg, options.mask_ratio, cls.paper_mask_ratio),
                   target=options.target, loss=options.loss, masking=options.masking, min_block=options.min_block)

    def forward(self, images, labels=None, rng=None):
        p = self.encoder.patch_size
        grid = patch_grid(images, p)
        hidden = draw_mask(self.masking, images.shape[0], grid, self.mask_ratio, rng, images.device, self.min_block)
        h = encode_with_mask_tokens(self.encoder, images, hidden, self.mask_token)
        pred = self.head(h[:, 1:]).float()
        target = pixel_target(images, p, normalize=self.target == "norm_pixels")
        err = F.l1_loss(pred, target, reduction="none") if self.loss == "l1" else (pred - target).pow(2)
        return masked_mean(err.mean(-1), hidden)
