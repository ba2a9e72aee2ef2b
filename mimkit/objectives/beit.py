"""BEiT (Bao et al. 2021): predict the discrete tokens of a visual tokenizer at block-wise masked patches.

A tokenizer trained beforehand (``mimkit tokenizer train``, one code per patch) turns each image
into a grid of token ids. About 40% of the patches are hidden with BEiT's block-wise algorithm;
their embeddings become a learned mask token and the encoder runs over the whole sequence; a
linear head over the final tokens is trained with cross-entropy to give the tokenizer's id of
each hidden patch. The frozen tokenizer is kept inside the objective (and its checkpoints), so a
checkpoint is complete on its own.

objective_args: ``tokenizer`` (path: a ``tokenizer.pt``, its training folder or checkpoint; required);
``mask_ratio`` (default ``--mask-ratio``, else 0.4); ``masking`` block | random;
``min_block`` (smallest block in patches; BEiT's 16 of 196, scaled to the grid).
"""
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F

from ..config import opt
from ..errors import ConfigError
from ..masking import draw_mask
from ..models import MaskedViT
from ..models.vq import VQTokenizer, tokenizer_grid_matches
from .base import (FrozenTokenizer, MaskTokenObjective, ObjectiveOptions, check_fraction, check_positive,
                   encode_with_mask_tokens, make_encoder, masked_mean, open_tokenizer, patch_grid, resolve_mask_ratio)


@dataclass
class BEiTOptions(ObjectiveOptions):
    tokenizer: Optional[str] = opt(None, "a `mimkit tokenizer train` tokenizer: its tokenizer.pt, folder or "
                                   "checkpoint (required)")
    mask_ratio: Optional[float] = opt(None, "fraction hidden (default: --mask-ratio, else BEiT's 0.4)")
    masking: str = opt("block", "block (BEiT's) | random", ["block", "random"])
    min_block: Optional[int] = opt(None, "smallest block in patches (BEiT's 16 of 196, scaled to the grid)")

    def validate(self):
        check_fraction(self, "mask_ratio")
        check_positive(self, "min_block")


class BEiTObjective(MaskTokenObjective):
    name = "beit"
    description = "BEiT (Bao et al. 2021): predict a trained VQ tokenizer's ids at block-wise masked patches"
    rgb_only = "its tokenizer is trained on RGB images"  # (objectives without it take any channel count)
    paper_mask_ratio = 0.4
    Options = BEiTOptions

    def __init__(self, encoder: MaskedViT, tokenizer_arch: dict, mask_ratio: float = 0.4, masking: str = "block",
                 min_block=None, tokenizer=None):
        # made before super().__init__: a fresh tokenizer draws its random weights ahead of the head's, the order
        # seeded runs have always drawn them in
        frozen = FrozenTokenizer(tokenizer if tokenizer is not None else VQTokenizer.build(tokenizer_arch))
        super().__init__(encoder, tokenizer_arch["codebook_size"])  # the head gives one logit per tokenizer id
        self.arch = dict(encoder=dict(encoder.arch), tokenizer_arch=dict(tokenizer_arch), mask_ratio=mask_ratio,
                         masking=masking, min_block=min_block)
        self.mask_ratio, self.masking, self.min_block = mask_ratio, masking, min_block
        self.tokenizer = frozen

    @classmethod
    def from_config(cls, cfg, options: BEiTOptions) -> "BEiTObjective":
        ratio = resolve_mask_ratio(cfg, options.mask_ratio, cls.paper_mask_ratio)
        tok = open_tokenizer(cls.name, options.tokenizer)
        encoder = make_encoder(cfg)
        bad = tokenizer_grid_matches(tok, encoder)
        if bad:
            raise ConfigError(f"--objective-args: tokenizer: {bad}")
        return cls(encoder, dict(tok.arch), mask_ratio=ratio, masking=options.masking, min_block=options.min_block,
                   tokenizer=tok)

    def forward(self, images, labels=None, rng=None):
        p = self.encoder.patch_size
        grid = patch_grid(images, p)
        hidden = draw_mask(self.masking, images.shape[0], grid, self.mask_ratio, rng, images.device, self.min_block)
        ids = self.tokenizer(images)  # (B, L) visual tokens of the uncorrupted image
        h = encode_with_mask_tokens(self.encoder, images, hidden, self.mask_token)
        logits = self.head(h[:, 1:]).float()
        per = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
        return masked_mean(per, hidden)
