"""What every objective shares: its options, the mask ratio rule, the encoder factory and mask-token encoding.

- ``ObjectiveOptions``: the base of each objective's ``Options`` dataclass; its fields are ``mimkit.config.opt``
  fields, parsed from ``objective_args`` by the same machinery as command options (``config.build_options``);
- ``resolve_mask_ratio``: ``objective_args.mask_ratio``, else ``--mask-ratio``, else the objective's paper value;
- ``make_encoder``: the ``--model`` encoder, initialised as MAE initialises its own (``models.mae.init_like_mae``);
- ``require_rgb``: the RGB-only rule, of objectives (``rgb_only``) and of targets;
- ``patch_grid``: the grid of patches of a batch; ``training_images``: the sample palettes and PCA bases fit on;
- ``open_tokenizer`` / ``FrozenTokenizer``: the trained VQ tokenizer BEiT and MAE's token target predict;
- ``encode_with_mask_tokens`` / ``masked_mean``: the encoder over every position with hidden ones as a mask token;
- ``MaskTokenObjective``: the encoder + mask token + linear head that SimMIM, ViT-MPP and BEiT share.

``MaskTokenObjective``'s attribute names are the checkpoints' key names (``encoder.*``, ``mask_token``,
``head.weight``, ``head.bias``): renaming one breaks existing checkpoints.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..data import fit_images, open_images, split_train_val
from ..data.hfdata import dataset_options
from ..errors import CheckpointError, ConfigError
from ..models import MaskedViT, create_encoder, encoder_overrides, freeze
from ..models.vq import load_tokenizer
from ..models.mae import init_like_mae


@dataclass
class ObjectiveOptions:
    """An objective's ``objective_args``: subclass it with ``config.opt(default, help)`` fields and a ``validate()``
    that raises ``ConfigError`` naming the key (the registry prefixes ``--objective-args:`` and the objective)."""

    def validate(self):
        pass


def check_fraction(options, *names):
    """Each named option is None or a number in (0, 1)."""
    for n in names:
        v = getattr(options, n)
        if v is not None and not 0 < v < 1:
            raise ConfigError(f"{n} must be in (0, 1), got {v}")


def check_positive(options, *names):
    """Each named option is None or an integer >= 1."""
    for n in names:
        v = getattr(options, n)
        if v is not None and v < 1:
            raise ConfigError(f"{n} must be >= 1, got {v}")


def resolve_mask_ratio(cfg, option: Optional[float], paper: float) -> float:
    """The ratio an objective trains at: ``objective_args.mask_ratio`` (``option``) if given, else ``--mask-ratio``
    if given, else the objective's paper value. Given both, they must agree: neither silently replaces the other."""
    if option is not None and cfg.mask_ratio is not None and option != cfg.mask_ratio:
        raise ConfigError(f"--mask-ratio {cfg.mask_ratio} and --objective-args mask_ratio {option} disagree; "
                          f"give one")
    for value in (option, cfg.mask_ratio):
        if value is not None:
            return float(value)
    return float(paper)


def make_encoder(cfg):
    """The ``--model`` preset at ``--img-size`` (0: the preset's) for the run's input channels, initialised as MAE
    initialises its encoder, so every objective starts from the same weights distribution."""
    try:
        encoder = create_encoder(cfg.model, **encoder_overrides(cfg))
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    return init_like_mae(encoder)


def require_rgb(in_chans: int, what: str, why: str, fix: str = ""):
    """The one RGB rule: ``what`` (an objective, or one of its targets) works on 3-channel images only."""
    if in_chans != 3:
        raise ConfigError(f"{what} works on RGB images only ({why}); the data has {in_chans} channel(s){fix}")


def patch_grid(images: torch.Tensor, patch_size: int) -> Tuple[int, int]:
    """(rows, columns) of patches of a batch: the grid every objective's masks and positions are drawn on."""
    return images.shape[-2] // patch_size, images.shape[-1] // patch_size


def open_tokenizer(objective: str, path):
    """The frozen tokenizer named by ``objective_args.tokenizer``; a missing or bad one is a one-line ConfigError."""
    if not path:
        raise ConfigError(f"--objective-args: objective {objective} needs tokenizer: PATH "
                          f"(train one with `mimkit tokenizer train --data ... --output ...`)")
    try:
        return load_tokenizer(path)
    except CheckpointError as e:
        raise ConfigError(f"--objective-args: tokenizer: {e}") from None


class FrozenTokenizer(nn.Module):
    """Holds the tokenizer so its weights travel with the objective's checkpoint but are never trained."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = freeze(tokenizer)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        with torch.autocast(images.device.type, enabled=False):
            return self.tokenizer.encode(images.float())


def training_images(cfg, num_images: int, img_size: int, pixels=None) -> torch.Tensor:
    """Up to ``num_images`` of the run's training images, as ``pretrain`` opens and splits them (Hugging Face
    dataset options included): what palettes and PCA bases are fitted on."""
    source = open_images(cfg.data, **dataset_options(cfg))
    return fit_images(source, split_train_val(source, cfg.val_fraction)[0], num_images, img_size, pixels)


def encode_with_mask_tokens(encoder, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                            tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``encoder`` over every position with hidden patches replaced by ``mask_token``: (B, 1 + L, D)."""
    t = encoder.patch_tokens(images) if tokens is None else tokens
    t = torch.where(mask[..., None], mask_token.to(t.dtype), t)
    return encoder.forward_tokens(t, grid_hw=patch_grid(images, encoder.patch_size))


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L) values over the positions where ``mask`` is True."""
    m = mask.float()
    return (per_position * m).sum() / m.sum().clamp_min(1)


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
