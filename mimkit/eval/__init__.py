"""Evaluations of a pretrained encoder: weighted k-NN, linear probing, fine-tuning.

Each is one API function taking its config and returning ``{"top1": ..., "top5": ..., ...}``
(percent, on the validation split), also written to ``results.json`` in ``cfg.output``::

    from mimkit.config import KnnConfig, load_config
    from mimkit.eval import knn
    knn(load_config(KnnConfig, overrides={"checkpoint": "runs/mae", "data": "builtin"}))
"""
import sys

from . import common
from .finetune import finetune
from .knn import knn
from .linprobe import linprobe

sys.modules[__name__ + ".features"] = common  # the old name of eval.common: imports written before keep working

__all__ = ["knn", "linprobe", "finetune"]
