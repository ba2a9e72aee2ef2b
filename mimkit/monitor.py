"""Watching a long pretraining run: every ``--eval-every N`` epochs (a fraction allowed: 0.25 is four times an
epoch, for short CPU runs), k-NN top-1 of the encoder on a fixed subset of the held-out split, and reconstructions
of the same held-out images (an online k-NN callback, as lightly's), and also before the first step (the
untrained encoder: where the curve starts) and at the last.

The memory bank is a fixed, evenly spaced subset of the training split and the queries a fixed, evenly spaced
subset of the held-out split (``--eval-images`` each), read with the eval recipe (resize and centre crop, no
augmentation) and, when small enough, decoded once into memory; an evaluation is two forward passes over a few
thousand images at most. It runs on the main process with the weights every process shares, so it is the same under DDP.
"""
import logging

import numpy as np

from .errors import ConfigError
from .data import make_loader
from .eval.common import loader_features, topk_accuracy
from .eval.knn import knn_scores
from .viz import reconstruction_panels

log = logging.getLogger("mimkit")


def _even(indices, n: int):
    indices = list(indices)
    if n <= 0 or n >= len(indices):
        return indices
    return [indices[int(j)] for j in np.linspace(0, len(indices) - 1, n)]


def check_online_eval(source, val_idx):
    if not any(source.labels[i] >= 0 for i in val_idx):
        raise ConfigError("--eval-every needs labeled held-out images (class folders or a label column, and "
                          "--val-fraction > 0 or a validation split)")


class OnlineEval:
    """``__call__(step, steps_per_epoch, last) -> dict`` at step 0, every ``every`` epochs' worth of steps and at
    the last step: ``{"knn_top1": %, "reconstructions": images}`` (images (N, 3, H, W) in [0, 1]: rows of original,
    masked, reconstruction, pasted), else None."""

    def __init__(self, objective, source, train_idx, val_idx, *, every: float, images: int, img_size: int,
                 device, precision: str = "fp32", k: int = 20, temperature: float = 0.07, mask_ratio: float = 0.75,
                 seed: int = 0, pool: str = "cls", pixels=None):
        self.objective, self.every, self.k, self.temperature = objective, every, k, temperature
        self.device, self.precision, self.pool, self.mask_ratio, self.seed = device, precision, pool, mask_ratio, seed
        check_online_eval(source, val_idx)
        labeled = [i for i in val_idx if source.labels[i] >= 0]
        self.num_classes = max(source.labels) + 1
        bank = _even([i for i in train_idx if source.labels[i] >= 0], images)
        queries = _even(labeled, images)

        # in-order eval loaders; 'auto' decodes small subsets once into a uint8 cache, so each evaluation only runs
        # the encoder
        self.bank, self.queries = (make_loader(source, idx, batch_size=256, recipe="eval", img_size=img_size,
                                               shuffle=False, num_workers=0, cache="auto", device=device,
                                               pixels=pixels)
                                   for idx in (bank, queries))
        self.num_images = (len(bank), len(queries))

    def features(self, loader):
        return loader_features(self.objective.encoder, loader, self.pool, self.device, self.precision)

    def knn_top1(self) -> float:
        (bank, bank_y), (queries, query_y) = self.features(self.bank), self.features(self.queries)
        scores = knn_scores(bank, bank_y, queries, self.num_classes, self.k, self.temperature)
        return topk_accuracy(scores, query_y, ks=(1,))["top1"]

    def reconstructions(self):
        model = getattr(self.objective, "model", None)
        if model is None or not hasattr(model, "reconstruct") or not getattr(self.objective, "pixel_output", True):
            return None
        was_training = model.training
        model.eval()
        images = next(iter(self.queries))[0][:8]
        panels = reconstruction_panels(model, images.to(self.device), self.mask_ratio, self.seed)
        model.train(was_training)
        return panels.flatten(0, 1).cpu()

    def due(self, step: int, steps_per_epoch: int, last: bool) -> bool:
        interval = max(1, round(self.every * steps_per_epoch))  # whole epochs land on the epochs' last steps
        return bool(self.every) and (step % interval == 0 or last)

    def __call__(self, step: int, steps_per_epoch: int, last: bool = False):
        if not self.due(step, steps_per_epoch, last):
            return None
        out = {"knn_top1": self.knn_top1()}
        images = self.reconstructions()
        if images is not None:
            out["reconstructions"] = images
        log.info("step %d (epoch %.2f): k-NN top-1 %.2f%% (%d held-out images, bank of %d)", step,
                 step / steps_per_epoch, out["knn_top1"], self.num_images[1], self.num_images[0])
        return out
