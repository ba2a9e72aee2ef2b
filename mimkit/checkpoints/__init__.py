"""Checkpoints: safe, atomic I/O (:mod:`.io`), the one reader (:mod:`.read`), the writer (:mod:`.export`) and
the formats' names (:mod:`.hf`, :mod:`.official`, :mod:`.timm`).

``load(path)`` / ``load_encoder(path)`` / ``load_mae(path)`` read mimkit checkpoints and run directories, official
MAE ``.pth`` files, Hugging Face ViTMAE directories and timm weights; ``export(model_or_path, to, out)`` writes
timm, Hugging Face or official MAE checkpoints.
"""
from .export import EXPORT_FORMATS, export
from ..checkpoint_files import load_checkpoint, load_latest, safe_torch_load, save_checkpoint
from .read import FORMATS, STANDARD_HEADS, load, load_encoder, load_mae, read

__all__ = ["EXPORT_FORMATS", "FORMATS", "STANDARD_HEADS", "export", "load", "load_checkpoint",
           "load_encoder", "load_latest", "load_mae", "read", "safe_torch_load", "save_checkpoint"]
