"""Per-image features from any checkpoint.

>>> import mimkit
>>> from mimkit.features import extract_features
>>> model = mimkit.load("mae_pretrain_vit_base.pth")        # or a HF ViTMAE folder, timm weights, a mimkit run
>>> feats = extract_features(model, images, pool="cls")     # images: (B, 3, H, W), normalised as in training

``pool``: ``'cls'`` (the class token, (B, D)), ``'mean'`` (mean of the patch tokens, (B, D)) or ``'all'`` (every
token after the final norm, (B, 1 + L, D)). Any H, W divisible by the patch size works: position embeddings
are interpolated when the size differs from the checkpoint's. :func:`embed` (``mimkit embed``) does the same
for a folder of images and writes ``OUT.npy`` with the image names in ``OUT.txt`` and how they were made
(checkpoint, pooling, image size) in ``OUT.json``.
"""
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .files import write_json, write_text, write_via
from .models import MaskedAutoencoder
from .checkpoints import load
from .data import make_loader, open_images, reuse_pixels
from .errors import ConfigError

log = logging.getLogger("mimkit")
POOLS = ("cls", "mean", "all")


def _encoder(model):
    """The encoder to read features from: anything with ``extract(images, pool)`` (a ``MaskedViT``, iGPT's
    ``PixelTransformer``), or the ``encoder`` of an MAE or an objective."""
    if isinstance(model, MaskedAutoencoder):
        return model.encoder
    for candidate in (model, getattr(model, "encoder", None)):
        if callable(getattr(candidate, "extract", None)):
            return candidate
    raise TypeError(f"expected a MaskedViT, a MaskedAutoencoder or an objective with an encoder, "
                    f"got {type(model).__name__}")


def extract_features(model, images: torch.Tensor, pool: str = "cls", img_size: Optional[int] = None) -> torch.Tensor:
    """Features of a batch (no gradients, dropout and drop-path off); ``model`` is an encoder or an MAE.

    ``img_size`` resizes the images first (bicubic) when given; otherwise they are used at their own size.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    enc = _encoder(model)
    if img_size and tuple(images.shape[-2:]) != (img_size, img_size):
        images = F.interpolate(images, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=True)
    was_training = enc.training
    enc.eval()
    try:
        with torch.inference_mode():
            return enc.extract(images, pool)
    finally:
        enc.train(was_training)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def embed(checkpoint, images, out, *, pool: str = "cls", img_size: int = 0, batch_size: int = 64,
          device: str = "auto", num_workers: Optional[int] = None, band_names: str = "") -> dict:
    """Features of every image of ``images`` (a folder, a .tar of one, or 'builtin') to ``out`` (.npy), in the
    source's sorted order, with the image names, one a line, in ``out`` with a ``.txt`` suffix.

    Images that cannot be decoded are skipped (and warned about); the names file lists exactly the rows
    written. ``img_size`` 0 uses the checkpoint's resolution; ``band_names`` (else the TIFF's band descriptions)
    meet the checkpoint's by name. Returns {features, names, shape}.
    """
    model = load(checkpoint)
    enc = _encoder(model)
    dev = _device(device)
    enc.to(dev)
    size = img_size or enc.arch["img_size"]
    source = open_images(images)
    pixels = reuse_pixels(enc.pixels, source, range(len(source)), band_names=band_names)  # the checkpoint's
    loader = make_loader(source, list(range(len(source))), batch_size=batch_size, recipe="eval", img_size=size,
                         shuffle=False, device=dev, num_workers=num_workers, with_index=True, pixels=pixels)
    feats, index = [], []
    for x, _, idx in loader:
        feats.append(extract_features(enc, x, pool).float().cpu())
        index.extend(int(i) for i in idx)
    array = torch.cat(feats).numpy() if feats else np.zeros((0, enc.embed_dim), np.float32)
    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_via(out, lambda f: np.save(f, array))
    names_file = out.with_suffix(".txt")
    write_text(names_file, "".join(source.names[i] + "\n" for i in index))
    # how the features were made, checked by whoever reads them as an index (mimkit explore, mimkit viz neighbours)
    write_json(out.with_suffix(".json"), {"checkpoint": checkpoint_id(checkpoint), "pool": pool, "img_size": size,
                                          "images": str(images), "shape": list(array.shape)})
    log.info("wrote %s features %s of %d images (%s, %d px) to %s, names in %s", pool, tuple(array.shape), len(index),
             checkpoint, size, out, names_file)
    return {"features": str(out), "names": str(names_file), "shape": tuple(array.shape)}


def checkpoint_id(path) -> str:
    """How features record the checkpoint they came from: the real path of what was given (file or run folder)."""
    return os.path.realpath(str(path))


def embed_command(cfg) -> dict:
    """CLI ``mimkit embed CHECKPOINT IMAGES OUT.npy``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return embed(cfg.checkpoint, cfg.data, cfg.output, pool=cfg.pool, img_size=cfg.img_size, batch_size=cfg.batch_size,
                 device=cfg.device, num_workers=cfg.num_workers, band_names=cfg.band_names)
