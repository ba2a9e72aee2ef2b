"""The Masked Autoencoder (He et al. 2021), step by step: patchify, mask, encode, decode, loss.

Parameter names follow the official ``MaskedAutoencoderViT``, with the encoder (a timm ViT)
under ``encoder.``, so official checkpoints load by adding that one prefix.
"""
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from ..masking import RandomMask, random_masking
from .pos_embed import sincos_2d
from .vit import Attention, MaskedViT


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar: MSE over the hidden patches
    pred: torch.Tensor  # (B, L, p*p*C) predicted pixels (normalised per patch when norm_pix_loss)
    mask: torch.Tensor  # (B, L) float, 1 = hidden (as the official MAE and ViTMAE return it)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), row-major patches, pixels in (row, col, channel) order as MAE."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(t: torch.Tensor) -> torch.Tensor:
    """Each (..., D) patch by its own mean and (unbiased) variance: MAE's normalised-pixel target."""
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


def unpatchify(x: torch.Tensor, p: int, grid_hw=None, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`; a square grid unless ``grid_hw`` is given."""
    b, n, d = x.shape
    gh, gw = grid_hw or (int(n ** 0.5),) * 2
    if gh * gw != n or d != p * p * channels:
        raise ValueError(f"cannot unpatchify {n} patches of {d} values into a {gh}x{gw} grid of {p}x{p}x{channels}")
    x = x.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, gh * p, gw * p)


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: MaskedViT, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 pred_dim: Optional[int] = None):
        super().__init__()
        self.arch = dict(encoder=dict(encoder.arch), decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                         decoder_heads=decoder_heads, mlp_ratio=mlp_ratio, mask_ratio=mask_ratio,
                         norm_pix_loss=norm_pix_loss)
        if pred_dim is not None:  # another target than pixels (MAE's Table 1 ablations: PCA, tokens)
            self.arch["pred_dim"] = pred_dim
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size
        gh, gw = encoder.grid_size

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_dim, gh, gw), requires_grad=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, attn_layer=Attention)
            for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, pred_dim or self.patch_size ** 2 * encoder.in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        init_like_mae(self)

    # the paper's steps, in order -------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid_hw=None) -> torch.Tensor:
        return unpatchify(x, self.patch_size, grid_hw, self.encoder.in_chans)

    def random_masking(self, imgs: torch.Tensor, mask_ratio: float, noise=None, generator=None) -> RandomMask:
        gh, gw = imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size
        if noise is None and generator is None:  # rand(..., generator=None) does not trace with dynamic shapes
            noise = torch.rand(imgs.shape[0], gh * gw, device=imgs.device)
        return random_masking(imgs.shape[0], gh * gw, mask_ratio, noise=noise, generator=generator, device=imgs.device)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches only: (B, 1 + K, D); no mask token enters the encoder."""
        return self.encoder.forward_features(imgs, ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_hw=None) -> torch.Tensor:
        """Append one shared mask token per hidden patch, unshuffle, decode to pixels: (B, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, d): the class token, then the K visible patches
        b, n_vis, d = x.shape
        # one gather builds the whole sequence: position i takes its visible token or the mask token (last in src)
        src = torch.cat([x, self.mask_token.expand(b, 1, d)], dim=1)
        index = torch.where(ids_restore < n_vis - 1, ids_restore + 1, n_vis)
        index = torch.cat([index.new_zeros(b, 1), index], dim=1)  # the class token stays first
        x = torch.gather(src, 1, index.unsqueeze(-1).expand(-1, -1, d)) + self._decoder_positions(grid_hw)
        for blk in self.decoder_blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self._checkpointing() else blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pixels per patch, normalised by each patch's own mean and (unbiased) variance when norm_pix_loss."""
        t = self.patchify(imgs)
        return normalize_patches(t) if self.norm_pix_loss else t

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches only (``mask``: (B, L), 1 or True = hidden)."""
        mask = mask.float()
        per_patch = (pred.float() - self.target(imgs).float()).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> MAEOutput:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        m = self.random_masking(imgs, ratio, noise=noise, generator=generator)
        latent = self.forward_encoder(imgs, m.ids_keep)
        pred = self.forward_decoder(latent, m.ids_restore, self._grid(imgs))
        mask = m.mask.float()
        return MAEOutput(self.forward_loss(imgs, pred, mask), pred, mask)

    # helpers -----------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute activations in backward (encoder and decoder) to save memory; the decoder follows the
        encoder's flag, so ``model.encoder.set_grad_checkpointing()`` covers both."""
        self.encoder.set_grad_checkpointing(enable)

    def _checkpointing(self) -> bool:
        return self.encoder.grad_checkpointing and torch.is_grad_enabled()

    def _grid(self, imgs):
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def _decoder_positions(self, grid_hw):
        if grid_hw is None or tuple(grid_hw) == tuple(self.encoder.grid_size):
            return self.decoder_pos_embed
        return resample_abs_pos_embed(self.decoder_pos_embed, new_size=list(grid_hw),
                                      old_size=list(self.encoder.grid_size), num_prefix_tokens=1)

    def reconstruct(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None, noise=None, generator=None):
        """Predicted images in the input's pixel space and the (B, L) mask; undoes the per-patch normalisation
        with each hidden patch's true statistics, as the paper's figures do."""
        out = self.forward(imgs, mask_ratio, noise, generator)
        return self.predicted_images(imgs, out.pred), out.mask

    def predicted_images(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The decoder's (B, L, p*p*C) prediction as images in the input's pixel space (see :meth:`reconstruct`)."""
        pred = pred.float()
        if self.norm_pix_loss:
            t = self.patchify(imgs).float()
            pred = pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
        return self.unpatchify(pred, self._grid(imgs))

    @classmethod
    def from_arch(cls, arch: dict) -> "MaskedAutoencoder":
        """Rebuild from ``model.arch`` (as stored in checkpoints)."""
        arch = dict(arch)
        arch.pop("ablation", None)  # the MAE objective's Table 1 options (mimkit.objectives.mae), not the model's
        return cls(MaskedViT(**arch.pop("encoder")), **arch)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed"}


def init_like_mae(module: nn.Module) -> nn.Module:
    """MAE's initialisation, of an MAE or of an encoder alone (every objective's): xavier-uniform linears (the
    patch projection seen as a linear), zero biases, unit norms, then N(0, .02) class and mask tokens. The linears
    are drawn in module order (the official ``apply`` order for leaves), so an MAE's weights are MAE's."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    encoder = getattr(module, "encoder", module)
    pe = getattr(encoder, "patch_embed", None)
    if pe is not None:
        w = pe.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
    if getattr(encoder, "cls_token", None) is not None:
        nn.init.normal_(encoder.cls_token, std=0.02)
    if isinstance(getattr(module, "mask_token", None), nn.Parameter):
        nn.init.normal_(module.mask_token, std=0.02)
    return module
