"""Which patches to hide: every mask of every objective comes from here.

Every mask is a boolean tensor of shape (B, L), True where a patch is hidden:

- ``random_masking``: MAE's per-sample uniform sampling by argsort of noise, returned as a ``RandomMask``
  (the bool ``mask`` plus the index tensors that let an encoder gather the visible patches and a
  decoder put them back in place); MAE, its ablations, SimMIM, BEiT's random option, ViT-MPP and
  iGPT-BERT all draw their random masks with it;
- ``block_mask``: BEiT's block-wise algorithm for one image; ``grid_masking``: MAE's grid ablation;
- ``draw_mask(kind, ...)``: any of the three for a batch, from the engine's per-step noise, so a mask
  depends only on (seed, step, sample), never on how the batch is split over processes;
- ``mask_to_ids``: the index form of any mask with the same count per row.
"""
import math
import random
from typing import NamedTuple, Optional

import torch


class RandomMask(NamedTuple):
    ids_keep: torch.Tensor  # (B, K) indices of the visible patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) inverse permutation: unshuffles [visible, masked]
    mask: torch.Tensor  # (B, L) bool, True = hidden


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept visible; MAE truncates, so L=196, r=0.75 keeps 49."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(batch: int, num_patches: int, mask_ratio: float, *, noise: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, device=None) -> RandomMask:
    """MAE's masking: keep the patches with the smallest noise.

    Pass ``noise`` (B, L) or a ``generator`` to make the mask reproducible.
    """
    if noise is None:
        noise = torch.rand(batch, num_patches, generator=generator,
                           device=generator.device if generator is not None else device)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
    keep = num_visible(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # each patch's rank in the noise
    return RandomMask(ids_shuffle[:, :keep], ids_restore, ids_restore >= keep)


def mask_to_ids(mask: torch.Tensor) -> RandomMask:
    """Turn any boolean mask with the same count per row into MAE's index form.

    Lets block-wise or grid masks drive an encoder that sees visible patches only.
    """
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must hide the same number of patches to drop them from the encoder")
    # stable sort puts visible (0) before hidden (1) and keeps spatial order within each
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    keep = mask.shape[1] - int(counts[0])
    return RandomMask(ids_shuffle[:, :keep], torch.argsort(ids_shuffle, dim=1), mask.bool())


def block_mask(grid_h: int, grid_w: int, num_masked: int, *, min_block: int = 16, min_aspect: float = 0.3,
               rng: Optional[random.Random] = None) -> torch.Tensor:
    """BEiT's block-wise masking for one image: (grid_h * grid_w,) bool with exactly ``num_masked`` hidden.

    Rectangles of random area (at least ``min_block`` patches) and log-uniform aspect
    ratio are added until the count is reached; the last patches, if a block
    overshoots or no block fits, are topped up or trimmed at random so every image
    hides the same number (needed to drop them from an encoder).
    """
    rng = rng or random
    total = grid_h * grid_w
    if not 0 <= num_masked <= total:
        raise ValueError(f"cannot mask {num_masked} of {total} patches")
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    min_block = min(min_block, num_masked) if num_masked else 0
    for _ in range(100):
        left = num_masked - int(mask.sum())
        if left <= 0:
            break
        for _ in range(10):
            area = rng.uniform(min_block, max(min_block, left))
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 1 <= h <= grid_h and 1 <= w <= grid_w:
                top, lft = rng.randint(0, grid_h - h), rng.randint(0, grid_w - w)
                block = mask[top:top + h, lft:lft + w]
                if 0 < h * w - int(block.sum()) <= left:
                    block.fill_(True)
                    break
    flat = mask.flatten()
    diff = num_masked - int(flat.sum())
    if diff:
        pool = (~flat if diff > 0 else flat).nonzero().flatten().tolist()
        for i in rng.sample(pool, abs(diff)):
            flat[i] = diff > 0
    return flat


def grid_masking(batch: int, grid_h: int, grid_w: int, keep_every: int = 2) -> torch.Tensor:
    """MAE's 'grid' ablation: keep one patch in every ``keep_every`` x ``keep_every`` cell (75% for 2)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    keep = (ys % keep_every == 0) & (xs % keep_every == 0)
    return (~keep).flatten().unsqueeze(0).expand(batch, -1).clone()


MASKINGS = ("random", "block", "grid")


def uniform(rng, batch: int, *shape, device=None) -> torch.Tensor:
    """The engine's per-step noise (``rng.rand``) when there is one, else ``torch.rand``."""
    if rng is not None:
        return rng.rand(batch, *shape).to(device) if device is not None else rng.rand(batch, *shape)
    return torch.rand(batch, *shape, device=device)


def grid_keep_every(mask_ratio: float) -> int:
    """The grid cell side whose one kept patch hides closest to ``mask_ratio`` (2 for 0.75)."""
    return max(2, int(round(1 / math.sqrt(max(1e-6, 1 - mask_ratio)))))


def default_min_block(num_patches: int) -> int:
    """BEiT's smallest block is 16 of 196 patches; keep that share on other grids (at least 4)."""
    return max(4, int(round(16 * num_patches / 196)))


def draw_mask(kind: str, batch: int, grid_hw, mask_ratio: float, rng=None, device=None,
              min_block: Optional[int] = None) -> torch.Tensor:
    """(B, L) bool, True = hidden, with the same count in every row (so hidden patches can be dropped).

    - ``random``: :func:`random_masking` (MAE's), the ``mask_ratio`` share with the largest noise;
    - ``block``: BEiT's block-wise algorithm, seeded per sample from the step noise;
    - ``grid``: keep one patch per k x k cell (k = 2 hides 75%); ``mask_ratio`` picks k.
    """
    gh, gw = grid_hw
    n = gh * gw
    if kind == "random":
        return random_masking(batch, n, mask_ratio, noise=uniform(rng, batch, n, device=device)).mask
    if kind == "block":
        seeds = (uniform(rng, batch, 1).flatten().double() * (2 ** 31 - 1)).long().tolist()
        hidden = n - num_visible(n, mask_ratio)
        mb = default_min_block(n) if min_block is None else min_block
        masks = [block_mask(gh, gw, hidden, min_block=mb, rng=random.Random(s)) for s in seeds]
        return torch.stack(masks).to(device)
    if kind == "grid":
        return grid_masking(batch, gh, gw, grid_keep_every(mask_ratio)).to(device)
    raise ValueError(f"unknown masking {kind!r}; choose from {', '.join(MASKINGS)}")
