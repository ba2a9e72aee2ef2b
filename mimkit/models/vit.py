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
import torch.nn.functional as F
from timm.layers import Attention as _TimmAttention
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ..pixels import PixelSpec
from .pos_embed import sincos_2d

_LOW_PRECISION = (torch.bfloat16, torch.float16)
PLAIN_FP32_MAX_TOKENS = 65  # measured plain-faster up to here (tiny32's 17 and 65 tokens), fused-faster at 197


class Attention(_TimmAttention):
    """timm's attention (same parameters and state dict keys), with measured exceptions on the CPU.

    Everything goes through timm's forward, i.e. ``F.scaled_dot_product_attention`` (fused kernels), except on
    the CPU for bf16/fp16 at any length, and for fp32 up to ``PLAIN_FP32_MAX_TOKENS``: there PyTorch's fused CPU
    kernel is slower than a plain matmul-softmax-matmul (bf16: 2-5x at 17-197 tokens; fp32: 1.2-1.4x on two
    threads at the tiny32 shapes, 17 and 65 tokens; at 197 tokens fp32 the fused kernel wins, 86 against 179 ms;
    benchmarks/attention_shapes.py), so those cases compute the same attention with plain ops.
    ``fused_attn = False`` (e.g. for FLOP counting) still selects timm's unfused path.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if (attn_mask is not None or is_causal or not self.fused_attn or x.device.type != "cpu"
                or getattr(self, "gate", None) is not None
                or not (_low_precision(x) or x.shape[1] <= PLAIN_FP32_MAX_TOKENS)):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def _low_precision(x: torch.Tensor) -> bool:
    if x.dtype in _LOW_PRECISION:
        return True
    return torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) in _LOW_PRECISION


class MaskedViT(VisionTransformer):
    """``in_chans``: input channels (any count; recorded in ``arch`` when not 3). ``pixels``: how files map to
    this input (a :class:`mimkit.pixels.PixelSpec`, or its stored dict), kept as ``self.pixels`` and recorded in
    ``arch`` so checkpoints and exports carry it, as timm's ``pretrained_cfg`` keeps mean and std; None is the
    default for ``in_chans`` (8-bit RGB with ImageNet's statistics), and is not recorded."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 0, global_pool: str = "token",
                 drop_path_rate: float = 0.0, fixed_pos_embed: bool = True, in_chans: int = 3,
                 pixels=None, **kwargs):
        self.arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio)
        if in_chans != 3:  # RGB checkpoints keep their arch as before
            self.arch["in_chans"] = in_chans
        self.pixels = PixelSpec.from_dict(pixels, in_chans)
        if self.pixels.in_chans != in_chans:
            raise ValueError(f"the pixel spec has {self.pixels.in_chans} channel(s), the encoder {in_chans}")
        if pixels:
            self.arch["pixels"] = self.pixels.to_dict()
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=num_classes, in_chans=in_chans,
                         global_pool=global_pool, drop_path_rate=drop_path_rate,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **{"attn_layer": Attention, **kwargs})
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

    def patch_tokens(self, imgs: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed the patches, (B, C, H, W) -> (B, L, D), or only the patches ``ids_keep`` -> (B, K, D);
        without position embeddings."""
        p = self.patch_size
        if imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not divisible by the patch size {p}")
        pe = self.patch_embed
        if ids_keep is None:
            # timm's PatchEmbed.forward asserts the training size; its projection works at any size
            return pe.norm(pe.proj(imgs).flatten(2).transpose(1, 2))
        # the visible patches only: one gather of their pixels, then the projection as one matmul
        b, c, h, w = imgs.shape
        gw = w // p
        cells = imgs.reshape(b, c, h // p, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p): a view
        pixels = cells[torch.arange(b, device=imgs.device).unsqueeze(1), ids_keep // gw, ids_keep % gw]
        return pe.norm(F.linear(pixels.flatten(2), pe.proj.weight.flatten(1), pe.proj.bias))

    def position_table(self, grid_hw) -> torch.Tensor:
        """(1, 1 + h*w, D) position embeddings for a grid; resampled when it differs from training."""
        if tuple(grid_hw) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid_hw), old_size=list(self.patch_embed.grid_size),
                                      num_prefix_tokens=1)

    def forward_tokens(self, tokens: torch.Tensor, ids_keep: Optional[torch.Tensor] = None, grid_hw=None,
                       attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep ``ids_keep`` of the (B, L, D) patch tokens (all when None), add positions, prepend the class
        token, run the blocks."""
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.forward_visible(tokens, ids_keep, grid_hw, attn_mask)

    def forward_visible(self, tokens: torch.Tensor, ids_keep: Optional[torch.Tensor] = None, grid_hw=None,
                        attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens of the patches ``ids_keep`` (B, K, D) (all L in order when None): add their positions, prepend
        the class token, run the blocks -> (B, 1 + K, D)."""
        pos = self.position_table(grid_hw or self.patch_embed.grid_size)
        x = tokens + (pos[:, 1:] if ids_keep is None else pos[0, 1:][ids_keep])
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = self.norm_pre(self.pos_drop(torch.cat([cls, x], dim=1)))
        if attn_mask is not None:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models import checkpoint_seq
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor, ids_keep: Optional[torch.Tensor] = None,
                         attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + K, D); any H, W divisible by the patch size. timm's ``forward`` calls this."""
        if is_causal:
            raise ValueError("a ViT over image patches is not causal")
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        # with ids_keep (MAE), only the visible patches are embedded at all
        return self.forward_visible(self.patch_tokens(imgs, ids_keep), ids_keep, grid_hw=grid, attn_mask=attn_mask)

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


def adapt_patch_projection(weight: torch.Tensor, in_chans: int, rgb=None, source_rgb=(0, 1, 2)) -> torch.Tensor:
    """A patch projection (D, 3, p, p) trained on RGB for ``in_chans`` inputs.

    With ``rgb`` (the channels playing red, green, blue): the red, green and blue kernels (channels
    ``source_rgb`` of ``weight``) go to those channels, every other channel starts from the mean of the three, and
    all are scaled by 3 / in_chans, so that the kernels sum to what RGB's did (an even input gets the response it
    got from the RGB model, as timm's rule keeps it). Without roles, timm's own rule for its pretrained first
    convolutions (``timm.models.adapt_input_conv``): one channel takes the sum over R, G, B, more channels repeat
    R, G, B cyclically (channel i gets RGB's i mod 3) and scale by 3 / in_chans."""
    if rgb is None:
        from timm.models import adapt_input_conv
        return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    w = weight.float()
    out = w[:, list(source_rgb)].mean(1, keepdim=True).repeat(1, in_chans, 1, 1)
    for src, dst in zip(source_rgb, rgb):
        out[:, dst] = w[:, src]
    return (out * (3 / in_chans)).to(weight.dtype)
