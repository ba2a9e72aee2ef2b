"""What the lineage objectives predict, and the masks they hide it behind.

Targets (all computed from the normalised input batch, no gradient):

- ``pixel_target``: MAE's patches of pixels, optionally normalised per patch;
- ``PCATarget``: whitened coefficients of the largest principal components of patch pixels (MAE Table 1);
- ``mean_colour_classes`` / ``mosaic_classes``: the ViT paper's 3-bit colour targets;
- ``Palette``: iGPT's k-means colour palette and the mapping of pixels to its indices.

Masks: ``draw_mask`` gives a (B, L) bool mask (True = hidden) by MAE's random sampling,
BEiT's block-wise algorithm or a fixed grid, drawn from the engine's per-step noise so a
mask depends only on (seed, step, sample), never on how the batch is split over processes.
"""
import logging
import math
import random
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import MEAN, STD
from ..masking import block_mask, grid_masking, num_visible
from ..models.mae import patchify

log = logging.getLogger("mimkit")
MASKINGS = ("random", "block", "grid")


# options ------------------------------------------------------------------------------------------
def check_args(objective: str, args: Optional[dict], valid: dict) -> dict:
    """``objective_args`` merged over ``valid`` (the defaults); an unknown key is a one-line ConfigError."""
    from ..errors import ConfigError
    args = dict(args or {})
    for key in args:
        if key not in valid:
            raise ConfigError(f"--objective-args: unknown key {key!r} for objective {objective} "
                              f"(valid: {', '.join(valid)})")
    return {**valid, **args}


def check_choice(objective: str, key: str, value, choices):
    from ..errors import ConfigError
    if value not in choices:
        raise ConfigError(f"--objective-args: {key} for objective {objective} must be one of "
                          f"{', '.join(map(str, choices))}; got {value!r}")


def check_fraction(objective: str, key: str, value, lo_open=True):
    from ..errors import ConfigError
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1 if lo_open else 0 <= value < 1):
        raise ConfigError(f"--objective-args: {key} for objective {objective} must be a number in (0, 1); got {value!r}")


def resolve_ratio(cfg, args: dict, paper_default: float) -> float:
    """The mask ratio of an objective whose paper used its own: ``objective_args.mask_ratio`` if given, else
    ``--mask-ratio`` when it was changed from its default (0.75), else the paper's value."""
    from ..config import PretrainConfig
    if args.get("mask_ratio") is not None:
        return float(args["mask_ratio"])
    default = PretrainConfig.__dataclass_fields__["mask_ratio"].default
    if cfg.mask_ratio != default:
        return float(cfg.mask_ratio)
    log.info("%s: mask ratio %g, the paper's (objective_args mask_ratio sets another)", cfg.objective, paper_default)
    return paper_default


def check_int(objective: str, key: str, value, lo: int = 1):
    from ..errors import ConfigError
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"--objective-args: {key} for objective {objective} must be an integer >= {lo}; got {value!r}")


def check_bool(objective: str, key: str, value):
    from ..errors import ConfigError
    if not isinstance(value, bool):
        raise ConfigError(f"--objective-args: {key} for objective {objective} must be true or false; got {value!r}")


# the shared encoder ----------------------------------------------------------------------------------
def make_encoder(cfg):
    """The ``--model`` preset at ``--img-size`` (0: the preset's), initialised as MAE initialises its encoder,
    so every objective starts from the same weights distribution."""
    from ..errors import ConfigError
    from ..models import create_encoder
    try:
        encoder = create_encoder(cfg.model, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    return init_like_mae(encoder)


def init_like_mae(module: nn.Module) -> nn.Module:
    """Xavier-uniform linears (a ViT's patch projection seen as a linear), zero biases, unit norms, N(0, .02) tokens."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    pe = getattr(module, "patch_embed", None)
    if pe is not None:
        w = pe.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
    if getattr(module, "cls_token", None) is not None:
        nn.init.normal_(module.cls_token, std=0.02)
    return module


@torch.no_grad()
def fit_images(cfg, num_images: int, img_size: int) -> torch.Tensor:
    """Up to ``num_images`` normalised training images (the training split of ``cfg.data``, evenly spread over it,
    no augmentation), on the CPU: what palettes and PCA bases are fitted on. Every process gets the same ones."""
    from ..data import make_loader, open_images, split_train_val
    source = open_images(cfg.data)
    train_idx, _ = split_train_val(source, cfg.val_fraction)
    if not train_idx:
        from ..errors import ConfigError
        raise ConfigError(f"--data {cfg.data}: no training images to fit on")
    step = max(1, len(train_idx) // num_images)
    chosen = train_idx[::step][:num_images]
    loader = make_loader(source, chosen, batch_size=256, recipe="eval", img_size=img_size, shuffle=False,
                         num_workers=0, cache="off", device="cpu")
    return torch.cat([images for images, _ in loader])


# pixels -------------------------------------------------------------------------------------------
# the data pipeline normalises with ImageNet's statistics (as MAE); colour targets work on [0, 1] pixels
IMAGE_MEAN, IMAGE_STD = MEAN, STD


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Undo the input normalisation: (B, 3, H, W) in [0, 1]."""
    mean = images.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def from_unit(pixels: torch.Tensor) -> torch.Tensor:
    mean = pixels.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def pixel_target(images: torch.Tensor, patch: int, normalize: bool) -> torch.Tensor:
    """(B, L, p*p*3) patches; with ``normalize`` each patch by its own mean and (unbiased) variance, as MAE."""
    t = patchify(images.float(), patch)
    if normalize:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    return t


def quantize(unit: torch.Tensor, bits: int) -> torch.Tensor:
    """[0, 1] values to integer levels 0 .. 2**bits - 1 (equal-width bins)."""
    levels = 2 ** bits
    return (unit * levels).floor().clamp_(0, levels - 1).long()


def mean_colour_classes(images: torch.Tensor, patch: int, bits: int = 3) -> torch.Tensor:
    """The ViT paper's first target: each patch's mean colour at ``bits`` per channel, one class of
    2**(3*bits) (512 for 3 bits), numbered r * 64 + g * 8 + b. (B, L) long."""
    mean = F.avg_pool2d(to_unit(images), patch)  # (B, 3, gh, gw)
    q = quantize(mean, bits)
    levels = 2 ** bits
    cls = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    return cls.flatten(1)


def mosaic_classes(images: torch.Tensor, patch: int, size: int = 4, bits: int = 3) -> torch.Tensor:
    """The ViT paper's second target: each patch downsized to ``size`` x ``size`` at ``bits`` per channel,
    (B, L, size*size*3) levels in (row, col, channel) order, each predicted as one of 2**bits classes."""
    if patch % size:
        raise ValueError(f"the mosaic size {size} must divide the patch size {patch}")
    small = F.avg_pool2d(to_unit(images), patch // size)  # (B, 3, gh*size, gw*size)
    return patchify(quantize(small, bits), size)


class PCATarget(nn.Module):
    """Whitened coefficients of the ``k`` largest principal components of (B, L, D) patch vectors.

    Fitted once on patches of the training data; the basis is kept as buffers so a checkpoint holds it.
    """

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(k, dim))  # rows: principal directions
        self.register_buffer("scale", torch.ones(k))  # 1 / sqrt(eigenvalue)

    @torch.no_grad()
    def fit(self, patches: torch.Tensor) -> "PCATarget":
        x = patches.reshape(-1, patches.shape[-1]).double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = evals.argsort(descending=True)[:self.k]
        self.mean.copy_(mean.float())
        self.components.copy_(evecs[:, order].T.float())
        self.scale.copy_(evals[order].clamp_min(1e-8).rsqrt().float())
        return self

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        with torch.autocast(patches.device.type, enabled=False):  # a target: full precision
            return ((patches.float() - self.mean) @ self.components.T) * self.scale


# iGPT's palette -------------------------------------------------------------------------------------
class Palette(nn.Module):
    """A k-means colour palette: ``centers`` (K, 3) in [0, 1] RGB; pixels map to the nearest centre."""

    def __init__(self, size: int = 512):
        super().__init__()
        self.size = size
        self.register_buffer("centers", torch.rand(size, 3))

    @torch.no_grad()
    def fit(self, pixels: torch.Tensor, iters: int = 20, seed: int = 0) -> "Palette":
        """Lloyd's k-means on (N, 3) pixels in [0, 1], seeded by k-means++; empty clusters are re-seeded from
        the worst-fitted pixels."""
        x = pixels.reshape(-1, 3).float()
        g = torch.Generator().manual_seed(seed)
        if x.shape[0] < self.size:
            raise ValueError(f"need at least {self.size} pixels to fit a {self.size}-colour palette, got {x.shape[0]}")
        seed_from = x[torch.randperm(x.shape[0], generator=g)[:max(self.size, 20_000)]]
        centers = _kmeans_pp(seed_from, self.size, g)
        for _ in range(iters):
            nearest, dist = _nearest(x, centers)
            counts = torch.bincount(nearest, minlength=self.size).float()
            sums = torch.zeros_like(centers).index_add_(0, nearest, x)
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
            if empty.any():
                worst = dist.argsort(descending=True)[:int(empty.sum())]
                centers[empty] = x[worst]
        self.centers.copy_(centers)
        return self

    def assign(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3) pixels in [0, 1] -> (...) palette indices."""
        return _nearest(pixels.reshape(-1, 3).float(), self.centers.float())[0].reshape(pixels.shape[:-1])

    def encode(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> (B, resolution**2) indices: area-downsample, then nearest colour, row-major."""
        unit = to_unit(images)
        if unit.shape[-1] != resolution or unit.shape[-2] != resolution:
            unit = F.interpolate(unit, size=(resolution, resolution), mode="area")
        return self.assign(unit.permute(0, 2, 3, 1)).flatten(1)

    def decode(self, ids: torch.Tensor, resolution: int) -> torch.Tensor:
        """(B, resolution**2) indices -> (B, 3, r, r) pixels in [0, 1]."""
        return self.centers[ids].reshape(ids.shape[0], resolution, resolution, 3).permute(0, 3, 1, 2)


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536):
    """Index of and distance to the nearest centre for each row of ``x``, in chunks to bound memory."""
    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = torch.cdist(x[s:s + chunk], centers)
        v, i = d.min(1)
        idx.append(i)
        dist.append(v)
    if not idx:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
    return torch.cat(idx), torch.cat(dist)


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance."""
    centers = torch.empty(k, x.shape[1])
    centers[0] = x[torch.randint(0, x.shape[0], (1,), generator=g)]
    d2 = (x - centers[0]).pow(2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct colours than centres: repeat some
            idx = torch.randint(0, x.shape[0], (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=g)
        centers[i] = x[idx]
        d2 = torch.minimum(d2, (x - centers[i]).pow(2).sum(1))
    return centers


# masks -------------------------------------------------------------------------------------------------
def uniform(rng, batch: int, *shape, device=None) -> torch.Tensor:
    """The engine's per-step noise when there is one, else ``torch.rand``."""
    if rng is not None:
        return rng.rand(batch, *shape).to(device) if device is not None else rng.rand(batch, *shape)
    return torch.rand(batch, *shape, device=device)


def grid_keep_every(mask_ratio: float) -> int:
    """The grid cell side whose one kept patch hides closest to ``mask_ratio`` (2 for 0.75)."""
    return max(2, int(round(1 / math.sqrt(max(1e-6, 1 - mask_ratio)))))


def draw_mask(kind: str, batch: int, grid_hw, mask_ratio: float, rng=None, device=None,
              min_block: Optional[int] = None) -> torch.Tensor:
    """(B, L) bool, True = hidden, with the same count in every row (so hidden patches can be dropped).

    - ``random``: MAE's, the ``mask_ratio`` share with the largest noise;
    - ``block``: BEiT's block-wise algorithm, seeded per sample from the step noise;
    - ``grid``: keep one patch per k x k cell (k = 2 hides 75%); ``mask_ratio`` picks k.
    """
    gh, gw = grid_hw
    n = gh * gw
    if kind == "random":
        noise = uniform(rng, batch, n, device=device)
        keep = num_visible(n, mask_ratio)
        ranks = noise.argsort(1).argsort(1)
        return ranks >= keep
    if kind == "block":
        seeds = (uniform(rng, batch, 1).flatten().double() * (2 ** 31 - 1)).long().tolist()
        hidden = n - num_visible(n, mask_ratio)
        mb = default_min_block(n) if min_block is None else min_block
        masks = [block_mask(gh, gw, hidden, min_block=mb, rng=random.Random(s)) for s in seeds]
        return torch.stack(masks).to(device)
    if kind == "grid":
        return grid_masking(batch, gh, gw, grid_keep_every(mask_ratio)).to(device)
    raise ValueError(f"unknown masking {kind!r}; choose from {', '.join(MASKINGS)}")


def default_min_block(num_patches: int) -> int:
    """BEiT's smallest block is 16 of 196 patches; keep that share on other grids (at least 4)."""
    return max(4, int(round(16 * num_patches / 196)))


# mask tokens in the encoder ---------------------------------------------------------------------------
def encode_with_mask_tokens(encoder, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                            tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``encoder`` over every position with hidden patches replaced by ``mask_token``: (B, 1 + L, D)."""
    t = encoder.patch_tokens(images) if tokens is None else tokens
    t = torch.where(mask[..., None], mask_token.to(t.dtype), t)
    grid = (images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size)
    return encoder.forward_tokens(t, grid_hw=grid)


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over the positions where ``mask`` is True."""
    m = mask.float()
    return (per_position * m).sum() / m.sum().clamp_min(1)
