"""SimMIM-style masked image modeling (Xie et al. 2021): the encoder itself takes the mask tokens.

Hide patches (random, or block-wise), replace their embeddings by one learned mask token, run the
encoder over the whole sequence, and regress each hidden patch's pixels with a single linear head.
This is the "an encoder given mask tokens is MAE's decoder" variant: no separate decoder, every
position costs encoder compute.

objective_args: ``target`` pixels | norm_pixels (per-patch normalised, as MAE's default);
``loss`` l1 (SimMIM's) | l2; ``masking`` random | block; ``mask_ratio`` (default ``--mask-ratio``);
``min_block`` (block masking's smallest block, in patches).
"""
import torch.nn.functional as F

from ..models import MaskedViT
from .base import MaskTokenObjective
from .targets import (check_args, check_choice, check_fraction, check_int, draw_mask, encode_with_mask_tokens,
                      make_encoder, masked_mean, pixel_target)

DEFAULTS = dict(target="pixels", loss="l1", masking="random", mask_ratio=None, min_block=None)


class SimMIMObjective(MaskTokenObjective):
    name = "simmim"
    option_defaults = DEFAULTS  # objective_args and their defaults

    def __init__(self, encoder: MaskedViT, mask_ratio: float = 0.6, target: str = "pixels", loss: str = "l1",
                 masking: str = "random", min_block=None):
        super().__init__(encoder, encoder.patch_size ** 2 * 3)  # the linear head predicts each patch's pixels
        self.arch = dict(encoder=dict(encoder.arch), mask_ratio=mask_ratio, target=target, loss=loss, masking=masking,
                         min_block=min_block)
        self.mask_ratio, self.target, self.loss, self.masking, self.min_block = mask_ratio, target, loss, masking, min_block

    @classmethod
    def from_config(cls, cfg) -> "SimMIMObjective":
        args = check_args(cls.name, cfg.objective_args, DEFAULTS)
        check_choice(cls.name, "target", args["target"], ("pixels", "norm_pixels"))
        check_choice(cls.name, "loss", args["loss"], ("l1", "l2"))
        check_choice(cls.name, "masking", args["masking"], ("random", "block"))
        ratio = cfg.mask_ratio if args["mask_ratio"] is None else args["mask_ratio"]
        check_fraction(cls.name, "mask_ratio", ratio)
        if args["min_block"] is not None:
            check_int(cls.name, "min_block", args["min_block"])
        return cls(make_encoder(cfg), mask_ratio=float(ratio), target=args["target"], loss=args["loss"],
                   masking=args["masking"], min_block=args["min_block"])

    def forward(self, images, labels=None, rng=None):
        p = self.encoder.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        hidden = draw_mask(self.masking, images.shape[0], grid, self.mask_ratio, rng, images.device, self.min_block)
        h = encode_with_mask_tokens(self.encoder, images, hidden, self.mask_token)
        pred = self.head(h[:, 1:]).float()
        target = pixel_target(images, p, normalize=self.target == "norm_pixels")
        err = F.l1_loss(pred, target, reduction="none") if self.loss == "l1" else (pred - target).pow(2)
        return masked_mean(err.mean(-1), hidden)
