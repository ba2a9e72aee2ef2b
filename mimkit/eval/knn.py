"""``knn(cfg)``: weighted k-nearest-neighbour accuracy on frozen features.

Features of the training split are the memory bank; each validation image takes the ``k`` most
cosine-similar ones, and each neighbour votes for its class with weight ``exp(sim / T)``; classes
are ranked by their summed votes (k = 20, T = 0.07 by default).
"""
import logging
import time

import torch
import torch.nn.functional as F

from ..config import KnnConfig
from .common import features_for, open_evaluation, topk_accuracy, write_results

log = logging.getLogger("mimkit")


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(Q, C) class scores: the sum of ``exp(cos_sim / T)`` over each query's top-k training neighbours per class.

    Features are L2-normalised here; the work runs on ``query_feats``' device, ``chunk`` queries at a time.
    """
    device = query_feats.device
    bank = F.normalize(train_feats.float().to(device), dim=1)
    bank_labels = train_labels.long().to(device)
    k = min(k, len(bank))
    out = torch.empty(len(query_feats), num_classes, device=device)
    for s in range(0, len(query_feats), chunk):
        q = F.normalize(query_feats[s:s + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device)
        out[s:s + chunk] = votes.scatter_add_(1, bank_labels[idx], weights)
    return out


def knn(cfg: KnnConfig) -> dict:
    """k-NN top-1 / top-5 (percent) of ``cfg.checkpoint``'s frozen encoder on the validation split."""
    t0 = time.time()
    ev = open_evaluation(cfg, "knn")
    run, env, pixels, img_size = ev.run, ev.run.env, ev.run.pixels, ev.img_size
    encoder = ev.encoder.to(env.device)
    train_f, train_y = features_for(encoder, ev.source, ev.train_idx, cfg, env, img_size, pixels)
    val_f, val_y = features_for(encoder, ev.source, ev.val_idx, cfg, env, img_size, pixels)
    scores = knn_scores(train_f.to(env.device), train_y, val_f.to(env.device), ev.num_classes, cfg.k, cfg.temperature)
    acc = topk_accuracy(scores, val_y)

    results = {"command": "knn", **acc, "num_train": len(train_f), "num_val": len(val_f),
               "num_classes": ev.num_classes, "k": cfg.k, "temperature": cfg.temperature, "pool": cfg.pool,
               "img_size": img_size, **ev.source_info, "seconds": round(time.time() - t0, 2)}
    run.record(cfg)
    if env.is_main:
        write_results(run.output, "knn", results)
    return results
