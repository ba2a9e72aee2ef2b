"""``linprobe(cfg)``: a linear classifier on the frozen encoder's features, as MAE's linear probing.

The head is ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, classes)`` (weights
trunc-normal, std 0.01), trained with LARS (base lr 0.1, no weight decay, warm-up then cosine).
The paper augments the probe's images (RandomResizedCrop + flip); without augmentation, as here,
every image always gives the same feature, so features are computed once and cached, and the
probe trains over the cached tensors through the ordinary ``engine.fit`` loop (schedule,
checkpoints, resume, logging): the task module receives feature tensors instead of images.
"""
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars, create_optimizer_v2

from ..config import LinprobeConfig
from ..engine import effective_lr, fit
from ..features import extract_features
from ..models import freeze
from ..precision import autocast
from .common import (FeatureLoader, features_for, image_loader, logged, open_evaluation, topk_accuracy,
                     write_results)

log = logging.getLogger("mimkit")


class LinearProbe(nn.Module):
    """The task ``engine.fit`` trains: ``forward(features, labels, rng) -> cross-entropy``."""
    name = "linprobe"

    def __init__(self, dim: int, num_classes: int, encoder_arch: dict = None, pool: str = "cls"):
        super().__init__()
        self.arch = {"encoder": dict(encoder_arch or {}), "dim": dim, "num_classes": num_classes, "pool": pool}
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.float())

    def forward(self, feats, labels, rng=None):
        return F.cross_entropy(self.logits(feats), labels)


class AttentiveProbe(nn.Module):
    """Attentive probing (as V-JEPA's and AIM's evaluations): learned queries cross-attend over all frozen patch
    tokens (LayerNorm first, ``nn.MultiheadAttention``), their outputs are averaged, then LayerNorm and a linear
    classifier. ``forward(tokens (B, L, D), labels, rng) -> cross-entropy``."""
    name = "attentive_probe"

    def __init__(self, dim: int, num_classes: int, heads: int, queries: int = 1, encoder_arch: dict = None):
        super().__init__()
        self.arch = {"encoder": dict(encoder_arch or {}), "dim": dim, "num_classes": num_classes, "heads": heads,
                     "queries": queries}
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, queries, dim))
        trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.norm(tokens.float())
        pooled, _ = self.attn(self.query.expand(len(t), -1, -1), t, t, need_weights=False)
        return self.head(pooled.mean(1))

    def forward(self, tokens, labels, rng=None):
        return F.cross_entropy(self.logits(tokens), labels)


TOKEN_DTYPE = torch.bfloat16  # cached tokens: 16 bits (bf16 keeps fp32's range)


def patch_tokens(encoder, images: torch.Tensor) -> torch.Tensor:
    """The frozen encoder's patch tokens after its final norm, (B, L, D) (the class token left out)."""
    return extract_features(encoder, images, "all")[:, 1:]


class TokenLoader:
    """Patch tokens computed by the frozen encoder from an image loader's batches, every time (when they do not fit
    in memory); the interface ``engine.fit`` uses, passed through."""

    def __init__(self, encoder, loader, device, precision: str):
        self.encoder, self.loader, self.device, self.precision = encoder, loader, device, precision
        self.num_images, self.skipped = loader.num_images, loader.skipped

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        for images, labels in self.loader:
            with autocast(self.device, self.precision):
                tokens = patch_tokens(self.encoder, images.to(self.device))
            yield tokens.clone(), torch.as_tensor(labels).to(self.device)  # clone: out of inference mode


def cached_tokens(encoder, loader, n: int, device, precision: str):
    """(N, L, D) 16-bit patch tokens and (N,) labels of every image the loader yields (in order), on the CPU."""
    tokens, labels, at = None, [], 0
    with autocast(device, precision):
        for images, y in logged(loader, "tokens"):
            t = patch_tokens(encoder, images.to(device)).to("cpu", TOKEN_DTYPE)
            if tokens is None:
                tokens = torch.empty(n, *t.shape[1:], dtype=TOKEN_DTYPE)
            tokens[at:at + len(t)] = t
            at += len(t)
            labels.append(torch.as_tensor(y).long())
    return tokens[:at], torch.cat(labels)


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable; elsewhere what is free)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def lars_optimizer(probe: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's LARS as MAE uses it: weight matrices get weight decay and the trust ratio, biases neither."""
    matrices = [p for p in probe.parameters() if p.requires_grad and p.ndim > 1]
    vectors = [p for p in probe.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": matrices, "weight_decay": weight_decay, "always_adapt": True},
              {"params": vectors, "weight_decay": 0.0, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9)


def linprobe(cfg: LinprobeConfig) -> dict:
    """Train the probe on the training split and return top-1 / top-5 (percent) on the validation split."""
    t0 = time.time()
    ev = open_evaluation(cfg, "linprobe")
    run, env, pixels, img_size = ev.run, ev.run.env, ev.run.pixels, ev.img_size
    encoder = freeze(ev.encoder).to(env.device)

    # every process computes all features (simple; the probe's batches are then sharded by FeatureLoader)
    if cfg.head == "attentive":
        return attentive_probe(cfg, ev, encoder, t0)
    train_f, train_y = features_for(encoder, ev.source, ev.train_idx, cfg, env, img_size, pixels)
    val_f, val_y = features_for(encoder, ev.source, ev.val_idx, cfg, env, img_size, pixels)
    t_feat = time.time() - t0
    loader = FeatureLoader(train_f, train_y, cfg.batch_size, seed=cfg.seed, rank=env.rank,
                           world_size=env.world_size, device=env.device)

    probe = LinearProbe(train_f.shape[1], ev.num_classes, encoder.arch, cfg.pool)
    lr = effective_lr(cfg, env)
    optimizer = lars_optimizer(probe, lr, cfg.weight_decay)
    recorded = run.record(cfg)
    if env.is_main:
        log.info("linear probe on %d cached %d-d features (%s pool, %.1f s to extract), %d classes, lr %.3g",
                 len(train_f), train_f.shape[1], cfg.pool, t_feat, ev.num_classes, lr)
    result = fit(probe, optimizer, loader, recorded, run.output, env)

    probe.eval()
    with torch.no_grad():
        acc = topk_accuracy(probe.logits(val_f.to(env.device)), val_y)
    results = {"command": "linprobe", "head": "linear", **acc, "num_train": len(train_f), "num_val": len(val_f),
               "num_classes": ev.num_classes, "pool": cfg.pool, "img_size": img_size, "lr": lr,
               "epochs": result.epoch, "steps": result.step, "final_loss": result.loss, **ev.source_info,
               "seconds": round(time.time() - t0, 2)}
    if env.is_main:
        write_results(run.output, "linprobe", results)
    return results


def attentive_probe(cfg, ev, encoder, t0):
    """``linprobe --head attentive``: the probe over all patch tokens, cached in 16 bits in memory where they fit
    in half the available memory (``--token-cache auto``), else recomputed by the frozen encoder every step."""
    run, env, pixels, img_size, n_classes = ev.run, ev.run.env, ev.run.pixels, ev.img_size, ev.num_classes
    source, train_idx, val_idx = ev.source, ev.train_idx, ev.val_idx
    grid = (img_size // encoder.patch_size) ** 2
    need = len(train_idx) * grid * encoder.embed_dim * torch.finfo(TOKEN_DTYPE).bits // 8
    free = available_memory()
    cache = cfg.token_cache == "memory" or (cfg.token_cache == "auto" and need <= free // 2)
    if env.is_main:  # the held-out images' tokens are computed once, for scoring, and never kept
        log.info("attentive probe: %d training images x %d tokens of %d dims are %.2f GB in 16 bits, %.2f GB "
                 "available: %s", len(train_idx), grid, encoder.embed_dim, need / 1e9, free / 1e9,
                 "cached in memory" if cache else "recomputed by the frozen encoder every step"
                 + (" (--token-cache recompute)" if cfg.token_cache == "recompute" else ""))

    def loader_of(idx, **kw):
        return image_loader(source, idx, cfg, env, img_size=img_size, pixels=pixels, **kw)

    if cache:
        train_t, train_y = cached_tokens(encoder, loader_of(train_idx), len(train_idx), env.device, env.precision)
        loader = FeatureLoader(train_t, train_y, cfg.batch_size, seed=cfg.seed, rank=env.rank,
                               world_size=env.world_size, device=env.device)
    else:
        loader = TokenLoader(encoder, loader_of(train_idx, shuffle=True, drop_last=True, distributed=True),
                             env.device, env.precision)
    t_feat = time.time() - t0
    probe = AttentiveProbe(encoder.embed_dim, n_classes, cfg.heads or encoder.blocks[0].attn.num_heads,
                           cfg.queries, encoder.arch)
    lr = effective_lr(cfg, env)
    optimizer = create_optimizer_v2(probe, "adamw", lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    recorded = run.record(cfg)
    if env.is_main:
        log.info("attentive probe (%d queries, %d heads, %.3fM parameters) on %d images' tokens (%.1f s so far), "
                 "%d classes, AdamW lr %.3g", cfg.queries, probe.attn.num_heads,
                 sum(p.numel() for p in probe.parameters()) / 1e6, len(train_idx), t_feat, n_classes, lr)
    result = fit(probe, optimizer, loader, recorded, run.output, env)

    probe.eval()
    scores, labels = [], []
    with torch.no_grad():
        for tokens, y in TokenLoader(encoder, loader_of(val_idx), env.device, env.precision):
            scores.append(probe.logits(tokens).float().cpu())
            labels.append(y.cpu())
    acc = topk_accuracy(torch.cat(scores), torch.cat(labels))
    results = {"command": "linprobe", "head": "attentive", **acc, "num_train": len(train_idx), "num_val": len(val_idx),
               "num_classes": n_classes, "queries": cfg.queries, "heads": probe.attn.num_heads,
               "tokens_cached": cache, "img_size": img_size, "lr": lr, "epochs": result.epoch, "steps": result.step,
               "final_loss": result.loss, **ev.source_info, "seconds": round(time.time() - t0, 2)}
    if env.is_main:
        write_results(run.output, "linprobe", results)
    return results
