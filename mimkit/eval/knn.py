"""``knn(cfg)``: weighted k-nearest-neighbour accuracy on frozen features.

Features of the training split are the memory bank; each validation image takes the ``k`` most
cosine-similar ones, and each neighbour votes for its class with weight ``exp(sim / T)``; classes
are ranked by their summed votes (k = 20, T = 0.07 by default).
"""
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import KnnConfig, save_config
from ..engine import seed_everything, setup
from .. import rundir
from .features import (eval_data, eval_img_size, eval_pixels, features_for, load_eval_encoder, topk_accuracy,
                       write_results)

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
    env = setup(cfg)
    rundir.prepare(cfg, "knn", env)  # a new folder, or refuse to overwrite another run
    seed_everything(cfg.seed)
    source, train_idx, val_idx, n_classes = eval_data(cfg)  # first: RGB weights adapt to its bands
    encoder, source_info = load_eval_encoder(cfg, source, train_idx + val_idx)
    img_size = eval_img_size(cfg, encoder)
    encoder.to(env.device)

    pixels = eval_pixels(cfg, encoder, source, train_idx + val_idx)
    train_f, train_y = features_for(encoder, source, train_idx, cfg, env, img_size, pixels)
    val_f, val_y = features_for(encoder, source, val_idx, cfg, env, img_size, pixels)
    scores = knn_scores(train_f.to(env.device), train_y, val_f.to(env.device), n_classes, cfg.k, cfg.temperature)
    acc = topk_accuracy(scores, val_y)

    results = {"command": "knn", **acc, "num_train": len(train_f), "num_val": len(val_f), "num_classes": n_classes,
               "k": cfg.k, "temperature": cfg.temperature, "pool": cfg.pool, "img_size": img_size, **source_info,
               "seconds": round(time.time() - t0, 2)}
    if env.is_main:
        run_dir = Path(cfg.output)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_results(run_dir, "knn", results)
    return results
