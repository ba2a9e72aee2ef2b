"""MAE as a pretraining objective: the model itself is :class:`mimkit.models.MaskedAutoencoder`.

The paper's Table 1 ablations are ``objective_args`` (decoder depth and width are ``--decoder-*``,
augmentation ``--aug``, the ratio ``--mask-ratio``):

- ``target``: pixels | norm_pixels (default: ``--norm-pix-loss``) | pca (whitened coefficients of the
  ``pca_components`` largest principal components of patch pixels, fitted on ``pca_images`` training
  images) | tokens (ids of a ``mimkit tokenizer train`` tokenizer at ``tokenizer: PATH``, cross-entropy);
- ``masking``: random (MAE's) | block (BEiT's; ``min_block`` patches at least) | grid (keep one in k x k);
- ``mask_token_in_encoder``: the encoder sees every position, hidden ones as a learned mask token, and
  the decoder gets the full sequence (no tokens to append).

With all defaults the objective is exactly ``MaskedAutoencoder.forward``.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import opt
from ..errors import ConfigError
from ..masking import MASKINGS, draw_mask, mask_to_ids
from ..models import MaskedAutoencoder, create_mae, encoder_overrides, patchify
from ..models.presets import ENCODERS
from ..models.vq import VQTokenizer, tokenizer_grid_matches
from .base import (FrozenTokenizer, ObjectiveOptions, check_positive, encode_with_mask_tokens, masked_mean,
                   open_tokenizer, patch_grid, require_rgb, resolve_mask_ratio,
                   training_images)
from .targets import PCATarget

TARGETS = ("pixels", "norm_pixels", "pca", "tokens")


@dataclass
class MAEOptions(ObjectiveOptions):
    target: Optional[str] = opt(None, "pixels | norm_pixels | pca | tokens (default: norm_pixels with "
                                "--norm-pix-loss, else pixels)", [None, *TARGETS])
    masking: str = opt("random", "random (MAE's) | block (BEiT's) | grid (keep one patch per k x k cell)",
                       list(MASKINGS))
    mask_token_in_encoder: bool = opt(False, "the encoder sees every position, hidden ones as a learned mask token")
    tokenizer: Optional[str] = opt(None, "target tokens: a `mimkit tokenizer train` tokenizer (path)")
    pca_components: Optional[int] = opt(None, "target pca: principal components kept (default: an eighth of a "
                                        "patch's pixel values, as MAE's 96 of 768)")
    pca_images: int = opt(2000, "target pca: training images the basis is fitted on")
    min_block: Optional[int] = opt(None, "masking block: smallest block in patches (BEiT's 16 of 196, scaled)")

    def validate(self):
        check_positive(self, "pca_components", "pca_images", "min_block")
        if self.tokenizer and self.target != "tokens":
            raise ConfigError("tokenizer is used only with target: tokens")


DEFAULTS = {k: v.default for k, v in MAEOptions.__dataclass_fields__.items()}


class MAEObjective(nn.Module):
    name = "mae"
    description = "MAE (He et al. 2021): visible patches only in the encoder, a light decoder regresses pixels"
    paper_mask_ratio = 0.75
    Options = MAEOptions  # objective_args: the paper's Table 1 ablations

    def __init__(self, model: MaskedAutoencoder, target: str = None, masking: str = "random",
                 mask_token_in_encoder: bool = False, pca_components: int = None, tokenizer_arch: dict = None,
                 min_block: int = None, tokenizer=None):
        super().__init__()
        self.model = model
        self.target = target or ("norm_pixels" if model.norm_pix_loss else "pixels")
        self.masking, self.min_block = masking, min_block
        # the Table 1 options that differ from MAE's; stored in ``arch`` so ``build`` restores them
        self.ablation = {k: v for k, v in dict(masking=masking, mask_token_in_encoder=mask_token_in_encoder,
                                                min_block=min_block).items() if v != DEFAULTS[k]}
        self.enc_mask_token = None
        if mask_token_in_encoder:
            self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, model.encoder.embed_dim))
            nn.init.normal_(self.enc_mask_token, std=0.02)
        self.pca = self.tokenizer = None
        if self.target == "pca":
            self.pca = PCATarget(model.patch_size ** 2 * model.encoder.in_chans, pca_components)
            self.ablation.update(target="pca", pca_components=pca_components)
        elif self.target == "tokens":
            self.tokenizer = FrozenTokenizer(tokenizer if tokenizer is not None else VQTokenizer.build(tokenizer_arch))
            self.ablation.update(target="tokens", tokenizer_arch=dict(tokenizer_arch))

    @property
    def encoder(self):
        return self.model.encoder

    @property
    def arch(self) -> dict:
        return {**self.model.arch, "ablation": dict(self.ablation)} if self.ablation else self.model.arch

    @property
    def pixel_output(self) -> bool:
        """Whether the decoder predicts pixels (so reconstructions can be drawn)."""
        return self.target in ("pixels", "norm_pixels")

    @classmethod
    def build(cls, arch: dict) -> "MAEObjective":
        return cls(MaskedAutoencoder.from_arch(arch), **arch.get("ablation", {}))

    @classmethod
    def from_config(cls, cfg, options: MAEOptions) -> "MAEObjective":
        extra = encoder_overrides(cfg)
        target = options.target or ("norm_pixels" if cfg.norm_pix_loss else "pixels")
        tok, pred_dim, pca_components = None, None, options.pca_components
        if target == "tokens":
            require_rgb(extra.get("in_chans", 3), "--objective-args: target tokens of objective mae", "its tokenizer")
            tok = open_tokenizer("mae", options.tokenizer)
            pred_dim = tok.codebook_size
        elif target == "pca":  # MAE kept 96 of 768 dimensions at patch 16: an eighth
            patch_dim = ENCODERS[cfg.model]["patch_size"] ** 2 * extra.get("in_chans", 3)
            pred_dim = pca_components = pca_components or max(1, patch_dim // 8)
            if pred_dim > patch_dim:
                raise ConfigError(f"--objective-args: pca_components {pred_dim} for objective mae exceeds the "
                                  f"{patch_dim} pixel values of a patch")
        norm_pix = target == "norm_pixels" if target in ("pixels", "norm_pixels") else cfg.norm_pix_loss
        model = create_mae(cfg.model, decoder_dim=cfg.decoder_dim or None, decoder_depth=cfg.decoder_depth or None,
                           decoder_heads=cfg.decoder_heads or None,
                           mask_ratio=resolve_mask_ratio(cfg, None, cls.paper_mask_ratio),
                           norm_pix_loss=norm_pix, pred_dim=pred_dim, **extra)
        if tok is not None:
            bad = tokenizer_grid_matches(tok, model.encoder)
            if bad:
                raise ConfigError(f"--objective-args: tokenizer: {bad}")
        obj = cls(model, target=target, masking=options.masking, mask_token_in_encoder=options.mask_token_in_encoder,
                  pca_components=pca_components, tokenizer_arch=dict(tok.arch) if tok else None,
                  min_block=options.min_block, tokenizer=tok)
        if obj.pca is not None:
            images = training_images(cfg, options.pca_images, model.encoder.arch["img_size"], model.encoder.pixels)
            obj.pca.fit(patchify(images, model.patch_size))
        return obj

    @property
    def mask_ratio(self) -> float:
        return self.model.mask_ratio

    def forward(self, images, labels=None, rng=None):
        if self.ablation:
            return self.forward_ablation(images, rng)
        noise = None
        if rng is not None:
            gh, gw = self.encoder.grid_size
            noise = rng.rand(images.shape[0], gh * gw)
        return self.model(images, noise=noise).loss

    def forward_ablation(self, images, rng=None):
        """MAE's steps with Table 1's variations: which patches hide, what the encoder sees, what is predicted."""
        model = self.model
        grid = patch_grid(images, model.patch_size)
        hidden = draw_mask(self.masking, images.shape[0], grid, model.mask_ratio, rng, images.device, self.min_block)
        if self.enc_mask_token is None:  # MAE: the encoder sees the visible patches only
            m = mask_to_ids(hidden)
            latent, ids_restore = model.forward_encoder(images, m.ids_keep), m.ids_restore
        else:  # every position, hidden ones as a mask token; the decoder then has nothing to append
            latent = encode_with_mask_tokens(model.encoder, images, hidden, self.enc_mask_token)
            ids_restore = torch.arange(hidden.shape[1], device=images.device).expand(hidden.shape[0], -1)
        pred = model.forward_decoder(latent, ids_restore, grid).float()
        if self.target == "pca":
            per = (pred - self.pca(patchify(images, model.patch_size))).pow(2).mean(-1)
        elif self.target == "tokens":
            ids = self.tokenizer(images)
            per = F.cross_entropy(pred.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
        else:
            return model.forward_loss(images, pred, hidden.float())
        return masked_mean(per, hidden)

    def no_weight_decay(self):
        return {"model." + n for n in self.model.no_weight_decay()} | {"enc_mask_token"}
