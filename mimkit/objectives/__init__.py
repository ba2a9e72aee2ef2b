"""Pretraining objectives: each turns a batch into a loss on the shared ViT encoder.

An objective is an ``nn.Module`` with ``forward(images, labels, rng) -> loss`` (or a dict
with ``loss`` and other scalars to log), an ``encoder`` attribute (the ViT to evaluate
and export), an ``arch`` dict and a ``build(arch)`` classmethod to rebuild it from a
checkpoint. ``rng`` is an :class:`mimkit.engine.StepRandom` (or None outside the engine).
Register new ones in ``OBJECTIVES``.
"""
from typing import Callable, Dict

from .beit import BEiTObjective
from .igpt import IGPTObjective
from .mae import MAEObjective
from .simmim import SimMIMObjective
from .vit_mpp import ViTMPPObjective

OBJECTIVES: Dict[str, Callable] = {
    "mae": MAEObjective,
    "simmim": SimMIMObjective,  # mask tokens in the encoder, a linear pixel head
    "vit_mpp": ViTMPPObjective,  # ViT's masked patch prediction (3-bit colour targets)
    "beit": BEiTObjective,  # tokens of a trained visual tokenizer, block-wise masks
    "igpt": IGPTObjective,  # palette pixels, GPT (causal) or BERT
}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def build_objective(cfg):
    """The objective named by ``cfg.objective`` for a PretrainConfig."""
    return get_objective(cfg.objective).from_config(cfg)
