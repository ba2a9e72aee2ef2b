"""``linprobe(cfg)``: a linear classifier on the frozen encoder's features, as MAE's linear probing.

The head is ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, classes)`` (weights
trunc-normal, std 0.01), trained with LARS (base lr 0.1, no weight decay, warm-up then cosine).
The paper augments the probe's images (RandomResizedCrop + flip); without augmentation, as here,
every image always gives the same feature, so features are computed once and cached, and the
probe trains over the cached tensors through the ordinary ``engine.fit`` loop (schedule,
checkpoints, resume, logging): the task module receives feature tensors instead of images.
"""
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars

from ..config import LinprobeConfig
from ..engine import effective_lr, fit
from ..models import freeze
from .common import FeatureLoader, features_for, open_evaluation, topk_accuracy, write_results

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
    results = {"command": "linprobe", **acc, "num_train": len(train_f), "num_val": len(val_f),
               "num_classes": ev.num_classes, "pool": cfg.pool, "img_size": img_size, "lr": lr,
               "epochs": result.epoch, "steps": result.step, "final_loss": result.loss, **ev.source_info,
               "seconds": round(time.time() - t0, 2)}
    if env.is_main:
        write_results(run.output, "linprobe", results)
    return results
