"""Checkpoints: safe, atomic I/O (:mod:`.io`) and the formats mimkit reads and writes (:mod:`.formats`).

``load(path)`` / ``load_encoder(path)`` / ``load_mae(path)`` read mimkit checkpoints and run directories, official
MAE ``.pth`` files, Hugging Face ViTMAE directories and timm weights; ``export(model_or_path, to, out)`` writes
timm, Hugging Face or official MAE checkpoints.
"""
from .formats import EXPORT_FORMATS, FORMATS, STANDARD_HEADS, export, load, load_encoder, load_mae
from .io import load_checkpoint, load_latest, safe_torch_load, save_checkpoint

__all__ = ["EXPORT_FORMATS", "FORMATS", "STANDARD_HEADS", "export", "load", "load_checkpoint",
           "load_encoder", "load_latest", "load_mae", "safe_torch_load", "save_checkpoint"]
