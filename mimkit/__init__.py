"""mimkit: masked image modeling (MAE and its lineage) on a timm Vision Transformer."""
from .config import (ConfigError, FinetuneConfig, KnnConfig, LinprobeConfig, PretrainConfig, ReconstructConfig,
                     load_config)
from .models import MaskedAutoencoder, MaskedViT, create_encoder, create_mae, list_models

__version__ = "0.1.0"

__all__ = ["MaskedAutoencoder", "MaskedViT", "create_encoder", "create_mae", "list_models", "load_config",
           "ConfigError", "PretrainConfig", "KnnConfig", "LinprobeConfig", "FinetuneConfig", "ReconstructConfig"]
