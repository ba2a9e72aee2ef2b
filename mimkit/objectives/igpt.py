"""iGPT (Chen et al. 2020): a Transformer over colour-palette pixels, trained as GPT or as BERT.

Images are downsampled (16x16 for 32 px input by default), each pixel is mapped to the nearest of
512 colours of a k-means palette fitted on the training images, and the raster-order sequence of
palette indices is modelled by a Transformer of timm ``Block``s with its own token and learned
position embeddings (no patches, no class token):

- ``mode: ar``: autoregressive, causal attention; a start token is prepended and every pixel is
  predicted from the ones before it;
- ``mode: bert``: 15% of the pixels are replaced by a mask token, attention is bidirectional and
  the masked pixels are predicted.

Width, depth and heads come from the ``--model`` preset, so the comparison keeps the backbone's
size. iGPT's best linear-probe features sit in the middle of the network, so
``encoder.extract(images, pool)`` (what k-NN and linear probing call) average-pools the
layer-normalised output of ``feature_layer`` (default: the middle block); ``features(images,
layer)`` reads any layer.

objective_args: ``mode`` ar | bert; ``resolution`` (side of the downsampled image; default img_size / 2);
``palette_size`` (512); ``mask_ratio`` (default ``--mask-ratio``, else BERT's 0.15); ``feature_layer`` (1..depth; default depth / 2);
``palette_images`` (training images the palette is fitted on, 1000); ``kmeans_iters`` (20).
"""
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import opt
from ..errors import ConfigError
from ..masking import random_masking, uniform
from ..models.igpt import PixelTransformer
from ..models.presets import encoder_overrides, encoder_preset
from .base import ObjectiveOptions, check_fraction, check_positive, masked_mean, resolve_mask_ratio, \
    training_images

log = logging.getLogger("mimkit")


@dataclass
class IGPTOptions(ObjectiveOptions):
    mode: str = opt("ar", "ar (GPT: causal, next pixel) | bert (15% of the pixels masked)", ["ar", "bert"])
    resolution: Optional[int] = opt(None, "side of the downsampled image (default: the image size / 2)")
    palette_size: int = opt(512, "colours of the k-means palette")
    mask_ratio: Optional[float] = opt(None, "mode bert: share masked (default: --mask-ratio, else BERT's 0.15)")
    feature_layer: Optional[int] = opt(None, "block whose output is the features (default: the middle one)")
    palette_images: int = opt(1000, "training images the palette is fitted on")
    kmeans_iters: int = opt(20, "k-means iterations of the palette")

    def validate(self):
        check_fraction(self, "mask_ratio")
        check_positive(self, "resolution", "palette_size", "feature_layer", "palette_images", "kmeans_iters")


class IGPTObjective(nn.Module):
    name = "igpt"
    description = "iGPT (Chen et al. 2020): a Transformer over palette pixels, GPT (ar) or BERT (bert)"
    rgb_only = "its colour palette is of RGB pixels"
    paper_mask_ratio = 0.15  # BERT mode's; ar masks nothing
    Options = IGPTOptions

    def __init__(self, encoder: PixelTransformer, mask_ratio: float = 0.15):
        super().__init__()
        self.arch = dict(encoder=dict(encoder.arch), mask_ratio=mask_ratio)
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.head = nn.Linear(encoder.embed_dim, encoder.palette.size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    @property
    def mode(self) -> str:
        return "ar" if self.encoder.causal else "bert"

    @classmethod
    def build(cls, arch: dict) -> "IGPTObjective":
        arch = dict(arch)
        return cls(PixelTransformer(**arch.pop("encoder")), **arch)

    @classmethod
    def from_config(cls, cfg, options: IGPTOptions) -> "IGPTObjective":
        try:
            preset = encoder_preset(cfg.model)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
        img_size = cfg.img_size or preset["img_size"]
        res = options.resolution or max(1, img_size // 2)
        if img_size % res:
            raise ConfigError(f"--objective-args: resolution {res} for objective igpt must divide the image size {img_size}")
        layer = options.feature_layer
        if layer is not None and layer > preset["depth"]:
            raise ConfigError(f"--objective-args: feature_layer {layer} for objective igpt is beyond the "
                              f"{preset['depth']} blocks of {cfg.model}")
        ratio = resolve_mask_ratio(cfg, options.mask_ratio, cls.paper_mask_ratio)
        net = PixelTransformer(img_size=img_size, resolution=res, palette_size=options.palette_size,
                               embed_dim=preset["embed_dim"], depth=preset["depth"], num_heads=preset["num_heads"],
                               mlp_ratio=preset.get("mlp_ratio", 4.0), causal=options.mode == "ar",
                               feature_layer=layer, pixels=encoder_overrides(cfg).get("pixels"))
        # the palette is fitted on the true colours: the training images normalised as the run normalises them,
        # and back through the same spec (what net.tokens does to every batch)
        images = training_images(cfg, options.palette_images, img_size, net.pixels)
        pixels = F.interpolate(net.pixels.denormalize(images), size=(res, res), mode="area")
        pixels = pixels.permute(0, 2, 3, 1).reshape(-1, 3)
        if pixels.shape[0] < options.palette_size:
            raise ConfigError(f"--objective-args: palette_size {options.palette_size} needs at least that many pixels; "
                              f"{cfg.data} gives {pixels.shape[0]} at resolution {res} (raise palette_images)")
        g = torch.Generator().manual_seed(cfg.seed)
        if pixels.shape[0] > 100_000:  # plenty for 512 colours, and k-means stays quick on a CPU
            pixels = pixels[torch.randperm(pixels.shape[0], generator=g)[:100_000]]
        net.palette.fit(pixels, iters=options.kmeans_iters, seed=cfg.seed)
        log.info("igpt: fitted a %d-colour palette on %d pixels of %d images", options.palette_size, pixels.shape[0],
                 images.shape[0])
        return cls(net, mask_ratio=ratio)

    def features(self, images: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """(B, D): average-pooled, layer-normalised activations of block ``layer`` (default the middle one)."""
        return self.encoder.extract(images, "mean", layer)

    def forward(self, images, labels=None, rng=None):
        net = self.encoder
        ids = net.tokens(images)
        if net.causal:
            logits = self.head(net.run(net.inputs(ids))).float()
            return F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        b, s = ids.shape
        hidden = random_masking(b, s, self.mask_ratio, noise=uniform(rng, b, s, device=ids.device)).mask
        logits = self.head(net.run(torch.where(hidden, net.special, ids))).float()
        per = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(b, s)
        return masked_mean(per, hidden)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"encoder.pos_embed"}
