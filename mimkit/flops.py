"""The one FLOP counter of mimkit (``mimkit bench`` and ``mimkit sweep``): ``torch.utils.flop_counter`` with the CPU
flash-attention kernels it does not list."""
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _flop_formulas():
    """FLOP formulas for the CPU flash-attention kernels, which torch.utils.flop_counter does not list."""
    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def counted_flops(run: Callable[[], None]) -> float:
    """FLOPs of what ``run`` computes (matmuls, convolutions, attention), by ``torch.utils.flop_counter``: the one
    FLOP counter of mimkit (``mimkit bench`` and ``mimkit sweep``)."""
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with counter:
        run()
    return counter.get_total_flops()
