"""``mimkit segment``: semantic segmentation on any encoder mimkit reads, and masks predicted for new images.

``segment train`` (the default) fine-tunes the encoder with a segmentation head (:mod:`mimkit.models.segmenter`:
UperNet over a simple feature pyramid, the MAE paper's setup, or a linear head) on images paired with masks of
class ids (:mod:`mimkit.data.masks`), through the same machinery as ``finetune``: ``engine.fit`` (precision, DDP,
``--time-limit``, resume), timm's AdamW with layer-wise lr decay, ``--blocks`` / ``--frozen-encoder``,
``--random-init``. The images are read with the encoder's pixel spec (channels, value range, mean/std), as
pretraining read them. The held-out pairs are scored at the end (and every ``--eval-every`` epochs): mIoU,
per-class IoU and pixel accuracy in ``results.json``, each held-out image's counts in ``per_image.npz`` (for paired
bootstraps), a figure (image | truth | prediction). Inference slides overlapping windows of the training crop over
images of any size.

``segment predict --checkpoint RUN --data IMAGES`` writes each image's predicted mask (palette PNG whose values are
the class ids; TIFF above 256 classes) and a colour overlay; with ``--masks`` it also scores them.

From Python::

    from mimkit.segment import load_segmenter
    seg = load_segmenter("runs/seg")
    mask = seg.predict(array)           # (H, W[, C]) file values, as the files hold them -> (H, W) class ids
"""
import importlib.util
import io
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rundir
from .checkpoint_files import load_checkpoint, load_latest, save_checkpoint
from .config import SegmentConfig, parse_floats
from .data import PixelSpec, open_images, reuse_pixels
from .data.decode import decode_array, read_bytes
from .data.masks import (JointAugment, PairLoader, check_model_classes, eval_items, normalise, open_pairs, scan_masks,
                         split_pairs)
from .data.inputs import to_input
from .engine import CHECKPOINT_VERSION, effective_lr, fit, setup
from .errors import BadImage, CheckpointError, ConfigError
from .eval.common import eval_img_size, eval_pixels, load_eval_encoder
from .eval.finetune import finetune_optimizer, freeze_all_but_last
from .files import write_atomic, write_json, write_via
from .models import MaskedViT
from .models.pos_embed import sincos_2d
from .models.segmenter import Segmenter
from .precision import autocast
from .run import start

log = logging.getLogger("mimkit")


# the model ---------------------------------------------------------------------------------------------------------
def build_segmenter(encoder: MaskedViT, num_classes: int, head: str, channels: int, crop: int,
                    drop_path: float = 0.0) -> Segmenter:
    """A segmenter with ``encoder``'s weights at crop size ``crop``. The position table stays fixed: at another grid
    the sin-cos table is regenerated for it (exactly what MAE uses there), learned positions are resampled."""
    arch = {k: v for k, v in encoder.arch.items()}
    arch["img_size"] = crop
    enc = MaskedViT(**arch, drop_path_rate=drop_path)  # fixed_pos_embed: the table is not trained
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    old, new = encoder.patch_embed.grid_size, enc.patch_embed.grid_size
    if tuple(old) != tuple(new):
        table = sincos_2d(encoder.embed_dim, old[0], old[1], cls_token=True)
        if torch.allclose(state["pos_embed"].float(), table, atol=1e-4):
            state["pos_embed"] = enc.pos_embed.data.clone()  # the new grid's own sin-cos table
        else:
            from timm.layers import resample_abs_pos_embed
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(new), old_size=list(old),
                                                        num_prefix_tokens=1)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    try:
        return Segmenter(enc, num_classes, head, channels, crop)
    except ImportError as e:
        raise ConfigError(str(e)) from None


class SegmentTask(nn.Module):
    """The task ``engine.fit`` trains: per-pixel cross-entropy (ignore index, optional class weights)."""
    name = "segment"

    def __init__(self, model: Segmenter, meta: dict, frozen=(), class_weights: Optional[torch.Tensor] = None):
        super().__init__()
        self.model = model
        self.arch = {"segmenter": dict(model.arch), **meta}
        self._frozen = list(frozen)
        self.ignore_index = meta["ignore_index"]
        self.register_buffer("class_weights", class_weights, persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:  # frozen parts stay deterministic
            m.eval()
        return self

    def forward(self, images, masks, rng=None):
        logits = self.model(images)
        return F.cross_entropy(logits.float(), masks.long(), weight=self.class_weights, ignore_index=self.ignore_index)


# scores ------------------------------------------------------------------------------------------------------------
def confusion(pred: torch.Tensor, truth: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) counts, rows the true class, columns the predicted one; ignored pixels left out."""
    keep = truth != ignore_index
    idx = truth[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(conf: np.ndarray) -> dict:
    """mIoU (over classes present in the truth or the prediction), per-class IoU, pixel accuracy; in percent."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = conf.sum()
    return {"miou": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total * 100) if total else float("nan"),
            "per_class_iou": [None if np.isnan(v) else round(float(v) * 100, 4) for v in iou]}


def per_image_counts(conf: torch.Tensor) -> np.ndarray:
    """(K, 3) true positives, false positives, false negatives of one image: enough for any resampled mIoU."""
    tp = torch.diag(conf)
    return torch.stack([tp, conf.sum(0) - tp, conf.sum(1) - tp], 1).numpy()


def miou_from_counts(counts: np.ndarray) -> float:
    """mIoU in percent from summed (K, 3) counts, as :func:`scores` computes it."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou, axis=-1) * 100)


def evaluate(model: Segmenter, items, num_classes: int, ignore_index: int, device, precision: str = "fp32",
             overlap: float = 1 / 3, pad_value=None, batch_size: int = 16, keep: int = 0):
    """Score ``items`` ((key, normalised image, mask) in order): the summed confusion matrix, each image's (K, 3)
    counts, and the first ``keep`` (key, prediction) pairs. Consecutive images of one size are predicted together."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts, kept, group = [], [], []

    def run(group):
        x = torch.stack([g[1] for g in group]).to(device)
        with autocast(device, precision):
            pred = model.slide(x, overlap, pad_value).argmax(1).cpu()
        for (key, _, m), p in zip(group, pred):
            c = confusion(p, m, num_classes, ignore_index)
            conf.add_(c)
            counts.append(per_image_counts(c))
            if len(kept) < keep:
                kept.append((key, p))

    for item in items:
        if group and (item[1].shape != group[0][1].shape or len(group) == batch_size):
            run(group)
            group = []
        group.append(item)
    if group:
        run(group)
    return conf.numpy(), np.stack(counts) if counts else np.zeros((0, num_classes, 3), np.int64), kept


# pictures ----------------------------------------------------------------------------------------------------------
def class_colours(n: int) -> np.ndarray:
    """(n, 3) uint8: a fixed, well-spread colour per class (the golden-angle hue walk)."""
    import colorsys
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1, 0.65 + 0.35 * (k % 2),
                                                                     0.95 - 0.25 * ((k // 2) % 2))]
                     for k in range(n)], dtype=np.uint8).reshape(n, 3)


def display(x: torch.Tensor) -> np.ndarray:
    """A decoded input (C, H, W) -> (H, W, 3) uint8 to look at: RGB as is, one channel grey, more the first three;
    other than 8-bit data stretched to its own 1st-99th percentile."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    a = x.permute(1, 2, 0).numpy()
    lo, hi = np.percentile(a, 1), np.percentile(a, 99)
    if hi > lo and (lo > 0.02 or hi < 0.98):
        a = (a - lo) / (hi - lo)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def colour_mask(mask: np.ndarray, colours: np.ndarray, ignore_index: int = -1) -> np.ndarray:
    out = colours[np.clip(mask, 0, len(colours) - 1)]
    out[mask == ignore_index] = 0
    out[(mask < 0) | (mask >= len(colours))] = 0
    return out


def figure(rows, path: Path, min_side: int = 96):
    """Rows of (image, truth, prediction) (H, W, 3) uint8 panels as one PNG, each panel enlarged (nearest)."""
    from PIL import Image
    panels = []
    for row in rows:
        h, w = row[0].shape[:2]
        s = max(1, -(-min_side // max(h, w)))
        enlarged = [np.kron(p, np.ones((s, s, 1), np.uint8)) for p in row]
        gap = np.full((h * s, 4, 3), 255, np.uint8)
        panels.append(np.concatenate([enlarged[0], gap, enlarged[1], gap, enlarged[2]], 1))
    width = max(p.shape[1] for p in panels)
    panels = [np.pad(p, ((0, 4), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
    img = Image.fromarray(np.concatenate(panels, 0))
    write_via(path, lambda f: img.save(f, format="PNG"))


def write_mask(mask: np.ndarray, path: Path, colours: np.ndarray) -> Path:
    """A predicted mask at ``path`` + .png: a palette PNG (its values the class ids, its colours the classes'), or a 16-bit TIFF when
    there are more than 256 classes."""
    if len(colours) > 256:
        import tifffile
        buf = io.BytesIO()
        tifffile.imwrite(buf, mask.astype(np.uint16))
        return write_atomic(path.with_name(path.name + ".tif"), buf.getvalue())
    from PIL import Image
    img = Image.fromarray(mask.astype(np.uint8), "P")
    img.putpalette(colours.reshape(-1).tolist())
    return write_via(path.with_name(path.name + ".png"), lambda f: img.save(f, format="PNG"))


# the trained model, for Python -----------------------------------------------------------------------------------
class SegmenterModel:
    """A trained segmenter with what it needs to read raw arrays: its pixel spec, class names, window overlap."""

    def __init__(self, model: Segmenter, meta: dict, device="cpu", precision: str = "fp32"):
        self.model, self.meta = model.eval().to(device), meta
        self.spec = PixelSpec.from_dict(meta["pixels"])
        self.classes = list(meta["classes"])
        self.device, self.precision = torch.device(device), precision

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def pad_value(self) -> torch.Tensor:
        return -torch.tensor(self.spec.mean) / torch.tensor(self.spec.std)  # a zero pixel, normalised

    def logits(self, image) -> torch.Tensor:
        """(K, H, W) logits of one image: an (H, W[, C]) array of file values, or a decoded (C, H, W) tensor."""
        x = image if torch.is_tensor(image) else to_input(np.asarray(image)[..., None] if np.ndim(image) == 2
                                                          else np.asarray(image), self.spec, "array")
        x = normalise(x, self.spec)[None].to(self.device)
        with autocast(self.device, self.precision):
            return self.model.slide(x, self.meta.get("overlap", 1 / 3), self.pad_value())[0].float().cpu()

    def predict(self, image) -> np.ndarray:
        """(H, W) int64 class ids of one image (see :meth:`logits`)."""
        return self.logits(image).argmax(0).numpy()


def load_segmenter(path, device="cpu", precision: str = "fp32") -> SegmenterModel:
    """A trained segmenter from a ``segment`` run directory (its ``model.pt``, else its newest checkpoint) or file."""
    path = Path(path)
    if path.is_dir():
        state = load_checkpoint(path / "model.pt") if (path / "model.pt").is_file() else load_latest(path)
        if state is None:
            raise CheckpointError(f"{path}: no model.pt and no checkpoint of a segment run")
    else:
        state = load_checkpoint(path)
    if state.get("kind") != "segment":
        raise CheckpointError(f"{path}: holds a {state.get('kind', 'unknown')!r} model, not a segmenter "
                              f"(train one with mimkit segment train)")
    arch = state["arch"]
    model = Segmenter.from_arch(arch["segmenter"])
    weights = state["model"]
    if any(k.startswith("model.") for k in weights):  # a training checkpoint holds the task's names
        weights = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return SegmenterModel(model, arch, device, precision)


# the command -----------------------------------------------------------------------------------------------------
def _pairs(cfg):
    opts = dict(image_column=cfg.image_column, mask_column=cfg.mask_column, train_split=cfg.train_split,
                val_split=cfg.val_split)
    train = open_pairs(cfg.data, cfg.masks, **opts)
    if cfg.val_data:
        val = open_pairs(cfg.val_data, cfg.val_masks, **opts)
        train_idx, val_idx = list(range(len(train))), list(range(len(val)))
    else:
        val = train
        train_idx, val_idx = split_pairs(train, cfg.val_fraction)
    if not val_idx:
        raise ConfigError(f"no held-out images: --val-fraction {cfg.val_fraction} holds out nothing of {cfg.data}")
    if 0 < cfg.train_images < len(train_idx):  # evenly spaced over the sorted list
        step = len(train_idx) / cfg.train_images
        train_idx = [train_idx[int(k * step)] for k in range(cfg.train_images)]
    if not train_idx:
        raise ConfigError(f"no training images left in {cfg.data} after --val-fraction {cfg.val_fraction}")
    return train, train_idx, val, val_idx


def segment(cfg: SegmentConfig) -> dict:
    """``mimkit segment train|predict``; returns the results (also written to ``results.json``)."""
    return predict(cfg) if cfg.action == "predict" else train(cfg)


def train(cfg: SegmentConfig) -> dict:
    t0 = time.time()
    if cfg.head == "upernet" and cfg.batch_size < 2:
        raise ConfigError("--batch-size must be >= 2 for the UperNet head (its BatchNorm layers need two images)")
    if cfg.head == "upernet" and importlib.util.find_spec("segmentation_models_pytorch") is None:
        raise ConfigError("--head upernet needs segmentation-models-pytorch: pip install 'mimkit[seg]' "
                          "(or --head linear)")
    run = start(cfg, "segment")
    env = run.env
    train_pairs, train_idx, val_pairs, val_idx = _pairs(cfg)  # the data first: its spec shapes adapted RGB weights
    train_images = [train_pairs.image_ids[k] for k in train_idx]
    encoder, source_info = load_eval_encoder(cfg, train_pairs.images, train_images)
    crop = eval_img_size(cfg, encoder)
    spec = eval_pixels(cfg, encoder, train_pairs.images, train_images)
    if val_pairs is not train_pairs:
        reuse_pixels(spec, val_pairs.images, [val_pairs.image_ids[k] for k in val_idx])  # the same files' checks
    info = scan_masks(train_pairs, train_idx, spec, classes=cfg.classes, class_names=cfg.class_names,
                      ignore_index=cfg.ignore_index)
    val_info = scan_masks(val_pairs, val_idx, spec, classes=info.num_classes, class_names=cfg.class_names,
                          ignore_index=cfg.ignore_index, binary=info.binary)
    weights = None
    if cfg.class_weights:
        w = parse_floats(cfg.class_weights, "--class-weights")
        if len(w) != info.num_classes:
            raise ConfigError(f"--class-weights has {len(w)} values for {info.num_classes} classes")
        weights = torch.tensor(w, dtype=torch.float32)

    model = build_segmenter(encoder, info.num_classes, cfg.head, cfg.head_channels, crop, cfg.drop_path)
    del encoder
    frozen = []
    if cfg.frozen_encoder:
        frozen = [model.encoder]
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    elif cfg.blocks:
        frozen = freeze_all_but_last(model.encoder, cfg.blocks)
    if cfg.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    meta = {"classes": info.names, "ignore_index": cfg.ignore_index, "binary": info.binary,
            "pixels": spec.to_dict(), "overlap": cfg.overlap}
    task = SegmentTask(model, meta, frozen, weights)
    lr = effective_lr(cfg, env)
    optimizer = finetune_optimizer(model, lr, cfg.weight_decay, cfg.layer_decay)
    lo, hi = parse_floats(cfg.resize_range, "--resize-range")
    augment = JointAugment(crop, spec, cfg.ignore_index, (lo, hi))
    loader = PairLoader(train_pairs, train_idx, spec, info, augment, batch_size=cfg.batch_size, seed=cfg.seed,
                        rank=env.rank, world_size=env.world_size, num_workers=cfg.num_workers)
    pad = -torch.tensor(spec.mean) / torch.tensor(spec.std)

    def held_out(keep=0):
        task.eval()
        out = evaluate(model, eval_items(val_pairs, val_idx, spec, val_info), info.num_classes, cfg.ignore_index,
                       env.device, env.precision, cfg.overlap, pad, batch_size=max(cfg.batch_size, 16), keep=keep)
        task.train()
        return out

    def on_step(step, steps_per_epoch, last):
        interval = max(1, round(cfg.eval_every * steps_per_epoch)) if cfg.eval_every else 0
        if not interval or step == 0 or last or step % interval:
            return None
        miou = scores(held_out()[0])["miou"]
        log.info("step %d (epoch %.2f): held-out mIoU %.2f%% (%d images)", step, step / steps_per_epoch, miou,
                 len(val_idx))
        return {"val_miou": miou}

    run_dir, recorded = run.output, run.record(cfg)
    if env.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("segmenting %d classes with a %s head on %s (%.3gM of %.3gM parameters trainable%s), crop %d, "
                 "%d training and %d held-out images, lr %.3g, layer decay %.2f", info.num_classes, cfg.head,
                 source_info.get("model") or source_info.get("checkpoint"), trainable / 1e6,
                 sum(p.numel() for p in model.parameters()) / 1e6,
                 ", encoder frozen" if cfg.frozen_encoder else f", last {cfg.blocks} blocks" if cfg.blocks else "",
                 crop, len(train_idx), len(val_idx), lr, cfg.layer_decay)
    result = fit(task, optimizer, loader, recorded, run_dir, env, on_step=on_step if cfg.eval_every else None)

    results = {}
    if env.is_main:
        save_checkpoint({"format": "mimkit", "version": CHECKPOINT_VERSION, "kind": "segment", "arch": task.arch,
                         "model": model.state_dict()}, run_dir / "model.pt")
        conf, counts, kept = held_out(keep=cfg.figure_images)
        results = {"command": "segment", **scores(conf), "classes": info.names, "num_classes": info.num_classes,
                   "num_train": len(train_idx), "num_val": len(val_idx), "head": cfg.head, "crop_size": crop,
                   "blocks": cfg.blocks, "frozen_encoder": cfg.frozen_encoder, "lr": lr, "epochs": result.epoch,
                   "steps": result.step, "final_loss": result.loss, "train_seconds": round(result.seconds, 2),
                   **source_info, "seconds": round(time.time() - t0, 2)}
        _write_scores(run_dir, results, counts, [val_pairs.name(k) for k in val_idx])
        _figure(run_dir / "figures" / "segmentation.png", kept, val_pairs, val_info, spec)
    return results


def _write_scores(out: Path, results: dict, counts: np.ndarray, names):
    write_via(out / "per_image.npz", lambda f: np.savez_compressed(f, counts=counts, names=np.array(names)))
    write_json(out / "results.json", results)
    print(f"segment: mIoU {results['miou']:.2f}%  pixel accuracy {results['pixel_accuracy']:.2f}%  "
          f"({len(counts)} held-out images; {out / 'results.json'})", flush=True)


def _figure(path: Path, kept, pairs, info, spec):
    colours = class_colours(info.num_classes)
    rows = []
    for k, pred in kept:
        x, m = info.cache.get(k) or (to_input(pairs.read_image(k), spec, pairs.image_path(k)),
                                      info.convert(pairs.read_mask(k)))
        rows.append((display(x), colour_mask(m.long().numpy(), colours, info.ignore_index),
                     colour_mask(pred.numpy(), colours)))
    if rows:
        figure(rows, path)
        log.info("figure of %d held-out images (image | truth | prediction): %s", len(rows), path)


def predict(cfg: SegmentConfig) -> dict:
    """Masks and overlays for every image of ``--data`` (scored against ``--masks`` when given)."""
    t0 = time.time()
    env = setup(cfg)
    seg = load_segmenter(cfg.checkpoint, env.device, env.precision)
    if cfg.classes:
        check_model_classes(cfg.classes, seg.num_classes, f"--checkpoint {cfg.checkpoint}")
    out = rundir.prepare(cfg, "segment", env)
    colours = class_colours(seg.num_classes)
    scored = bool(cfg.masks) or (str(cfg.data).lower().endswith(".csv")) or str(cfg.data).startswith("hfds:")
    if scored:
        pairs = open_pairs(cfg.data, cfg.masks, image_column=cfg.image_column, mask_column=cfg.mask_column,
                           train_split=cfg.train_split, val_split=cfg.val_split)
        source, ids = pairs.images, pairs.image_ids
    else:
        source = open_images(cfg.data)
        ids = list(range(len(source)))
    spec = reuse_pixels(seg.spec, source, ids, cfg.in_chans, cfg.value_range, cfg.mean, cfg.std)
    seg.spec = spec
    for i in ids:
        name = source.names[i]
        try:
            x = to_input(decode_array(read_bytes(source, i), name), spec, name)
        except BadImage as e:
            log.warning("%s: %s; skipped", e.name, e.reason)
            continue
        pred = seg.predict(x)
        stem = str(Path(name).with_suffix(""))
        write_mask(pred, out / "masks" / stem, colours)
        overlay = (0.5 * display(x) + 0.5 * colour_mask(pred, colours)).astype(np.uint8)
        from PIL import Image
        write_via(out / "overlays" / f"{stem}.png", lambda f: Image.fromarray(overlay).save(f, format="PNG"))
    log.info("wrote %d masks to %s and overlays to %s", len(ids), out / "masks", out / "overlays")
    results = {"command": "segment predict", "checkpoint": cfg.checkpoint, "num_images": len(ids),
               "masks": str(out / "masks"), "overlays": str(out / "overlays")}
    if scored:
        info = scan_masks(pairs, list(range(len(pairs))), spec, classes=seg.num_classes,
                          class_names="", ignore_index=seg.meta["ignore_index"], binary=seg.meta["binary"])
        conf, counts, kept = evaluate(seg.model, eval_items(pairs, list(range(len(pairs))), spec, info),
                                      seg.num_classes, info.ignore_index, env.device, env.precision,
                                      seg.meta.get("overlap", 1 / 3), seg.pad_value(), keep=cfg.figure_images)
        results.update(scores(conf), classes=seg.classes, num_val=len(pairs))
        _write_scores(out, results, counts, [pairs.name(k) for k in range(len(pairs))])
        _figure(out / "figures" / "segmentation.png", kept, pairs, info, spec)
    else:
        write_json(out / "results.json", results)
    results["seconds"] = round(time.time() - t0, 2)
    return results
