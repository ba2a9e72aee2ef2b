"""Writing checkpoints (:func:`export`, the CLI's ``mimkit export``): the encoder as timm weights, the whole MAE
as a Hugging Face directory that ``transformers.ViTMAEForPreTraining.from_pretrained`` loads, or the official
``.pth`` layout; safetensors wherever the target reads it. Each format's writer lives with its names
(:mod:`.timm`, :mod:`.hf`, :mod:`.official`); any supported checkpoint is read through :mod:`.read`.
"""
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import CheckpointError
from ..models import MaskedAutoencoder, MaskedViT
from ..files import write_text
from .card import model_card
from .hf import write_hf
from .official import write_official
from .read import load
from .timm import write_timm

log = logging.getLogger("mimkit")

EXPORT_FORMATS = ("timm", "hf", "mae")


def mae_and_encoder(model) -> Tuple[Optional[MaskedAutoencoder], MaskedViT]:
    if isinstance(model, MaskedAutoencoder):
        return model, model.encoder
    if isinstance(model, MaskedViT):
        return None, model
    inner = getattr(model, "model", None)  # an objective wrapping a MaskedAutoencoder
    if isinstance(inner, MaskedAutoencoder):
        return inner, inner.encoder
    enc = getattr(model, "encoder", None)
    if isinstance(enc, MaskedViT):
        return None, enc
    raise TypeError(f"cannot export a {type(model).__name__}: expected a MaskedAutoencoder, a MaskedViT or a path")



def export(model_or_path, to: str, out, *, encoder_only: bool = False, overwrite: bool = False) -> Path:
    """Write a model (or any supported checkpoint, by path) in another format; returns what was written.

    * ``timm``: the encoder's state dict under timm's names. ``OUT.safetensors`` or ``OUT.pth``: a file that
      ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))`` or
      ``model.load_state_dict`` takes as is; any other ``OUT``: a folder (``config.json`` + ``model.safetensors``)
      for ``timm.create_model('local-dir:OUT', pretrained=True)``.
    * ``hf``: a directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``, a model card
      ``README.md`` naming the data, objective and results of the run: :mod:`.card`) for
      ``transformers.ViTMAEForPreTraining.from_pretrained(OUT)`` (a ``ViTMAEModel`` when there is no decoder
      or ``encoder_only``).
    * ``mae``: the official release layout, ``{"model": state_dict}`` in a ``.pth`` (a flat ``.safetensors``
      when ``OUT`` ends so).
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose from {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists (overwrite=True / --force replaces it)")
    model = load(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    mae, enc = mae_and_encoder(model)
    if encoder_only:
        mae = None
    with torch.no_grad():
        if to == "timm":
            return write_timm(enc, out)
        if to == "hf":
            write_hf(mae, enc, out)
            info = getattr(model, "checkpoint_info", None) or {"format": "in-memory", "path": ""}
            weights = "ViTMAEForPreTraining" if mae is not None else "ViTMAEModel"
            write_text(out / "README.md", model_card(info, enc.arch, weights))
            return out
        return write_official(mae, enc, out)


def export_command(cfg) -> Path:
    """CLI ``mimkit export CHECKPOINT --to timm|hf|mae OUT``."""
    model = load(cfg.checkpoint)
    path = export(model, cfg.to, cfg.output, encoder_only=cfg.encoder_only, overwrite=cfg.force)
    what = "encoder" if cfg.encoder_only or not isinstance(model, MaskedAutoencoder) or cfg.to == "timm" else "MAE"
    log.info("wrote the %s of %s (%s) as %s: %s", what, cfg.checkpoint, model.checkpoint_info["format"], cfg.to, path)
    return path
