"""The ViT encoder: a plain timm VisionTransformer that can also encode a subset of patches.

Everything timm knows (blocks, fused attention, drop path, grad checkpointing, heads,
layer-decay grouping) comes from timm; we add only what masked image modeling needs:
fixed sin-cos position embeddings and a forward pass over the visible patches.
The state dict keeps timm's names, so an exported encoder loads into
``timm.create_model('vit_base_patch16_224')`` as is.
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from .pos_embed import sincos_2d


class MaskedViT(VisionTransformer):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 0, global_pool: str = "token",
                 drop_path_rate: float = 0.0, fixed_pos_embed: bool = True, **kwargs):
        self.arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio)
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=num_classes,
                         global_pool=global_pool, drop_path_rate=drop_path_rate,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
        gh, gw = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(embed_dim, gh, gw, cls_token=True))
        # MAE keeps the sin-cos table fixed; fine-tuning may unfreeze it (it is a Parameter as in timm)
        self.pos_embed.requires_grad_(not fixed_pos_embed)

    @property
    def grid_size(self):
        return self.patch_embed.grid_size

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def patch_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Embed the patches, (B, 3, H, W) -> (B, L, D), without position embeddings."""
        p = self.patch_size
        if imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not divisible by the patch size {p}")
        pe = self.patch_embed
        # timm's PatchEmbed.forward asserts the training size; its projection works at any size
        return pe.norm(pe.proj(imgs).flatten(2).transpose(1, 2))

    def position_table(self, grid_hw) -> torch.Tensor:
        """(1, 1 + h*w, D) position embeddings for a grid; resampled when it differs from training."""
        if tuple(grid_hw) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid_hw), old_size=list(self.patch_embed.grid_size),
                                      num_prefix_tokens=1)

    def forward_tokens(self, tokens: torch.Tensor, ids_keep: Optional[torch.Tensor] = None, grid_hw=None,
                       attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add positions, keep ``ids_keep`` patches (all when None), prepend the class token, run the blocks."""
        pos = self.position_table(grid_hw or self.patch_embed.grid_size)
        x = tokens + pos[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = self.norm_pre(self.pos_drop(torch.cat([cls, x], dim=1)))
        if attn_mask is not None:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor, ids_keep: Optional[torch.Tensor] = None,
                         attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + K, D); any H, W divisible by the patch size. timm's ``forward`` calls this."""
        if is_causal:
            raise ValueError("a ViT over image patches is not causal")
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        return self.forward_tokens(self.patch_tokens(imgs), ids_keep, grid_hw=grid, attn_mask=attn_mask)

    def extract(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Per-image features: 'cls' (class token), 'mean' (mean of patch tokens) or 'all' (every token)."""
        x = self.forward_features(imgs)
        if pool == "cls":
            return x[:, 0]
        if pool == "mean":
            return x[:, 1:].mean(1)
        if pool == "all":
            return x
        raise ValueError(f"pool must be one of cls, mean, all; got {pool!r}")
