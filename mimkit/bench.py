"""``mimkit bench``: how fast a full MAE pretraining step runs here, against the peers, in one process.

For each named configuration (:data:`CONFIGS`) and precision it builds, with the same shapes, batch,
precision and thread count,

- ``mimkit``: :class:`~mimkit.models.MaskedAutoencoder` with the optimizer ``mimkit pretrain`` uses,
- ``hf``: Hugging Face transformers' ``ViTMAEForPreTraining`` with ``torch.optim.AdamW``,
- ``lightly``: lightly's MAE modules (``MaskedVisionTransformerTIMM`` encoder, ``MaskedVisionTransformerDecoderTIMM``
  decoder, masks from ``lightly.models.utils``, MSE on the masked patches) with ``torch.optim.AdamW``,

and times full training steps (forward, backward, optimizer) after warm-up. The contestants take turns,
repeat by repeat, so that a change in the machine's load hits all of them alike; each row reports the median
and the spread of images/s over the repeats, the ratio mimkit/peer, FLOPs per image (counted by
``torch.utils.flop_counter`` on one step), the achieved FLOP/s and its fraction of the dense matmul rate
measured in the same run (fp32 and bf16), and the peak memory of a step. It also times the data pipeline
alone (decode once, augment and collate batched tensors) and, for bf16, checks that the loss curve of the
first few hundred steps follows fp32's within the noise that a different draw of masks makes.

The peers are an optional extra (``pip install 'mimkit[bench]'``); a missing one is skipped with a note.
"""
import ctypes
import gc
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import write_json, write_text
from .models import DECODERS, ENCODERS, create_mae
from .precision import autocast

log = logging.getLogger("mimkit")


# what is timed -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSpec:
    model: str  # encoder preset (mimkit.models.ENCODERS)
    decoder: str  # decoder shape (mimkit.models.DECODERS)
    cpu_batch: int
    gpu_batch: int
    mask_ratio: float = 0.75

    @property
    def encoder(self) -> dict:
        return {"mlp_ratio": 4.0, **ENCODERS[self.model]}

    @property
    def dec(self) -> dict:
        return dict(DECODERS[self.decoder])

    def batch(self, device: torch.device) -> int:
        return self.gpu_batch if device.type == "cuda" else self.cpu_batch


CONFIGS: Dict[str, BenchSpec] = {
    # the CIFAR recipe: ViT-Tiny on 64 patches of 4 px, the light 32 px decoder (128-d, 2 blocks)
    "tiny32": BenchSpec("vit_tiny_patch4_32", "small32", cpu_batch=128, gpu_batch=128),
    # the paper's ViT-B/16 with its 512-d, 8-block decoder
    "base224": BenchSpec("vit_base_patch16_224", "default", cpu_batch=16, gpu_batch=256),
    # a few-layer model that keeps the benchmark's own test quick
    "micro32": BenchSpec("vit_micro_patch4_32", "small32", cpu_batch=8, gpu_batch=8),
}
PEERS = ("hf", "lightly")
PRECISIONS = ("fp32", "bf16")

# the MAE recipe's optimizer settings, for every contestant
LR, WEIGHT_DECAY, BETAS = 1.5e-4, 0.05, (0.9, 0.95)


def mimkit_optimizer(model: nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    """The optimizer of ``mimkit pretrain``: timm's AdamW parameter groups (no decay on norms, biases, tokens,
    position embeddings), with PyTorch's fused kernel (one pass over all parameters; 3-4x faster than the
    default per-tensor loop on the CPU)."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=WEIGHT_DECAY, betas=BETAS, fused=True)


@dataclass
class Contestant:
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]  # images -> scalar loss, as trained
    eager_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the same, uncompiled (FLOP counting)

    def step(self, images: torch.Tensor, precision: str) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(images.device, precision):
            loss = self.loss(images)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def build_mimkit(spec: BenchSpec, device: torch.device, variants=("mimkit",)) -> List[Contestant]:
    """mimkit's model; ``variants`` (mimkit, mimkit+compile, mimkit+ckpt) share one model and optimizer."""
    model = create_mae(spec.model, mask_ratio=spec.mask_ratio, **spec.dec).to(device).train()
    opt = mimkit_optimizer(model)

    def eager(x):
        return model(x).loss

    def checkpointed(x):  # the recomputation in backward runs the blocks themselves, so the flag can drop here
        model.set_grad_checkpointing(True)
        try:
            return model(x).loss
        finally:
            model.set_grad_checkpointing(False)

    out = []
    for v in variants:
        if v == "mimkit":
            out.append(Contestant(v, model, opt, eager, eager))
        elif v == "mimkit+compile":
            torch._dynamo.reset()  # a fresh cache per configuration: its shapes are static, compiled as such
            compiled = torch.compile(model, dynamic=False)
            out.append(Contestant(v, model, opt, lambda x, f=compiled: f(x).loss, eager))
        elif v == "mimkit+ckpt":
            out.append(Contestant(v, model, opt, checkpointed, eager))  # FLOPs of the model, not the recompute
        else:
            raise ValueError(f"unknown mimkit variant {v!r}")
    return out


def build_hf(spec: BenchSpec, device: torch.device) -> Contestant:
    """transformers' ViTMAEForPreTraining with the same shapes (its default attention: SDPA) and torch's AdamW."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    e, d = spec.encoder, spec.dec
    cfg = ViTMAEConfig(image_size=e["img_size"], patch_size=e["patch_size"], num_channels=3, qkv_bias=True,
                       hidden_size=e["embed_dim"], num_hidden_layers=e["depth"], num_attention_heads=e["num_heads"],
                       intermediate_size=int(e["embed_dim"] * e["mlp_ratio"]), decoder_hidden_size=d["decoder_dim"],
                       decoder_num_hidden_layers=d["decoder_depth"], decoder_num_attention_heads=d["decoder_heads"],
                       decoder_intermediate_size=int(d["decoder_dim"] * e["mlp_ratio"]), mask_ratio=spec.mask_ratio,
                       norm_pix_loss=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = ViTMAEForPreTraining(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

    def loss(x):
        return model(pixel_values=x).loss
    return Contestant("hf", model, opt, loss, loss)


def build_lightly(spec: BenchSpec, device: torch.device) -> Contestant:
    """lightly's MAE: its timm-based masked encoder and decoder modules and its masking utilities, put together
    the way lightly's MAE example does (decoder embedding and prediction as linear layers, MSE on the masked
    patches), with torch's AdamW."""
    from lightly.models import utils as lu
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
    from timm.models.vision_transformer import VisionTransformer
    e, d = spec.encoder, spec.dec
    p = e["patch_size"]

    class LightlyMAE(nn.Module):
        def __init__(self):
            super().__init__()
            vit = VisionTransformer(img_size=e["img_size"], patch_size=p, embed_dim=e["embed_dim"], depth=e["depth"],
                                    num_heads=e["num_heads"], mlp_ratio=e["mlp_ratio"], qkv_bias=True, num_classes=0)
            self.backbone = MaskedVisionTransformerTIMM(vit=vit)
            self.decoder_embed = nn.Linear(e["embed_dim"], d["decoder_dim"])
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, embed_dim=d["decoder_dim"], depth=d["decoder_depth"],
                num_heads=d["decoder_heads"], mlp_ratio=e["mlp_ratio"])
            self.decoder_pred = nn.Linear(d["decoder_dim"], p * p * 3)

        def forward(self, images):
            b, n = images.shape[0], self.backbone.sequence_length
            idx_keep, idx_mask = lu.random_token_mask((b, n), mask_ratio=spec.mask_ratio, device=images.device)
            latent = self.backbone.encode(images=images, idx_keep=idx_keep)
            tokens = lu.repeat_token(self.decoder.mask_token, (b, n))
            tokens = lu.set_at_index(tokens, idx_keep, self.decoder_embed(latent).type_as(tokens))
            pred = self.decoder_pred(lu.get_at_index(self.decoder(tokens), idx_mask))
            target = lu.get_at_index(lu.patchify(images, p), idx_mask - 1)  # the patches have no class token
            return F.mse_loss(pred, target)

    model = LightlyMAE().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return Contestant("lightly", model, opt, model, model)


BUILDERS = {"hf": build_hf, "lightly": build_lightly}


# measuring -----------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5, seconds: float = 0.5) -> dict:
    """The machine's dense matmul rate (FLOP/s) on square n x n operands, median and spread over repeats of
    about ``seconds`` each."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    flop = 2.0 * n ** 3
    torch.mm(a, b, out=c)
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=c)
    _sync(device)
    iters = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        _sync(device)
        rates.append(flop * iters / (time.perf_counter() - t0))
    return summary(rates)


def _flop_formulas():
    """FLOP formulas for the CPU flash-attention kernels, which torch.utils.flop_counter does not list."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def count_flops(c: Contestant, images: torch.Tensor, precision: str) -> float:
    """FLOPs per image of one forward and backward pass (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    c.optimizer.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with counter:
        with autocast(images.device, precision):
            loss = (c.eager_loss or c.loss)(images)
        loss.backward()
    c.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def state_bytes(c: Contestant) -> int:
    """Parameters, buffers and optimizer state."""
    opt_state = [v for s in c.optimizer.state.values() for v in s.values()]
    return _tensor_bytes(list(c.module.parameters()) + list(c.module.buffers()) + opt_state)


def _proc_kb(field: str) -> Optional[int]:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident size (Linux >= 4.0)
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_memory(c: Contestant, images: torch.Tensor, precision: str) -> dict:
    """Peak memory of one training step: the state (parameters, optimizer) plus what the step adds on top
    (activations, gradients, workspace): CUDA's allocator peak, or the growth of the process's peak resident
    size on the CPU. None where the platform cannot tell."""
    device = images.device
    state = state_bytes(c)
    c.optimizer.zero_grad(set_to_none=True)
    _release_free_memory()
    step = None
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        c.step(images, precision)
        _sync(device)
        step = torch.cuda.max_memory_allocated(device) - before
    elif _reset_peak_rss():
        before = _proc_kb("VmRSS")
        _reset_peak_rss()
        c.step(images, precision)
        peak = _proc_kb("VmHWM")
        if before is not None and peak is not None:
            step = max(0, peak - before) * 1024
    mb = 2.0 ** 20
    return {"state_mb": state / mb, "step_mb": None if step is None else step / mb,
            "peak_mb": None if step is None else (state + step) / mb}


@dataclass
class Runner:
    contestant: Contestant
    precision: str
    steps: int = 1
    images_per_s: Optional[List[float]] = None
    cpu_share: Optional[List[float]] = None  # process CPU time / (wall time x threads) of each repeat
    warmup_s: float = 0.0


def time_interleaved(runners: List[Runner], images: torch.Tensor, *, warmup: int, steps: int, repeats: int,
                     seconds: float = 2.0, between: Optional[Callable[[], None]] = None):
    """Warm every runner up, then time ``repeats`` rounds in which each runner does its steps in turn (and
    ``between`` runs after each round: the matmul probes)."""
    device, batch = images.device, images.shape[0]
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    for r in runners:
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            r.contestant.step(images, r.precision)
        _sync(device)
        r.warmup_s = time.perf_counter() - t0
        if steps:
            r.steps = steps
        else:  # one more step to size the repeats
            t0 = time.perf_counter()
            r.contestant.step(images, r.precision)
            _sync(device)
            r.steps = max(1, int(round(seconds / max(time.perf_counter() - t0, 1e-6))))
        r.images_per_s, r.cpu_share = [], []
    for i in range(repeats):
        for r in runners:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(r.steps):
                loss = r.contestant.step(images, r.precision)
            _sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            r.images_per_s.append(batch * r.steps / wall)
            r.cpu_share.append(cpu / (wall * threads))
            if not torch.isfinite(loss):
                raise RuntimeError(f"{r.contestant.name} ({r.precision}): the loss is not finite")
        if between is not None:
            between()
        log.info("bench: repeat %d/%d: %s", i + 1, repeats,
                 ", ".join(f"{r.contestant.name} {r.precision} {r.images_per_s[-1]:.1f} img/s" for r in runners))


# the data pipeline and the bf16 loss check ------------------------------------------------------------
def time_data_pipeline(data: str, img_size: int, batch: int, device: torch.device, batches: int, repeats: int,
                       num_workers: Optional[int] = None, seed: int = 0) -> dict:
    """Images/s of the pretraining loader alone (decode, augment, collate), as ``mimkit pretrain`` builds it."""
    from .data import benchmark_loader, make_loader, open_images, split_train_val
    t0 = time.perf_counter()
    source = open_images(data)
    train_idx, _ = split_train_val(source, 0.1)
    loader = make_loader(source, train_idx, batch_size=batch, recipe="pretrain", img_size=img_size, seed=seed,
                         device=device, cache="auto", num_workers=num_workers)
    setup_s = time.perf_counter() - t0
    n = max(1, min(batches, len(loader) - 1))
    rates = [benchmark_loader(loader, n) for _ in range(repeats)]
    return {"data": str(data), "images": len(train_idx), "batch": batch, "batches": n, "cached": loader.cache is not None,
            "batched_augmentation": bool(getattr(loader, "batched", False)), "setup_s": setup_s,
            "images_per_s": summary(rates)}


def _smooth(values: List[float], window: int) -> List[float]:
    return [statistics.fmean(values[i:i + window]) for i in range(0, len(values) - window + 1, window)]


def loss_check(name: str, spec: BenchSpec, device: torch.device, data: str, steps: int, batch: int,
               seed: int = 0) -> dict:
    """Train mimkit ``steps`` steps three times from the same initialisation on the same batches: fp32, bf16
    (same masks) and fp32 with other masks. bf16 passes when its curve is no further from fp32's than the
    other-masks curve is (mean absolute difference of window means)."""
    from .data import make_loader, open_images, split_train_val
    img_size = spec.encoder["img_size"]
    source = open_images(data)
    train_idx, _ = split_train_val(source, 0.1)
    loader = make_loader(source, train_idx, batch_size=batch, recipe="pretrain", img_size=img_size, seed=seed,
                         device=device, cache="auto", num_workers=0)
    batches, epoch = [], 0
    while len(batches) < steps:
        loader.set_epoch(epoch)
        batches += [x for x, _ in loader][:steps - len(batches)]
        epoch += 1
    lr = 1e-3 * batch / 256  # the CIFAR recipe's base learning rate
    warmup = max(1, steps // 5)
    n_patches = (img_size // spec.encoder["patch_size"]) ** 2
    curves, seconds = {}, {}
    for label, precision, mask_seed in (("fp32", "fp32", 1), ("bf16", "bf16", 1), ("fp32_other_masks", "fp32", 2)):
        torch.manual_seed(seed)
        model = create_mae(spec.model, mask_ratio=spec.mask_ratio, **spec.dec).to(device).train()
        opt = mimkit_optimizer(model, lr)
        masks = torch.Generator().manual_seed(mask_seed)
        losses, t0 = [], time.perf_counter()
        for i, images in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (i + 1) / warmup)
            noise = torch.rand(images.shape[0], n_patches, generator=masks).to(device)
            with autocast(device, precision):
                loss = model(images, noise=noise).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
        curves[label], seconds[label] = losses, time.perf_counter() - t0
    window = max(1, steps // 10)
    smooth = {k: _smooth(v, window) for k, v in curves.items()}

    def gap(a, b):
        return statistics.fmean(abs(x - y) for x, y in zip(smooth[a], smooth[b]))

    bf16_gap, noise_gap = gap("bf16", "fp32"), gap("fp32_other_masks", "fp32")
    return {"config": name, "steps": steps, "batch": batch, "lr": lr, "window": window, "data": str(data),
            "bf16_gap": bf16_gap, "noise_gap": noise_gap, "passed": bf16_gap <= noise_gap,
            "final": {k: v[-1] for k, v in smooth.items()}, "seconds": seconds, "curves": curves}


# the command --------------------------------------------------------------------------------------
def _split(text: str) -> List[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("timm", "transformers", "lightly"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - an absent or broken peer is reported, not fatal
            info[pkg] = None
    from . import __version__
    info["mimkit"] = __version__
    return info


def _load() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench(cfg) -> dict:
    """Run the benchmark described by a :class:`mimkit.config.BenchConfig`; print a table, write JSON."""
    from .engine import setup
    env = setup(cfg)
    device = env.device
    precisions = _split(cfg.precision)
    peers = [p for p in _split(cfg.peers) if p != "none"]
    variants = {"off": ["mimkit"], "on": ["mimkit+compile"], "both": ["mimkit", "mimkit+compile"]}[cfg.compile]
    if cfg.grad_checkpointing:
        variants.append("mimkit+ckpt")
    started = datetime.now(timezone.utc)
    result = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(device),
              "load_before": _load(), "settings": {k: getattr(cfg, k) for k in vars(cfg)}, "notes": [],
              "matmul": {}, "results": [], "data_pipeline": None, "loss_check": None}
    if device.type == "cuda":
        result["notes"].append("fp32 rows use TF32 matmuls, as mimkit pretrain does on a GPU")

    n = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    matmul = {p: matmul_rate(device, dtypes[p], n)["all"] for p in PRECISIONS}

    def probe():  # the matmul rate again after every round, so the limit is measured under the same load
        for p in PRECISIONS:
            matmul[p] += matmul_rate(device, dtypes[p], n, repeats=1, seconds=0.2)["all"]

    available = []
    for p in peers:
        try:
            __import__({"hf": "transformers", "lightly": "lightly"}[p])
            available.append(p)
        except ImportError:
            result["notes"].append(f"peer {p} is not installed (pip install 'mimkit[bench]'): skipped")
            log.warning("bench: %s", result["notes"][-1])

    for name in _split(cfg.configs):
        result["results"] += _bench_config(name, cfg, device, precisions, variants, available, probe)
        _release_free_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for p in PRECISIONS:
        result["matmul"][p] = {"size": n, **summary(matmul[p])}
    for row in result["results"]:
        row["matmul_flops"] = result["matmul"][row["precision"]]["median"]
        row["fraction_of_matmul"] = row["achieved_flops"] / row["matmul_flops"]

    first = _split(cfg.configs)[0]
    if cfg.data:
        spec = CONFIGS[first]
        batch = cfg.batch_size or spec.batch(device)
        workers = cfg.num_workers
        result["data_pipeline"] = {"config": first, **time_data_pipeline(
            cfg.data, spec.encoder["img_size"], batch, device, cfg.data_batches, cfg.repeats, workers, cfg.seed)}
    if cfg.loss_check_steps and "bf16" in precisions:
        if cfg.data:
            result["loss_check"] = loss_check(first, CONFIGS[first], device, cfg.data, cfg.loss_check_steps,
                                              cfg.loss_check_batch, cfg.seed)
        else:
            result["notes"].append("bf16 loss check skipped: it needs images (--data)")
    result["load_after"] = _load()
    result["seconds"] = (datetime.now(timezone.utc) - started).total_seconds()
    result["targets"] = targets(result, device)
    print(format_table(result))
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result, indent=1)
        write_text(out.with_suffix(".md"), markdown(result) + "\n")
        log.info("bench: results in %s", out)
    return result


def _bench_config(name: str, cfg, device: torch.device, precisions, variants, peers, probe) -> List[dict]:
    """Every contestant at every precision on one configuration: rows of the result table."""
    spec = CONFIGS[name]
    batch = cfg.batch_size or spec.batch(device)
    torch.manual_seed(cfg.seed)
    img = spec.encoder["img_size"]
    images = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    contestants = build_mimkit(spec, device, variants) + [BUILDERS[p](spec, device) for p in peers]
    runners = [Runner(c, p) for p in precisions for c in contestants]
    log.info("bench %s: batch %d, %s, timing %s", name, batch, ", ".join(precisions),
             ", ".join(c.name for c in contestants))
    time_interleaved(runners, images, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats, between=probe)
    flops = {c.name: count_flops(c, images, "fp32") for c in contestants}
    rows = []
    for r in runners:
        c = r.contestant
        rows.append({"config": name, "precision": r.precision, "impl": c.name, "batch": batch, "steps": r.steps,
                     "warmup_s": r.warmup_s, "images_per_s": summary(r.images_per_s),
                     "cpu_share": summary(r.cpu_share), "flops_per_image": flops[c.name],
                     "achieved_flops": flops[c.name] * statistics.median(r.images_per_s),
                     "memory": step_memory(c, images, r.precision)})
    _add_ratios(rows, name)
    return rows


def _add_ratios(rows: List[dict], config: str):
    """mimkit rows get ``vs`` (their median images/s over each peer's at the same precision), ``vs_fp32`` (over
    the peer's fp32) and ``vs_paired`` (the median of the per-repeat ratios: each pair ran back to back)."""
    mine = [r for r in rows if r["config"] == config and r["impl"].startswith("mimkit")]
    peers = [r for r in rows if r["config"] == config and not r["impl"].startswith("mimkit")]
    for r in mine:
        ips = r["images_per_s"]
        r["vs"], r["vs_fp32"], r["vs_paired"] = {}, {}, {}
        for p in peers:
            ratio = ips["median"] / p["images_per_s"]["median"]
            if p["precision"] == r["precision"]:
                r["vs"][p["impl"]] = ratio
                r["vs_paired"][p["impl"]] = statistics.median(
                    a / b for a, b in zip(ips["all"], p["images_per_s"]["all"]))
            if p["precision"] == "fp32":
                r["vs_fp32"][p["impl"]] = ratio


def targets(result: dict, device: torch.device) -> List[dict]:
    """The issue's targets, each with its measured value (rows that were not timed are left out).

    CPU: fp32 mimkit >= 1.25x the faster peer's fp32; at 32 px also bf16 mimkit >= 2x the faster peer's fp32,
    with the loss check passing; the data pipeline >= 3x the fastest mimkit training step.
    GPU: bf16 mimkit >= 1.3x the faster peer's bf16, and >= 40% of the measured bf16 matmul rate.
    """
    rows, gpu = result["results"], device.type == "cuda"
    rules = [("bf16", "bf16", 1.3)] if gpu else [("fp32", "fp32", 1.25), ("bf16", "fp32", 2.0)]
    out = []
    for m in (r for r in rows if r["impl"] in ("mimkit", "mimkit+compile")):  # +ckpt trades speed for memory
        for precision, against, need in rules:
            if m["precision"] != precision or (not gpu and precision == "bf16" and CONFIGS[m["config"]].encoder[
                    "img_size"] != 32):
                continue
            peers = [r for r in rows if r["config"] == m["config"] and r["precision"] == against
                     and not r["impl"].startswith("mimkit")]
            if not peers:
                continue
            p = max(peers, key=lambda r: r["images_per_s"]["median"])
            ratio = m["images_per_s"]["median"] / p["images_per_s"]["median"]
            t = {"what": f"{m['config']} {m['impl']} {precision} / faster peer {against} ({p['impl']})",
                 "need": need, "measured": ratio, "met": ratio >= need}
            lc = result.get("loss_check")
            if precision == "bf16" and not gpu:
                t["loss_check_passed"] = bool(lc and lc["config"] == m["config"] and lc["passed"])
                t["met"] = t["met"] and t["loss_check_passed"]
            out.append(t)
        if gpu and m["precision"] == "bf16":
            out.append({"what": f"{m['config']} {m['impl']} bf16 fraction of the bf16 matmul rate", "need": 0.40,
                        "measured": m["fraction_of_matmul"], "met": m["fraction_of_matmul"] >= 0.40})
    dp = result.get("data_pipeline")
    train = [r for r in rows if dp and r["config"] == dp["config"] and r["impl"].startswith("mimkit")]
    if train:
        ratio = dp["images_per_s"]["median"] / max(r["images_per_s"]["median"] for r in train)
        out.append({"what": f"data pipeline / fastest mimkit {dp['config']} training step", "need": 3.0,
                    "measured": ratio, "met": ratio >= 3.0})
    return out


def _num(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _row_cells(r: dict, peers: List[str]) -> List[str]:
    """One result's cells, shared by the text and the Markdown table."""
    ips, peak = r["images_per_s"], r["memory"]["peak_mb"]
    return ([r["config"], r["precision"], r["impl"], str(r["batch"]),
             f"{_num(ips['median'])} [{_num(ips['min'])}-{_num(ips['max'])}]",
             f"{100 * r['cpu_share']['median']:.0f}%" if r.get("cpu_share") else ""]
            + [f"{r['vs'][p]:.2f}x" if p in r.get("vs", {}) else "" for p in peers]
            + [f"{r['flops_per_image'] / 1e9:.2f}", f"{r['achieved_flops'] / 1e9:.1f}",
               f"{100 * r['fraction_of_matmul']:.0f}%", "-" if peak is None else f"{peak:.0f}"])


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"mimkit bench: {m.get('gpu') or m['cpu']} ({m['cpu_cores']} cores, {m['threads']} threads), torch "
             f"{m['torch']}, timm {m['timm']}, transformers {m['transformers']}, lightly {m['lightly']}; "
             f"{result['date']}; load average {result['load_before']} -> {result.get('load_after')}"]
    lines.append("dense matmul: " + ", ".join(
        f"{p} {v['median'] / 1e9:.0f} GFLOP/s [{v['min'] / 1e9:.0f}-{v['max'] / 1e9:.0f}]"
        for p, v in result["matmul"].items()))
    peers = sorted({r["impl"] for r in result["results"] if not r["impl"].startswith("mimkit")})
    cols = ["config", "prec", "impl", "batch", "img/s median [min-max]", "cpu"] + [f"vs {p}" for p in peers] + [
        "GFLOP/img", "GFLOP/s", "of matmul", "peak MB"]
    table = [_row_cells(r, peers) for r in result["results"]]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines += ["", fmt(cols), fmt(["-" * w for w in widths])] + [fmt(t) for t in table]
    lines.append("(cpu: the CPU time the process got over wall time x threads, a gauge of the machine's load; "
                 "vs PEER: mimkit's median images/s over the peer's at the same precision)")
    dp = result.get("data_pipeline")
    if dp:
        v = dp["images_per_s"]
        lines += ["", f"data pipeline ({dp['config']}, {dp['data']}, {dp['images']} images, batch {dp['batch']}, "
                      f"cached {dp['cached']}): {v['median']:.0f} img/s [{v['min']:.0f}-{v['max']:.0f}], "
                      f"setup {dp['setup_s']:.1f} s"]
    lc = result.get("loss_check")
    if lc:
        lines += ["", f"bf16 loss check ({lc['config']}, {lc['steps']} steps of {lc['batch']}): mean |bf16 - fp32| "
                      f"{lc['bf16_gap']:.4f} vs {lc['noise_gap']:.4f} between fp32 runs with other masks: "
                      f"{'pass' if lc['passed'] else 'FAIL'} (final window: " + ", ".join(
                          f"{k} {v:.4f}" for k, v in lc["final"].items()) + ")"]
    if result.get("targets"):
        lines += ["", "targets:"]
        for t in result["targets"]:
            lines.append(f"  {'met ' if t['met'] else 'MISS'} {t['what']}: {t['measured']:.2f} (need {t['need']})")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The result table as Markdown (for the README's performance section)."""
    m = result["machine"]
    peers = sorted({r["impl"] for r in result["results"] if not r["impl"].startswith("mimkit")})
    lines = [f"{m.get('gpu') or m['cpu']}, {m['cpu_cores']} cores, {m['threads']} threads; torch {m['torch']}, "
             f"timm {m['timm']}, transformers {m['transformers']}, lightly {m['lightly']}; {result['date']}; "
             f"load average {result['load_before'][0] if result['load_before'] else '?'} before, "
             f"{result['load_after'][0] if result.get('load_after') else '?'} after. Dense matmul measured in the "
             "run: " + ", ".join(f"{p} {v['median'] / 1e9:.0f} GFLOP/s" for p, v in result["matmul"].items()) + ".",
             "", "| config | precision | implementation | batch | images/s, median [min-max] | CPU share | "
             + " | ".join(f"mimkit / {p}" for p in peers) + " | GFLOP/image | GFLOP/s | of matmul rate | peak MB |",
             "|" + " --- |" * (10 + len(peers))]
    lines += ["| " + " | ".join(_row_cells(r, peers)) + " |" for r in result["results"]]
    dp, lc = result.get("data_pipeline"), result.get("loss_check")
    if dp:
        v = dp["images_per_s"]
        lines += ["", f"Data pipeline alone ({dp['data']}, {dp['images']} images, batch {dp['batch']}, decoded once "
                      f"into memory: {dp['cached']}): {v['median']:.0f} images/s [{v['min']:.0f}-{v['max']:.0f}]."]
    if lc:
        lines += ["", f"bf16 loss check ({lc['config']}, {lc['steps']} steps of {lc['batch']} images): mean |bf16 - "
                      f"fp32| of {lc['window']}-step means {lc['bf16_gap']:.5f}, against {lc['noise_gap']:.5f} between "
                      f"two fp32 runs with different masks: {'pass' if lc['passed'] else 'fail'}."]
    if result.get("targets"):
        lines += ["", "| target | need | measured | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['what']} | {t['need']} | {t['measured']:.2f} | {'yes' if t['met'] else 'no'} |"
                  for t in result["targets"]]
    return "\n".join(lines)
