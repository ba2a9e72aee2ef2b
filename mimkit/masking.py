"""Which patches to hide.

Every sampler returns a boolean mask of shape (B, L), True where a patch is hidden.
``random_masking`` is MAE's: per-sample uniform sampling by argsort of noise, which
also yields the index tensors that let the encoder gather the visible patches and
the decoder put them back in place.
"""
import math
import random
from typing import NamedTuple, Optional

import torch


class RandomMask(NamedTuple):
    ids_keep: torch.Tensor  # (B, K) indices of the visible patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) inverse permutation: unshuffles [visible, masked]
    mask: torch.Tensor  # (B, L) float, 1 = hidden, 0 = visible (as MAE and ViTMAE)


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
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return RandomMask(ids_shuffle[:, :keep], ids_restore, mask)


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
    return RandomMask(ids_shuffle[:, :keep], torch.argsort(ids_shuffle, dim=1), mask.float())


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


def block_masking(batch: int, grid_h: int, grid_w: int, mask_ratio: float, *, min_block: int = 16,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Block-wise masks for a batch, (B, L) bool; seeded from ``generator`` when given."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rng = random.Random(seed)
    num = grid_h * grid_w - num_visible(grid_h * grid_w, mask_ratio)
    return torch.stack([block_mask(grid_h, grid_w, num, min_block=min_block, rng=rng) for _ in range(batch)])


def grid_masking(batch: int, grid_h: int, grid_w: int, keep_every: int = 2) -> torch.Tensor:
    """MAE's 'grid' ablation: keep one patch in every ``keep_every`` x ``keep_every`` cell (75% for 2)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    keep = (ys % keep_every == 0) & (xs % keep_every == 0)
    return (~keep).flatten().unsqueeze(0).expand(batch, -1).clone()
