from .frozen import freeze
from .mae import MaskedAutoencoder, MAEOutput, normalize_patches, patchify, unpatchify
from .presets import DECODERS, ENCODERS, create_encoder, create_mae, list_models
from .vit import MaskedViT

__all__ = ["MaskedAutoencoder", "MAEOutput", "MaskedViT", "normalize_patches", "patchify", "unpatchify",
           "create_encoder", "create_mae", "list_models", "ENCODERS", "DECODERS", "freeze"]
