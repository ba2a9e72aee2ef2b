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
``palette_size`` (512); ``mask_ratio`` (BERT's 0.15); ``feature_layer`` (1..depth; default depth / 2);
``palette_images`` (training images the palette is fitted on, 1000); ``kmeans_iters`` (20).
"""
import logging
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..masking import num_visible
from .targets import (Palette, check_args, check_choice, check_fraction, check_int, fit_images, masked_mean,
                      resolve_ratio, to_unit, uniform)

log = logging.getLogger("mimkit")
DEFAULTS = dict(mode="ar", resolution=None, palette_size=512, mask_ratio=None, feature_layer=None,
                palette_images=1000, kmeans_iters=20)


class PixelTransformer(nn.Module):
    """iGPT's network, shaped like an encoder the evaluations can use: ``extract(imgs, pool)``, ``embed_dim``,
    ``arch['img_size']`` and ``patch_size`` (the downsampling factor)."""

    def __init__(self, img_size: int = 32, resolution: int = 16, palette_size: int = 512, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, causal: bool = True,
                 feature_layer: Optional[int] = None, patch_size: Optional[int] = None):
        super().__init__()
        if img_size % resolution or (patch_size is not None and patch_size * resolution != img_size):
            raise ValueError(f"the image size {img_size} must be the resolution {resolution} x the patch size")
        # patch_size: how many input pixels one sequence element stands for (what a ViT's patch size tells the
        # evaluations: image sizes must be multiples of it)
        self.arch = dict(img_size=img_size, resolution=resolution, palette_size=palette_size, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, causal=causal,
                         feature_layer=feature_layer, patch_size=img_size // resolution)
        self.resolution, self.causal, self.embed_dim, self.num_features = resolution, causal, embed_dim, embed_dim
        self.feature_layer = feature_layer or max(1, depth // 2)
        self.palette = Palette(palette_size)
        # one extra id: the start token (ar) or the mask token (bert)
        self.special = palette_size
        self.tok_embed = nn.Embedding(palette_size + 1, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, resolution * resolution, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @property
    def patch_size(self) -> int:
        return self.arch["img_size"] // self.resolution

    @property
    def grid_size(self):
        return self.resolution, self.resolution

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> (B, resolution**2) palette indices, raster order."""
        with torch.autocast(images.device.type, enabled=False):
            return self.palette.encode(images.float(), self.resolution)

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """What the network reads for a sequence of ids: shifted right after a start token when autoregressive."""
        if self.causal:
            start = ids.new_full((ids.shape[0], 1), self.special)
            return torch.cat([start, ids[:, :-1]], dim=1)
        return ids

    def run(self, inputs: torch.Tensor, upto: Optional[int] = None) -> torch.Tensor:
        """(B, S) input ids -> residual stream after block ``upto`` (all blocks, then the final norm, when None)."""
        x = self.tok_embed(inputs) + self.pos_embed[:, :inputs.shape[1]]
        for i, blk in enumerate(self.blocks):
            if upto is not None and i >= upto:
                return x
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(partial(blk, is_causal=self.causal), x, use_reentrant=False)
            else:
                x = blk(x, is_causal=self.causal)
        return x if upto is not None else self.norm(x)

    def forward_features(self, imgs: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """(B, S, D) layer-normalised activations of ``layer`` (default ``feature_layer``) over the whole image."""
        layer = layer or self.feature_layer
        if not 1 <= layer <= len(self.blocks):
            raise ValueError(f"layer must be in 1..{len(self.blocks)}, got {layer}")
        x = self.run(self.inputs(self.tokens(imgs)), upto=layer)
        return F.layer_norm(x, x.shape[-1:])

    def extract(self, imgs: torch.Tensor, pool: str = "mean", layer: Optional[int] = None) -> torch.Tensor:
        """Per-image features; with no class token, 'cls' and 'mean' both average-pool the sequence (as iGPT)."""
        x = self.forward_features(imgs, layer)
        if pool in ("cls", "mean"):
            return x.mean(1)
        if pool == "all":
            return x
        raise ValueError(f"pool must be one of cls, mean, all; got {pool!r}")


class IGPTObjective(nn.Module):
    name = "igpt"
    option_defaults = DEFAULTS  # objective_args and their defaults

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
    def from_config(cls, cfg) -> "IGPTObjective":
        from ..models.presets import encoder_preset
        args = check_args(cls.name, cfg.objective_args, DEFAULTS)
        check_choice(cls.name, "mode", args["mode"], ("ar", "bert"))
        try:
            preset = encoder_preset(cfg.model)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
        img_size = cfg.img_size or preset["img_size"]
        res = args["resolution"] or max(1, img_size // 2)
        check_int(cls.name, "resolution", res)
        if img_size % res:
            raise ConfigError(f"--objective-args: resolution {res} for objective igpt must divide the image size {img_size}")
        for key in ("palette_size", "palette_images", "kmeans_iters"):
            check_int(cls.name, key, args[key])
        layer = args["feature_layer"]
        if layer is not None:
            check_int(cls.name, "feature_layer", layer)
            if layer > preset["depth"]:
                raise ConfigError(f"--objective-args: feature_layer {layer} for objective igpt is beyond the "
                                  f"{preset['depth']} blocks of {cfg.model}")
        ratio = resolve_ratio(cfg, args, 0.15)
        check_fraction(cls.name, "mask_ratio", ratio)
        net = PixelTransformer(img_size=img_size, resolution=res, palette_size=args["palette_size"],
                               embed_dim=preset["embed_dim"], depth=preset["depth"], num_heads=preset["num_heads"],
                               mlp_ratio=preset.get("mlp_ratio", 4.0), causal=args["mode"] == "ar",
                               feature_layer=layer)
        images = fit_images(cfg, args["palette_images"], img_size)
        pixels = F.interpolate(to_unit(images), size=(res, res), mode="area").permute(0, 2, 3, 1).reshape(-1, 3)
        if pixels.shape[0] < args["palette_size"]:
            raise ConfigError(f"--objective-args: palette_size {args['palette_size']} needs at least that many pixels; "
                              f"{cfg.data} gives {pixels.shape[0]} at resolution {res} (raise palette_images)")
        g = torch.Generator().manual_seed(cfg.seed)
        if pixels.shape[0] > 100_000:  # plenty for 512 colours, and k-means stays quick on a CPU
            pixels = pixels[torch.randperm(pixels.shape[0], generator=g)[:100_000]]
        net.palette.fit(pixels, iters=args["kmeans_iters"], seed=cfg.seed)
        log.info("igpt: fitted a %d-colour palette on %d pixels of %d images", args["palette_size"], pixels.shape[0],
                 images.shape[0])
        return cls(net, mask_ratio=float(ratio))

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
        noise = uniform(rng, b, s, device=ids.device)
        hidden = noise.argsort(1).argsort(1) >= num_visible(s, self.mask_ratio)
        logits = self.head(net.run(torch.where(hidden, net.special, ids))).float()
        per = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(b, s)
        return masked_mean(per, hidden)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"encoder.pos_embed"}
