"""Frozen networks: a teacher, a tokenizer or an evaluated encoder that gradients never reach."""
import torch.nn as nn


def freeze(module: nn.Module) -> nn.Module:
    """``module`` without gradients, in eval mode (dropout, drop-path and batch-norm statistics fixed)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
