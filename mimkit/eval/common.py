"""What the three evaluations share: the encoder to evaluate, its frozen features, the data, the results file.

* :func:`open_evaluation`: the one opening of ``knn``, ``linprobe`` and ``finetune`` (the run, the encoder, the
  data, the pixel spec), as an immutable :class:`Evaluation`.
* :func:`load_eval_encoder` turns ``--checkpoint`` / ``--random-init`` / ``--model`` into a ``MaskedViT``.
* :func:`loader_features` runs a frozen encoder over a loader once (``mimkit.features.extract_features``
  under autocast);
  :func:`features_for` caches its result on disk, keyed by the weights and the images.
* :func:`eval_data` opens ``--data`` and splits it; :func:`image_loader` wraps ``mimkit.data.make_loader``.
* :func:`logged` passes a loader's batches through with a progress line every half minute.
* :class:`FeatureLoader` serves cached feature tensors with the loader interface ``engine.fit`` expects.
* :func:`topk_accuracy`, :func:`write_results` report top-1 / top-5 (in percent).
"""
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoints import load_checkpoint, load_encoder, read
from ..errors import CheckpointError, ConfigError
from ..features import extract_features
from ..files import write_text
from ..precision import autocast
from ..models import MaskedAutoencoder, MaskedViT, create_mae
from ..checkpoint_files import save_checkpoint
from ..data import JoinedSource, make_loader, open_images, resolve_pixels, reuse_pixels, split_train_val
from ..data.hfdata import dataset_options
from ..errors import DataError
from ..objectives import OBJECTIVES
from ..pixels import PixelSpec
from ..run import Run, start

log = logging.getLogger("mimkit")


# the opening -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    run: Run  # the claimed folder, the environment, the pixel spec (run.pixels)
    encoder: MaskedViT
    source_info: dict  # where the encoder came from (in results.json)
    img_size: int
    source: object  # the opened images (train and validation, one source)
    train_idx: List[int]
    val_idx: List[int]
    num_classes: int


def open_evaluation(cfg, command: str) -> Evaluation:
    """The run (folder claimed, seeded), the encoder to evaluate, the data split and the input spec."""
    run = start(cfg, command)
    source, train_idx, val_idx, n_classes = eval_data(cfg)  # the data first: its spec shapes adapted RGB weights
    encoder, source_info = load_eval_encoder(cfg, source, train_idx + val_idx)
    img_size = eval_img_size(cfg, encoder)
    run = run.derive(pixels=eval_pixels(cfg, encoder, source, train_idx + val_idx))
    return Evaluation(run, encoder, source_info, img_size, source, train_idx, val_idx, n_classes)


# the encoder ----------------------------------------------------------------------------------------
def load_eval_encoder(cfg, data=None, indices=None) -> Tuple[MaskedViT, dict]:
    """The encoder an evaluation config names, and a small description of where it came from.

    ``--checkpoint`` (a file, or a run directory: its newest checkpoint) gives the trained encoder;
    ``--random-init`` gives the same shape freshly initialised as its pretraining would start it
    (shape from ``--model`` when given, else from the checkpoint). RGB weights for data of another ``--in-chans``
    are adapted by the checkpoint reader (RGB kernels by role where given): with the data given, the
    adapted encoder's input is the data's spec (``data[indices]``), so ``--bands`` roles and ``--band-names``
    shape the adaptation.
    """
    source = {"checkpoint": cfg.checkpoint or None, "random_init": bool(cfg.random_init)}
    if cfg.random_init and cfg.model:
        encoder = _fresh_encoder_from_preset(cfg.model, cfg.in_chans or 3)
        source["model"] = cfg.model
        return encoder, source
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required (or --random-init with --model)")
    checkpoint = read(cfg.checkpoint)  # the one reader: mimkit runs and files, official MAE, HF ViTMAE, timm
    encoder = load_encoder(checkpoint)
    if cfg.in_chans and cfg.in_chans != encoder.in_chans:  # RGB weights for N-channel data: adapt the projection
        arch = {k: v for k, v in encoder.arch.items() if k != "pixels"}
        pixels = None
        if data is not None:  # the data's own spec (statistics 'auto' unless given), band names and roles
            pixels = resolve_pixels(data, indices, cfg.in_chans, cfg.value_range, cfg.mean or "auto",
                                    cfg.std or "auto", band_names=cfg.band_names, bands=cfg.bands)
        encoder = load_encoder(read(cfg.checkpoint), model=MaskedViT(**dict(arch, in_chans=cfg.in_chans,
                                                                            pixels=pixels)))
        source["adapted_in_chans"] = cfg.in_chans
    if cfg.random_init:
        encoder = _fresh_encoder_like(checkpoint.kind, checkpoint.arch, encoder)
    source["kind"] = checkpoint.kind
    return encoder, source


def _fresh_encoder_from_preset(name: str, in_chans: int = 3) -> MaskedViT:
    try:
        return create_mae(name, in_chans=in_chans).encoder  # MAE's initialisation of the encoder
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None


def _fresh_encoder_like(kind, arch, trained: MaskedViT) -> MaskedViT:
    """The same shape, initialised as its pretraining objective starts it (MAE's initialisation by default)."""
    if kind in OBJECTIVES and kind != "mae" and arch:
        try:
            return OBJECTIVES[kind].build(arch).encoder
        except (KeyError, TypeError):
            pass
    return MaskedAutoencoder(MaskedViT(**trained.arch)).encoder


# features ---------------------------------------------------------------------------------------------
PROGRESS_EVERY_S = 30.0


def logged(loader, what: str):
    """The loader's batches, logging images done, speed and time left every :data:`PROGRESS_EVERY_S` seconds: a
    frozen pass over 45k images takes tens of minutes on a CPU and should not be silent. The time counted includes
    what the caller does with each batch (the encoder's forward)."""
    total = getattr(loader, "num_images", None)
    done, t0 = 0, time.perf_counter()
    last = t0
    for batch in loader:
        yield batch
        done += len(batch[0])
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            rate = done / max(now - t0, 1e-9)
            left = (f", {time.strftime('%H:%M:%S', time.gmtime(max(total - done, 0) / rate))} left"
                    if total else "")
            log.info("%s: %d/%s images, %.0f img/s%s", what, done, total if total else "?", rate, left)


def loader_features(encoder: MaskedViT, loader, pool: str, device, precision: str = "fp32"
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (:func:`mimkit.features.extract_features`) of every image the loader yields:
    (N, D) float32 and (N,) int64, both on the CPU; progress is logged as ``features`` (:func:`logged`)."""
    device = torch.device(device)
    encoder.to(device)
    feats, labels = [], []
    with autocast(device, precision):
        for images, y in logged(loader, "features"):
            f = extract_features(encoder, images.to(device, non_blocking=True), pool)
            if pool == "mean" and not isinstance(getattr(encoder, "fc_norm", nn.Identity()), nn.Identity):
                with torch.inference_mode():
                    f = encoder.fc_norm(f)  # a global-pool classifier's features: its pre-logits
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    if not feats:
        return torch.zeros(0, encoder.embed_dim), torch.zeros(0, dtype=torch.long)
    # clone: tensors made under inference_mode cannot be saved for backward later
    return torch.cat(feats).clone(), torch.cat(labels).clone()


def features_for(encoder: MaskedViT, source, indices, cfg, env, img_size: int, pixels=None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`loader_features` over ``indices`` of ``source``, cached on disk under ``cfg.feature_cache``.

    The key hashes the encoder's weights, the images (names, sizes, modification times), the pooling, size and
    precision, so k-NN and the linear probe of one checkpoint compute features once, and nothing stale is read.
    """
    cache_dir = Path(os.path.expanduser(cfg.feature_cache)) if cfg.feature_cache else None
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{_feature_key(encoder, source, indices, cfg.pool, img_size, env.precision, pixels)}.pt"
        if path.is_file():
            try:
                cached = load_checkpoint(path)
                return cached["features"], cached["labels"]
            except CheckpointError as e:
                log.warning("%s; computing the features again", e)
    feats, labels = loader_features(encoder, image_loader(source, indices, cfg, env, img_size=img_size, pixels=pixels),
                                     cfg.pool, env.device, env.precision)
    if path is not None and env.is_main:
        try:
            save_checkpoint({"features": feats, "labels": labels}, path)
        except CheckpointError as e:  # a cache is never worth failing the run for
            log.warning("feature cache not written: %s", e)
    return feats, labels


def _feature_key(encoder, source, indices, pool, img_size, precision, pixels=None) -> str:
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([str(source.root), pool, img_size, precision, len(indices)]).encode())
    if pixels is not None and pixels != PixelSpec():  # the default's keys stay as they were
        h.update(json.dumps(pixels.to_dict()).encode())
    root = Path(source.root)
    for i in indices:
        p = root / source.names[i]
        st = p.stat() if p.is_file() else None
        h.update(f"{source.names[i]}:{st.st_size if st else ''}:{st.st_mtime_ns if st else ''}".encode())
    if root.is_file():  # an archive
        st = root.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


class FeatureLoader:
    """Cached (features, labels) served in shuffled batches, with the interface ``engine.fit`` uses:
    ``len``, ``set_epoch(epoch, start_batch)``, ``num_images``, ``skipped``.

    Every epoch draws a permutation from (seed, epoch); each process takes its share of every global
    batch, so resumed and multi-process runs see the same batches. Incomplete last batches are
    dropped, except that a set smaller than one global batch is served as a single batch.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device="cpu", shuffle: bool = True):
        self.device = torch.device(device)
        self.feats, self.labels = feats.to(self.device), labels.to(self.device)
        self.num_images = len(feats)
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.batch_size = min(batch_size, self.num_images // world_size)
        if self.batch_size < batch_size:
            log.info("batch size %d is more than the %d training images allow: using batches of %d",
                     batch_size, self.num_images, self.batch_size)
        self.skipped: Dict[str, str] = {}
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        if self.batch_size < 1:
            return 0
        return self.num_images // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_images, generator=g)
        else:
            order = torch.arange(self.num_images)
        order = order.to(self.device)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            start = b * global_batch + self.rank * self.batch_size
            idx = order[start:start + self.batch_size]
            yield self.feats[idx], self.labels[idx]


# data -----------------------------------------------------------------------------------------------------
def eval_data(cfg):
    """(source, train indices, validation indices, number of classes) for ``cfg.data``, split by
    ``--val-fraction``, or with ``--val-data`` all of it for training and that set for validation (one joined
    source); unlabeled images (outside any class folder) are left out, as they cannot be scored."""
    source = open_images(cfg.data, **dataset_options(cfg))
    if not source.classes:
        raise DataError(f"{cfg.data}: no class folders, so no labels to evaluate against (put images in "
                        f"one sub-folder per class, or give a .csv list with labels)")
    if cfg.val_data:
        val = open_images(cfg.val_data)
        if not val.classes:
            raise DataError(f"{cfg.val_data}: no class folders or labels in the validation set")
        n_train = len(source)
        source = JoinedSource(source, val)
        train_idx, val_idx = list(range(n_train)), list(range(n_train, len(source)))
    else:
        train_idx, val_idx = split_train_val(source, cfg.val_fraction)
    unlabeled = sum(source.labels[i] < 0 for i in train_idx + val_idx)
    if unlabeled:
        log.warning("%s: %d images outside class folders are left out of the evaluation", cfg.data, unlabeled)
        train_idx = [i for i in train_idx if source.labels[i] >= 0]
        val_idx = [i for i in val_idx if source.labels[i] >= 0]
    if len(val_idx) == 0 and cfg.val_data:
        raise DataError(f"{cfg.val_data}: no labeled validation images")
    if len(val_idx) == 0:
        raise ConfigError(f"no validation images: --val-fraction {cfg.val_fraction} holds out nothing of {cfg.data}")
    if 0 < cfg.train_images < len(train_idx):  # evenly spaced over the sorted list: every class keeps its share
        step = len(train_idx) / cfg.train_images
        train_idx = [train_idx[int(k * step)] for k in range(cfg.train_images)]
    if len(train_idx) == 0:
        raise ConfigError(f"no training images left in {cfg.data} after --val-fraction {cfg.val_fraction}")
    return source, train_idx, val_idx, len(source.classes)


def image_loader(source, indices, cfg, env, *, recipe: str = "eval", img_size: int, batch_size: Optional[int] = None,
                 shuffle: bool = False, drop_last: bool = False, distributed: bool = False, pixels=None,
                 **transform_kwargs):
    """``mimkit.data.make_loader`` with the run's options; one process reads everything unless ``distributed``.

    ``shuffle=False`` yields every image once, in order (for features and validation)."""
    rank, world = (env.rank, env.world_size) if distributed else (0, 1)
    return make_loader(source, indices, batch_size=batch_size or cfg.batch_size, recipe=recipe, img_size=img_size,
                       seed=cfg.seed, rank=rank, world_size=world,
                       num_workers=cfg.num_workers, device=env.device,
                       cache=cfg.cache, shuffle=shuffle, drop_last=drop_last, pixels=pixels, **transform_kwargs)


def eval_pixels(cfg, encoder: MaskedViT, source, indices):
    """How the evaluated encoder's input is made: the spec its checkpoint records (channels, value range,
    mean/std, bands by name), with --in-chans/--value-range/--mean/--std/--bands given here in its place; the
    files checked against it, their bands matched to the encoder's by name (``mimkit.data.reuse_pixels``)."""
    mean, std = cfg.mean, cfg.std
    if "pixels" not in encoder.arch and encoder.in_chans != 3 and not (mean or std):
        mean = std = "auto"  # N-channel weights that record no statistics (adapted RGB ones): the data's own
    return reuse_pixels(encoder.pixels, source, indices, cfg.in_chans, cfg.value_range, mean, std,
                        cfg.band_names, cfg.bands)


def eval_img_size(cfg, encoder: MaskedViT) -> int:
    size = cfg.img_size or encoder.arch["img_size"]
    if size % encoder.patch_size:
        raise ConfigError(f"--img-size {size} is not divisible by the patch size {encoder.patch_size}")
    return size


# results ------------------------------------------------------------------------------------------------------
def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracies in percent from (N, C) scores; k is capped at the number of classes."""
    n = len(labels)
    if n == 0:
        return {f"top{k}": float("nan") for k in ks}
    kmax = min(max(ks), scores.shape[1])
    pred = scores.topk(kmax, dim=1).indices
    hit = pred.eq(labels.to(pred.device).view(-1, 1))
    return {f"top{k}": 100.0 * hit[:, :min(k, kmax)].any(1).float().sum().item() / n for k in ks}


def write_results(run_dir, command: str, results: dict) -> Path:
    """``results.json`` in the run directory, and one line on stdout."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    write_text(path, json.dumps(results, indent=2, default=_json_default) + "\n")
    print(f"{command}: top1 {results['top1']:.2f}%  top5 {results['top5']:.2f}%  "
          f"({results.get('num_val', '?')} validation images; {path})", flush=True)
    return path


def _json_default(v):
    """json.dumps' fallback for the values results hold: paths, devices, tensors, NaN (as null)."""
    if isinstance(v, (Path, torch.device)):
        return str(v)
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)
