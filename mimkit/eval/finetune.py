"""``finetune(cfg)``: end-to-end fine-tuning of a pretrained encoder, with MAE's recipe.

The classifier is the encoder's own timm ``VisionTransformer`` with a head: global pooling (mean of
the patch tokens, then ``fc_norm`` LayerNorm, as MAE's fine-tuning) or the class token after the
final norm. Everything else comes from timm: layer-wise lr decay (``create_optimizer_v2(...,
layer_decay=...)``, AdamW betas (0.9, 0.999), weight decay 0.05), drop path, mixup / cutmix
(``Mixup``) with label smoothing (``SoftTargetCrossEntropy`` / ``LabelSmoothingCrossEntropy``), and
RandAugment + random erasing through the data loader's fine-tuning recipe. ``--blocks K`` is the
paper's partial fine-tuning: patch embedding, class token, positions and all but the last K blocks
stay frozen (and deterministic: those modules stay in eval mode).
"""
import logging
import time

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

from ..config import FinetuneConfig
from ..errors import ConfigError
from ..engine import effective_lr, fit
from ..precision import autocast
from ..models import MaskedViT
from .common import image_loader, logged, open_evaluation, topk_accuracy, write_results

log = logging.getLogger("mimkit")


def build_classifier(encoder: MaskedViT, num_classes: int, *, global_pool: bool = True, drop_path: float = 0.0,
                     img_size: int = 0) -> MaskedViT:
    """A classifier with ``encoder``'s weights and a new head (trunc-normal, std 2e-5). With global pooling the
    final norm becomes a fresh ``fc_norm`` after the pooling, as MAE's fine-tuning (the pretrained ``norm`` is
    dropped); with the class token the pretrained ``norm`` stays."""
    arch = dict(encoder.arch)
    if img_size:
        arch["img_size"] = img_size
    model = MaskedViT(**arch, num_classes=num_classes, global_pool="avg" if global_pool else "token",
                      drop_path_rate=drop_path, fixed_pos_embed=False)  # positions fine-tune too, as in MAE
    # the final norm of the chosen head: kept when the source has it (a fine-tuned classifier), else fresh
    drop = ("head.", "norm.") if global_pool else ("head.", "fc_norm.")
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(drop)}
    if state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                    old_size=list(encoder.patch_embed.grid_size), num_prefix_tokens=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    final_norm = "fc_norm" if global_pool else "norm"
    new = {"head.weight", "head.bias", f"{final_norm}.weight", f"{final_norm}.bias"}
    if unexpected or set(missing) - new:
        raise RuntimeError(f"encoder weights do not fit the classifier: missing {sorted(set(missing) - new)}, "
                           f"unexpected {sorted(unexpected)}")
    trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def freeze_all_but_last(model: MaskedViT, blocks: int):
    """Partial fine-tuning: only the last ``blocks`` blocks, the final norm(s) and the head stay trainable."""
    depth = len(model.blocks)
    if not 0 < blocks <= depth:
        raise ConfigError(f"--blocks must be in 1..{depth} for this {depth}-block encoder, got {blocks}")
    frozen = [model.patch_embed, model.norm_pre, *model.blocks[:depth - blocks]]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    model.cls_token.requires_grad_(False)
    model.pos_embed.requires_grad_(False)
    return frozen


def finetune_optimizer(model: MaskedViT, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75):
    """timm's AdamW (0.9, 0.999) over the trainable parameters, grouped by timm's layer-wise lr decay: block i
    gets ``lr_scale = layer_decay ** (depth - i)``, the head and final norm 1, the embeddings (patch, class
    token, positions) ``layer_decay ** (depth + 1)``; no weight decay on norms, biases, class token, positions.
    Fused (one kernel over all parameters), as pretraining's optimizer."""
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999),
                               layer_decay=layer_decay if layer_decay < 1 else None, fused=True)


class FinetuneTask(nn.Module):
    """The task ``engine.fit`` trains: mixup / cutmix the batch, classify, return the (soft-target) loss."""
    name = "finetune"

    def __init__(self, model: MaskedViT, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0,
                 label_smoothing: float = 0.0, frozen=(), global_pool: bool = True):
        super().__init__()
        self.model = model
        self.arch = {"encoder": dict(model.arch), "num_classes": num_classes, "global_pool": global_pool}
        self._frozen = list(frozen)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:  # frozen blocks stay deterministic (no drop path)
            m.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        # timm's forward passes attention-mask arguments MaskedViT.forward_features does not take
        return self.model.forward_head(self.model.forward_features(images))

    def forward(self, images, labels, rng=None):
        if self.mixup is not None and self.training:
            if images.shape[0] % 2:  # timm's Mixup pairs images; a batch shortened by a skipped file drops one
                images, labels = images[:-1], labels[:-1]
            images, labels = self.mixup(images, labels)
        return self.criterion(self.logits(images), labels)

    def no_weight_decay(self):
        return {"model." + n for n in self.model.no_weight_decay()}


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune on the training split; return top-1 / top-5 (percent) on the validation split."""
    t0 = time.time()
    ev = open_evaluation(cfg, "finetune")
    run, env, pixels, img_size, n_classes = ev.run, ev.run.env, ev.run.pixels, ev.img_size, ev.num_classes
    source, train_idx, val_idx = ev.source, ev.train_idx, ev.val_idx
    model = build_classifier(ev.encoder, n_classes, global_pool=cfg.global_pool, drop_path=cfg.drop_path,
                             img_size=img_size)
    source_info = ev.source_info
    del ev  # the encoder: the classifier holds its own copy of the weights
    frozen = freeze_all_but_last(model, cfg.blocks) if cfg.blocks else []
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    task = FinetuneTask(model, n_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                        frozen=frozen, global_pool=cfg.global_pool)

    lr = effective_lr(cfg, env)
    optimizer = finetune_optimizer(model, lr, cfg.weight_decay, cfg.layer_decay)
    loader = image_loader(source, train_idx, cfg, env, recipe="finetune", img_size=img_size, shuffle=True,
                          drop_last=True, distributed=True, auto_augment=cfg.randaug or None, re_prob=cfg.reprob,
                          scale=(cfg.crop_scale, 1.0), pixels=pixels)
    recorded = run.record(cfg)
    if env.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("fine-tuning %s%s (%.2fM of %.2fM parameters trainable), %s head, %d classes, lr %.3g, "
                 "layer decay %.2f", "the last %d blocks of " % cfg.blocks if cfg.blocks else "",
                 source_info.get("model") or source_info.get("checkpoint"), trainable / 1e6,
                 sum(p.numel() for p in model.parameters()) / 1e6, "global-pool" if cfg.global_pool else "class-token",
                 n_classes, lr, cfg.layer_decay)
    result = fit(task, optimizer, loader, recorded, run.output, env)

    acc = {}
    if env.is_main:
        acc = evaluate(task, image_loader(source, val_idx, cfg, env, img_size=img_size, pixels=pixels), env,
                       env.precision)
    acc = _broadcast(acc, env)
    results = {"command": "finetune", **acc, "num_train": len(train_idx), "num_val": len(val_idx),
               "num_classes": n_classes, "global_pool": cfg.global_pool, "blocks": cfg.blocks,
               "img_size": img_size, "lr": lr, "epochs": result.epoch, "steps": result.step,
               "final_loss": result.loss, **source_info, "seconds": round(time.time() - t0, 2)}
    if env.is_main:
        write_results(run.output, "finetune", results)
    return results


def evaluate(task: FinetuneTask, loader, env, precision: str = "fp32") -> dict:
    """Top-1 / top-5 (percent) of the classifier over a loader of (images, labels)."""
    was_training = task.training
    task.eval()
    scores, labels = [], []
    with torch.inference_mode(), autocast(env.device, precision):
        for images, y in logged(loader, "held-out evaluation"):
            scores.append(task.logits(images.to(env.device)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    task.train(was_training)
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def _broadcast(obj: dict, env) -> dict:
    if not env.distributed:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
