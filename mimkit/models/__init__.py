import sys

from . import vq
from .frozen import freeze
from .mae import MaskedAutoencoder, MAEOutput, normalize_patches, patchify, unpatchify
from .presets import DECODERS, ENCODERS, create_encoder, create_mae, encoder_overrides, list_models
from .vit import MaskedViT, adapt_patch_projection

sys.modules[__name__ + ".tokenizer"] = vq  # the old name of models.vq: imports written before keep working

__all__ = ["MaskedAutoencoder", "MAEOutput", "MaskedViT", "normalize_patches", "patchify", "unpatchify",
           "create_encoder", "create_mae", "adapt_patch_projection", "encoder_overrides", "list_models", "ENCODERS",
           "DECODERS", "freeze"]
