"""Numeric precision: the one autocast helper every training, evaluation and benchmark path uses, and the rule
that turns ``--precision auto`` into a concrete choice."""
import os
from contextlib import nullcontext
from typing import Tuple

import torch

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What 'auto' means, set by the environment instead of the device: the same suite and the same runs can then be
# had under either choice on any machine (a test run under both, a cluster that pins one). Unset: the device decides.
AUTO_ENV = "MIMKIT_AUTO_PRECISION"


def resolve(precision: str, device) -> Tuple[str, str]:
    """``(chosen, why)``: 'auto' becomes what ``MIMKIT_AUTO_PRECISION`` pins, else the device's rule
    (:func:`device_choice`). An explicit choice is returned as given."""
    if precision != "auto":
        return precision, "as asked"
    pinned = os.environ.get(AUTO_ENV, "").strip()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ConfigError(f"{AUTO_ENV}={pinned!r}: 'auto' can be pinned to fp32 or bf16")
        return pinned, f"{AUTO_ENV}={pinned} in the environment"
    return device_choice(device)


def device_choice(device) -> Tuple[str, str]:
    """``(chosen, why)``: bf16 where ``device`` runs it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX),
    else fp32; fp16 is never chosen automatically (it needs loss scaling and overflows where bf16 does not), it
    stays opt-in on GPUs."""
    device = torch.device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        native = [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]
        cpu = caps.get("cpu_name") or "this CPU"
        if native:
            return "bf16", f"{cpu} has {' and '.join(n.upper() for n in native)}"
        return "fp32", f"{cpu} has neither AVX512-BF16 nor AMX: its bf16 matmuls run in slow generic kernels"
    return "fp32", f"no native bf16 rule for {device.type} devices"


def autocast(device, precision: str):
    """A context running matmuls in ``precision`` ('fp32': plain fp32, no autocast) on ``device`` (a
    ``torch.device``, or its type as a string)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r} must be resolved first (mimkit.precision.resolve)")
    device_type = device if isinstance(device, str) else device.type
    return torch.autocast(device_type, dtype=DTYPES[precision])
