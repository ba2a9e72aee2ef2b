"""Named model presets, a registry in the manner of timm's.

``ENCODERS`` holds ViT shapes; ``create_encoder`` / ``create_mae`` build models from a
name plus overrides, so every model is usable without the training scripts.
"""
from typing import Dict

from ..errors import did_you_mean
from .mae import MaskedAutoencoder
from ..pixels import PixelSpec
from .vit import MaskedViT

ENCODERS: Dict[str, dict] = {
    # 224 px, the paper's shapes (ViT-Huge uses patch 14)
    "vit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # 32 px, for CIFAR-sized images (64 patches of 4 px, or 256 of 2 px)
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6),
    "vit_tiny_patch2_32": dict(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch2_32": dict(img_size=32, patch_size=2, embed_dim=384, depth=12, num_heads=6),
    # a few-layer model for tests and the two-minute demo
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
}

# decoder shapes: the paper's 512-d x 8 blocks at 224 px; a lighter one at 32 px, where the
# encoder itself is small and the decoder would otherwise dominate the compute
DECODERS: Dict[str, dict] = {
    "default": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "small32": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
}


def list_models():
    return sorted(ENCODERS)


def encoder_preset(name: str) -> dict:
    """The arch of the encoder preset ``name`` (a copy); a ValueError naming the closest preset if unknown."""
    if name not in ENCODERS:
        hint = did_you_mean(name, ENCODERS, repr, before=" (", after=")")
        raise ValueError(f"unknown model {name!r}{hint}; choose from: {', '.join(list_models())}")
    return dict(ENCODERS[name])


def default_decoder(name: str) -> dict:
    return dict(DECODERS["small32" if ENCODERS.get(name, {}).get("img_size") == 32 else "default"])


def encoder_overrides(cfg) -> dict:
    """The encoder options a command's config sets beyond the preset: ``img_size`` (0: the preset's), and the
    input channels and pixel spec pretraining resolved from the data (``cfg.pixels``, a stored spec; empty for
    8-bit RGB)."""
    out = {"img_size": cfg.img_size} if getattr(cfg, "img_size", 0) else {}
    pixels = getattr(cfg, "pixels", None)
    if pixels:
        spec = PixelSpec.from_dict(pixels)
        out.update(in_chans=spec.in_chans, pixels=spec)
    return out


def create_encoder(name: str = "vit_base_patch16_224", **overrides) -> MaskedViT:
    """A ViT encoder by preset name; keyword overrides (img_size, drop_path_rate, num_classes, ...) win."""
    return MaskedViT(**{**encoder_preset(name), **overrides})


def create_mae(name: str = "vit_base_patch16_224", *, decoder_dim=None, decoder_depth=None, decoder_heads=None,
               mask_ratio: float = 0.75, norm_pix_loss: bool = True, pred_dim=None,
               **encoder_overrides) -> MaskedAutoencoder:
    """An MAE whose encoder is the preset ``name``; decoder defaults depend on the image size."""
    dec = default_decoder(name)
    for k, v in dict(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads).items():
        if v is not None:
            dec[k] = v
    return MaskedAutoencoder(create_encoder(name, **encoder_overrides), mask_ratio=mask_ratio,
                             norm_pix_loss=norm_pix_loss, pred_dim=pred_dim, **dec)
