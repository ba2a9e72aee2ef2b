"""iGPT's network (Chen et al. 2020): a Transformer of timm ``Block``s over colour-palette pixels, and its palette.

The k-means ``Palette`` lives in the network (its ``palette.centers`` buffer is part of the checkpoint), so a
saved network encodes images on its own. The objective that trains it is :mod:`mimkit.objectives.igpt`.
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from ..pixels import PixelSpec


class Palette(nn.Module):
    """A k-means colour palette: ``centers`` (K, 3) in [0, 1] RGB; pixels map to the nearest centre."""

    def __init__(self, size: int = 512):
        super().__init__()
        self.size = size
        self.register_buffer("centers", torch.rand(size, 3))

    @torch.no_grad()
    def fit(self, pixels: torch.Tensor, iters: int = 20, seed: int = 0) -> "Palette":
        """Lloyd's k-means on (N, 3) pixels in [0, 1], seeded by k-means++; empty clusters are re-seeded from
        the worst-fitted pixels."""
        x = pixels.reshape(-1, 3).float()
        g = torch.Generator().manual_seed(seed)
        if x.shape[0] < self.size:
            raise ValueError(f"need at least {self.size} pixels to fit a {self.size}-colour palette, got {x.shape[0]}")
        seed_from = x[torch.randperm(x.shape[0], generator=g)[:max(self.size, 20_000)]]
        centers = _kmeans_pp(seed_from, self.size, g)
        for _ in range(iters):
            nearest, dist = _nearest(x, centers)
            counts = torch.bincount(nearest, minlength=self.size).float()
            sums = torch.zeros_like(centers).index_add_(0, nearest, x)
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
            if empty.any():
                worst = dist.argsort(descending=True)[:int(empty.sum())]
                centers[empty] = x[worst]
        self.centers.copy_(centers)
        return self

    def assign(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3) pixels in [0, 1] -> (...) palette indices."""
        return _nearest(pixels.reshape(-1, 3).float(), self.centers.float())[0].reshape(pixels.shape[:-1])

    def encode(self, images: torch.Tensor, resolution: int, pixels: PixelSpec) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> (B, resolution**2) indices: back to [0, 1] by the input's spec ``pixels``,
        area-downsample, then nearest colour, row-major."""
        unit = pixels.denormalize(images)
        if unit.shape[-1] != resolution or unit.shape[-2] != resolution:
            unit = F.interpolate(unit, size=(resolution, resolution), mode="area")
        return self.assign(unit.permute(0, 2, 3, 1)).flatten(1)

    def decode(self, ids: torch.Tensor, resolution: int) -> torch.Tensor:
        """(B, resolution**2) indices -> (B, 3, r, r) pixels in [0, 1]."""
        return self.centers[ids].reshape(ids.shape[0], resolution, resolution, 3).permute(0, 3, 1, 2)


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536):
    """Index of and distance to the nearest centre for each row of ``x``, in chunks to bound memory."""
    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = torch.cdist(x[s:s + chunk], centers)
        v, i = d.min(1)
        idx.append(i)
        dist.append(v)
    if not idx:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
    return torch.cat(idx), torch.cat(dist)


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance."""
    centers = torch.empty(k, x.shape[1])
    centers[0] = x[torch.randint(0, x.shape[0], (1,), generator=g)]
    d2 = (x - centers[0]).pow(2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct colours than centres: repeat some
            idx = torch.randint(0, x.shape[0], (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=g)
        centers[i] = x[idx]
        d2 = torch.minimum(d2, (x - centers[i]).pow(2).sum(1))
    return centers


class PixelTransformer(nn.Module):
    """iGPT's network, shaped like an encoder the evaluations can use: ``extract(imgs, pool)``, ``embed_dim``,
    ``arch['img_size']``, ``patch_size`` (the downsampling factor) and ``in_chans`` (3: its palette is RGB).
    ``pixels``: the input's :class:`mimkit.pixels.PixelSpec` (or its stored dict; None: 8-bit RGB with ImageNet's
    statistics), by which images go back to the [0, 1] colours the palette holds; recorded in ``arch``."""
    in_chans = 3

    def __init__(self, img_size: int = 32, resolution: int = 16, palette_size: int = 512, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, causal: bool = True,
                 feature_layer: Optional[int] = None, patch_size: Optional[int] = None, pixels=None):
        super().__init__()
        self.pixels = PixelSpec.from_dict(pixels, 3)
        if self.pixels.in_chans != 3:
            raise ValueError(f"iGPT's palette is of RGB colours; the pixel spec has {self.pixels.in_chans} channel(s)")
        if img_size % resolution or (patch_size is not None and patch_size * resolution != img_size):
            raise ValueError(f"the image size {img_size} must be the resolution {resolution} x the patch size")
        # patch_size: how many input pixels one sequence element stands for (what a ViT's patch size tells the
        # evaluations: image sizes must be multiples of it)
        self.arch = dict(img_size=img_size, resolution=resolution, palette_size=palette_size, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, causal=causal,
                         feature_layer=feature_layer, patch_size=img_size // resolution)
        if pixels:
            self.arch["pixels"] = self.pixels.to_dict()
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
            return self.palette.encode(images.float(), self.resolution, self.pixels)

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
