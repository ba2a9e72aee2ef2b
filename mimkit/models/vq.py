"""The discrete visual tokenizer: a small VQ-VAE that turns each image patch into one of K code ids.

BEiT predicts the ids of a tokenizer trained beforehand (DALL-E's dVAE there); here it is trained on
the user's own images with ``mimkit tokenizer train`` (:mod:`mimkit.tokenizer`, the command). One code per ``patch_size`` x ``patch_size``
patch, so its grid matches a ViT with the same patch size:

    image -> conv encoder (log2(p) stride-2 convolutions, residual blocks) -> (B, C, H/p, W/p)
          -> nearest codebook entry (K codes of ``code_dim``) -> conv decoder -> image

The codebook learns either by exponential moving averages of the vectors assigned to each code
(``quantizer: ema``, k-means online, as VQ-VAE's appendix) or by gradient with the codebook loss
(``quantizer: st``); the encoder gets the straight-through gradient and the commitment loss in
both. Codes unused for a while are restarted on random encoder outputs, so a large codebook
(8192 by default) stays in use. The loss is the MSE of the reconstruction in the normalised input
space plus ``commitment`` x the commitment loss.
"""
import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint_files import load_checkpoint, load_latest, save_checkpoint
from ..errors import CheckpointError
from .frozen import freeze

FILE = "tokenizer.pt"


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.body(x)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a (K, C) codebook, with EMA or gradient updates and dead-code restarts."""

    def __init__(self, codebook_size: int, code_dim: int, quantizer: str = "ema", decay: float = 0.99,
                 restart_after: int = 100):
        super().__init__()
        self.size, self.dim, self.quantizer, self.decay = codebook_size, code_dim, quantizer, decay
        self.restart_after = restart_after
        init = torch.randn(codebook_size, code_dim) / math.sqrt(code_dim)
        if quantizer == "ema":
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("idle_steps", torch.zeros(codebook_size, dtype=torch.long))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) code ids, by squared distance, in chunks so 8192 codes stay cheap in memory."""
        cb = self.codebook.float()
        cb_sq = cb.pow(2).sum(1)
        out = []
        for s in range(0, z.shape[0], 4096):
            zc = z[s:s + 4096].float()
            d = zc.pow(2).sum(1, keepdim=True) - 2 * zc @ cb.T + cb_sq
            out.append(d.argmin(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def forward(self, z: torch.Tensor):
        """(B, C, h, w) -> quantised (straight-through), ids (B, h, w), commitment loss, codebook loss, stats."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        if self.training and not bool(self.initialised):
            self._init_from(flat)
        ids = self.nearest(flat)
        q = self.codebook[ids].float()
        commit = F.mse_loss(flat, q.detach())
        codebook_loss = F.mse_loss(q, flat.detach()) if self.quantizer == "st" else flat.new_zeros(())
        counts = torch.bincount(ids, minlength=self.size).float()
        if self.training:
            self._update(flat.detach(), ids, counts)
        q = flat + (q - flat).detach()  # straight-through estimator
        q = q.view(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
        probs = counts / counts.sum().clamp_min(1)
        stats = dict(perplexity=torch.exp(-(probs * (probs + 1e-10).log()).sum()).detach(),
                     used=(counts > 0).float().sum().detach())
        return q, ids.view(b, h, w), commit, codebook_loss, stats

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor):
        """Data-dependent start: the codes are random encoder outputs of the first batch (repeated when too few)."""
        g = torch.Generator().manual_seed(0)
        pick = torch.randint(0, flat.shape[0], (self.size,), generator=g).to(flat.device)
        init = flat[pick] + 1e-3 * torch.randn(self.size, self.dim, generator=g).to(flat.device)
        _broadcast(init)
        self.codebook.data.copy_(init)
        if self.quantizer == "ema":
            self.ema_sum.copy_(init)
            self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor):
        counts = _all_reduce(counts.clone())
        if self.quantizer == "ema":
            sums = torch.zeros(self.size, self.dim, device=flat.device).index_add_(0, ids, flat)
            sums = _all_reduce(sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.size * 1e-5) * n  # Laplace smoothing
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        # restart codes no vector chose for ``restart_after`` steps on random vectors of this batch
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.idle_steps >= self.restart_after).nonzero().flatten()
        if len(dead):
            pick = torch.randint(0, flat.shape[0], (len(dead),), device=flat.device)
            fresh = flat[pick].clone()
            _broadcast(fresh)
            self.codebook.data[dead] = fresh.to(self.codebook.dtype)
            if self.quantizer == "ema":
                self.ema_sum[dead] = fresh
                self.ema_count[dead] = 1.0
            self.idle_steps[dead] = 0


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def _broadcast(x: torch.Tensor):
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(x, 0)


class VQTokenizer(nn.Module):
    """The tokenizer: ``encode(images) -> (B, L)`` ids, ``decode(ids, grid) -> images``, ``forward`` = training loss."""
    name = "tokenizer"

    def __init__(self, img_size: int = 32, patch_size: int = 4, codebook_size: int = 8192, code_dim: int = 32,
                 hidden: int = 64, quantizer: str = "ema", commitment: float = 0.25, decay: float = 0.99):
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"the tokenizer's patch size must be a power of 2, got {patch_size}")
        if quantizer not in ("ema", "st"):
            raise ValueError(f"quantizer must be 'ema' or 'st', got {quantizer!r}")
        self.arch = dict(img_size=img_size, patch_size=patch_size, codebook_size=codebook_size, code_dim=code_dim,
                         hidden=hidden, quantizer=quantizer, commitment=commitment, decay=decay)
        self.patch_size, self.codebook_size, self.commitment = patch_size, codebook_size, commitment
        downs = int(math.log2(patch_size))
        enc = [nn.Conv2d(3, hidden, 3, padding=1)]
        for _ in range(downs):
            enc += [nn.ReLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        enc += [ResBlock(hidden), ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.enc = nn.Sequential(*enc)
        self.quantize = VectorQuantizer(codebook_size, code_dim, quantizer, decay)
        dec = [nn.Conv2d(code_dim, hidden, 3, padding=1), ResBlock(hidden), ResBlock(hidden)]
        for _ in range(downs):
            dec += [nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(hidden, 3, 3, padding=1)]
        self.dec = nn.Sequential(*dec)

    def _check(self, images):
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the tokenizer's patch size {p}")

    def forward(self, images, labels=None, rng=None):
        self._check(images)
        z = self.enc(images)
        q, _, commit, codebook_loss, stats = self.quantize(z)
        recon = self.dec(q)
        rec = F.mse_loss(recon.float(), images.float())
        loss = rec + codebook_loss + self.commitment * commit
        return dict(loss=loss, recon=rec.detach(), commit=commit.detach(), **stats)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> (B, (H/p) * (W/p)) code ids, row-major like the ViT's patches."""
        self._check(images)
        z = self.enc(images).float()
        b, c, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, h * w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, grid_hw) -> torch.Tensor:
        """(B, L) code ids -> normalised images (B, 3, h*p, w*p)."""
        h, w = grid_hw
        q = self.quantize.codebook[ids].float().view(ids.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.dec(q)

    @classmethod
    def build(cls, arch: dict) -> "VQTokenizer":
        return cls(**arch)


# saving and loading -------------------------------------------------------------------------------------
def save_tokenizer(tokenizer: VQTokenizer, path, **info) -> Path:
    """The tokenizer alone, in the mimkit checkpoint format (kind 'tokenizer')."""
    return save_checkpoint({"format": "mimkit", "version": 1, "kind": "tokenizer", "arch": dict(tokenizer.arch),
                            "model": tokenizer.state_dict(), **info}, path)


def load_tokenizer(path) -> VQTokenizer:
    """A trained tokenizer, frozen and in eval mode, from its file, a training checkpoint, or its output folder."""
    p = Path(path)
    if p.is_dir():
        if (p / FILE).is_file():
            state = load_checkpoint(p / FILE)
        else:
            state = load_latest(p)
            if state is None:
                raise CheckpointError(f"no tokenizer in {p} (no {FILE} and no checkpoints)")
    else:
        state = load_checkpoint(p)
    if not isinstance(state, dict) or state.get("kind") != "tokenizer":
        raise CheckpointError(f"{path} is not a tokenizer (kind {state.get('kind') if isinstance(state, dict) else None!r}; "
                              f"train one with `mimkit tokenizer train`)")
    try:
        tok = VQTokenizer.build(state["arch"])
        tok.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: the tokenizer weights do not fit their architecture "
                              f"({str(e).splitlines()[0]})") from None
    return freeze(tok)


def tokenizer_grid_matches(tok: VQTokenizer, encoder) -> Optional[str]:
    """None when one token per encoder patch, else a one-line reason."""
    if tok.patch_size != encoder.patch_size:
        return (f"the tokenizer's patch size {tok.patch_size} differs from the encoder's {encoder.patch_size} "
                f"(one token per patch is needed; train it with --patch-size {encoder.patch_size})")
    return None


