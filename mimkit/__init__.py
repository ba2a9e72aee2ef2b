"""mimkit: masked image modeling (MAE and its lineage) on a timm Vision Transformer."""
from .config import FinetuneConfig, KnnConfig, LinprobeConfig, PretrainConfig, ReconstructConfig, load_config
from .errors import BadImage, CheckpointError, ConfigError, DataError, DivergedError, MimkitError, Preempted
from .models import MaskedAutoencoder, MaskedViT, create_encoder, create_mae, list_models
from .pixels import PixelSpec

__version__ = "0.1.0"


def load(path, **kwargs):
    """The model in any checkpoint mimkit reads (mimkit checkpoint or run directory, official MAE .pth, Hugging Face
    ViTMAE directory, timm weights): a MaskedAutoencoder when it has a decoder, else the MaskedViT encoder.
    See :func:`mimkit.checkpoints.load`; features: :func:`mimkit.features.extract_features`."""
    from .checkpoints import load as _load
    return _load(path, **kwargs)


__all__ = ["load", "MaskedAutoencoder", "MaskedViT", "PixelSpec", "create_encoder", "create_mae", "list_models",
           "load_config",
           "MimkitError", "ConfigError", "DataError", "CheckpointError", "BadImage", "DivergedError", "Preempted",
           "PretrainConfig", "KnnConfig", "LinprobeConfig", "FinetuneConfig", "ReconstructConfig"]
