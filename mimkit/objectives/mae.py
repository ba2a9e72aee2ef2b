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
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..masking import mask_to_ids
from ..models import MaskedAutoencoder, create_mae, encoder_overrides, patchify
from .targets import (MASKINGS, PCATarget, check_args, check_bool, check_choice, check_int, draw_mask,
                      encode_with_mask_tokens, fit_images, masked_mean)

TARGETS = ("pixels", "norm_pixels", "pca", "tokens")
DEFAULTS = dict(target=None, masking="random", mask_token_in_encoder=False, tokenizer=None, pca_components=None,
                pca_images=2000, min_block=None)


class MAEObjective(nn.Module):
    name = "mae"
    option_defaults = DEFAULTS  # objective_args (the Table 1 ablations) and their defaults

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
            from ..tokenizer import VQTokenizer
            from .beit import FrozenTokenizer
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
    def from_config(cls, cfg) -> "MAEObjective":
        extra = encoder_overrides(cfg)
        args = check_args("mae", cfg.objective_args, DEFAULTS)
        target = args["target"] or ("norm_pixels" if cfg.norm_pix_loss else "pixels")
        check_choice("mae", "target", target, TARGETS)
        check_choice("mae", "masking", args["masking"], MASKINGS)
        check_bool("mae", "mask_token_in_encoder", args["mask_token_in_encoder"])
        for key in ("pca_components", "min_block"):
            if args[key] is not None:
                check_int("mae", key, args[key])
        check_int("mae", "pca_images", args["pca_images"])
        if target != "tokens" and args["tokenizer"]:
            raise ConfigError("--objective-args: tokenizer for objective mae is used only with target: tokens")
        tok, pred_dim = None, None
        if target == "tokens":
            from .beit import open_tokenizer
            tok = open_tokenizer("mae", args["tokenizer"])
            pred_dim = tok.codebook_size
        elif target == "pca":  # MAE kept 96 of 768 dimensions at patch 16: an eighth
            from ..models.presets import ENCODERS
            patch_dim = ENCODERS[cfg.model]["patch_size"] ** 2 * extra.get("in_chans", 3)
            pred_dim = args["pca_components"] = args["pca_components"] or max(1, patch_dim // 8)
            if pred_dim > patch_dim:
                raise ConfigError(f"--objective-args: pca_components {pred_dim} for objective mae exceeds the "
                                  f"{patch_dim} pixel values of a patch")
        norm_pix = target == "norm_pixels" if target in ("pixels", "norm_pixels") else cfg.norm_pix_loss
        model = create_mae(cfg.model, decoder_dim=cfg.decoder_dim or None, decoder_depth=cfg.decoder_depth or None,
                           decoder_heads=cfg.decoder_heads or None, mask_ratio=cfg.mask_ratio,
                           norm_pix_loss=norm_pix, pred_dim=pred_dim, **extra)
        if tok is not None:
            from ..tokenizer import tokenizer_grid_matches
            bad = tokenizer_grid_matches(tok, model.encoder)
            if bad:
                raise ConfigError(f"--objective-args: tokenizer: {bad}")
        obj = cls(model, target=target, masking=args["masking"], mask_token_in_encoder=args["mask_token_in_encoder"],
                  pca_components=args["pca_components"], tokenizer_arch=dict(tok.arch) if tok else None,
                  min_block=args["min_block"], tokenizer=tok)
        if obj.pca is not None:
            images = fit_images(cfg, args["pca_images"], model.encoder.arch["img_size"])
            obj.pca.fit(patchify(images, model.patch_size))
        return obj

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
        grid = model._grid(images)
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
