"""What the objectives that feed a learned mask token to the encoder share (SimMIM, ViT-MPP, BEiT).

An ``encoder`` (a ``MaskedViT``), one ``mask_token`` (1, 1, D) and a linear ``head`` over the encoder's
output tokens, initialised as MAE initialises its own. The attribute names are the checkpoints' key names
(``encoder.*``, ``mask_token``, ``head.weight``, ``head.bias``): renaming one breaks existing checkpoints.
"""
import torch
import torch.nn as nn

from ..models import MaskedViT


class MaskTokenObjective(nn.Module):
    """Subclasses call ``super().__init__(encoder, out_dim)``, then set ``arch`` (``encoder=dict(encoder.arch)``
    plus their own ``__init__`` keyword arguments, which is what ``build`` reads back) and their options."""

    def __init__(self, encoder: MaskedViT, out_dim: int):
        super().__init__()
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.head = nn.Linear(encoder.embed_dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def build(cls, arch: dict):
        """Rebuild from a checkpoint's ``arch``: the encoder from ``arch['encoder']``, the rest as keyword arguments."""
        arch = dict(arch)
        return cls(MaskedViT(**arch.pop("encoder")), **arch)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"encoder.pos_embed", "encoder.cls_token", "mask_token"}
