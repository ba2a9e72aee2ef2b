"""Numeric precision: the one autocast helper every training, evaluation and benchmark path uses."""
from contextlib import nullcontext

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision: str):
    """A context running matmuls in ``precision`` ('fp32': plain fp32, no autocast) on ``device`` (a
    ``torch.device``, or its type as a string)."""
    if precision == "fp32":
        return nullcontext()
    device_type = device if isinstance(device, str) else device.type
    return torch.autocast(device_type, dtype=DTYPES[precision])
