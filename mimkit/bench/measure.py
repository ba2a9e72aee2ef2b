"""What ``mimkit bench`` measures: training steps timed in turns, the dense matmul rate, FLOPs (through
:func:`mimkit.flops.counted_flops`), peak memory, the data pipeline alone, the bf16 loss check, the machine."""
import ctypes
import gc
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..flops import counted_flops
from ..models import create_mae
from ..precision import autocast
from .peers import BenchSpec, Contestant, mimkit_optimizer
from ..data import benchmark_loader, make_loader, open_images, split_train_val

log = logging.getLogger("mimkit")


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


def count_flops(c: Contestant, images: torch.Tensor, precision: str) -> float:
    """FLOPs per image of one forward and backward pass (matmuls, convolutions, attention)."""
    c.optimizer.zero_grad(set_to_none=True)

    def step():
        with autocast(images.device, precision):
            loss = (c.eager_loss or c.loss)(images)
        loss.backward()
    total = counted_flops(step)
    c.optimizer.zero_grad(set_to_none=True)
    return total / images.shape[0]


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


def release_free_memory():
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
    release_free_memory()
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


# where a step's time goes -------------------------------------------------------------------------------
BREAKDOWN = ("matmul", "attention", "norm_act", "optimizer", "copy_cast", "other")
# names (of an op, an autograd node or a compiled kernel) by category, lower case; the first two also claim what
# runs inside them (the attention kernel's own matmuls and softmax, the optimizer's arithmetic)
_ENCLOSING = (("optimizer", ("optimizer.step", "adam", "_foreach_", "lamb", "lars")),
              ("attention", ("attention", "softmax", "sdpa")))
_OWN = (("matmul", ("mm", "linear", "conv", "matmul", "baddbmm")),
        ("norm_act", ("layer_norm", "layernorm", "native_layer_norm", "gelu", "erf", "tanh", "silu")),
        ("copy_cast", ("copy", "_to_copy", "clone", "contiguous", "cat", "gather", "index", "scatter", "stack",
                       "masked_select", "where", "fill_", "zero_")))


def _match(name: str, table) -> Optional[str]:
    n = name.lower()
    for category, keys in table:
        if any(k in n for k in keys):
            return category
    return None


def op_category(event) -> str:
    """An op's category: inside the optimizer or attention, that; else its own name's; else norm_act when a norm
    or activation encloses it (the multiplies inside GeluBackward); else other (residual adds, bias gradients)."""
    chain, e = [], event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    for name in chain:
        hit = _match(name, _ENCLOSING)
        if hit:
            return hit
    hit = _match(chain[0], _OWN)
    if hit:
        return hit
    return "norm_act" if any(_match(name, _OWN[1:2]) for name in chain[1:]) else "other"


def step_breakdown(c: Contestant, images: torch.Tensor, precision: str, step_s: float, steps: int = 2) -> dict:
    """Seconds per step in each of :data:`BREAKDOWN`, by ``torch.profiler`` over ``steps`` training steps: the
    self time of every op on the CPU side, put in its category, as fractions of all ops' time, times ``step_s``
    (the step's time measured without the profiler, whose own overhead would otherwise count). On a GPU the
    fractions are of the CUDA kernels' time instead. Why our own table: the profiler lists ops, not the
    categories a reader of a ViT step thinks in (torch has no such grouping)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            c.step(images, precision)
        _sync(images.device)
    totals = dict.fromkeys(BREAKDOWN, 0.0)
    for e in prof.events():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0:
            totals[op_category(e)] += t
    all_ops = sum(totals.values()) or 1.0
    return {k: step_s * v / all_ops for k, v in totals.items()}


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


# the machine -----------------------------------------------------------------------------------------
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
    from importlib.metadata import PackageNotFoundError, version
    try:  # the installed distribution's version: importing the package root from here would be an upward import
        info["mimkit"] = version("mimkit")
    except PackageNotFoundError:
        info["mimkit"] = None
    return info


def load_average() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
