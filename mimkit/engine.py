"""The one training loop, shared by pretraining, fine-tuning and linear probing.

``fit`` takes a task module (``forward(images, labels, rng) -> loss``), its optimizer and a
loader, and owns everything around the update: device and DDP, precision, gradient
accumulation and clipping, the per-iteration warm-up + cosine schedule, non-finite loss
guards, metrics (JSON lines, TensorBoard, progress), atomic checkpoints, resume and
SIGTERM. Randomness is reseeded from (seed, step) each step and masks are drawn for the
global batch, so a resumed or multi-process run computes what one uninterrupted process
would.
"""
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler

from .checkpoints.io import check_state_dict, load_latest, prune_checkpoints, save_checkpoint
from .errors import ConfigError, DivergedError, Preempted
from .precision import autocast
from .trackers import open_tracker

log = logging.getLogger("mimkit")


# processes and devices ---------------------------------------------------------------------------
@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(cfg) -> Env:
    """Pick the device, set threads and determinism, and join the process group under torchrun."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
    device = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if getattr(cfg, "deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=getattr(cfg, "dist_timeout", 600)))
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a GPU (on the CPU use bf16)")
    return Env(device, rank, world)


class StepRandom:
    """Random numbers for one step, drawn for the whole global batch and sliced to this process's share.

    Masks therefore depend only on (seed, step, micro-batch), not on how many processes share the batch.
    """

    def __init__(self, seed: int, step: int, micro: int, env: Env):
        self.generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) % 2**63)
        self.env = env

    def rand(self, batch: int, *shape) -> torch.Tensor:
        full = torch.rand(batch * self.env.world_size, *shape, generator=self.generator)
        return full[self.env.rank * batch:(self.env.rank + 1) * batch].to(self.env.device, non_blocking=True)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reduce_mean(x: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= env.world_size
    return x


# metrics --------------------------------------------------------------------------------------------
class Metrics:
    """JSON lines plus TensorBoard (plus an optional tracker: :mod:`mimkit.trackers`) on the main process; nothing
    elsewhere. Scalars go everywhere; an image batch (N, 3, H, W) in [0, 1] goes to TensorBoard as images."""

    def __init__(self, run_dir: Path, env: Env, tracker=None):
        self.on = env.is_main
        self.tb, self.tracker = None, tracker
        if self.on:
            self.file = open(run_dir / "metrics.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional: JSON lines still hold everything
                pass

    def write(self, step: int, **values):
        if not self.on:
            return
        images = {k: v for k, v in values.items() if torch.is_tensor(v) and v.dim() == 4}
        values = {k: v for k, v in values.items() if k not in images}
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            for k, v in images.items():
                self.tb.add_images(k, v, step)
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step)

    def close(self):
        if self.on:
            self.file.close()
            if self.tb:
                self.tb.close()
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None


class Progress:
    """tqdm on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, initial: int, on: bool, every: int):
        self.every, self.on = every, on
        self.bar = None
        if on and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.total, self.extra = total, {}

    def show(self, **values):
        """Keep showing these values (e.g. the latest k-NN top-1) on the progress line."""
        self.extra.update(values)

    def set_total(self, total: int):
        self.total = total
        if self.bar is not None:
            self.bar.total = total

    def update(self, step: int, loss: float, ips: float, eta_s: float):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", **{k: f"{v:.2f}" for k, v in self.extra.items()})
        elif self.on and (step % self.every == 0 or step == self.total):
            extra = "".join(f"  {k} {v:.2f}" for k, v in self.extra.items())
            log.info("step %d/%d  loss %.4f  %.0f img/s%s  %s left", step, self.total, loss, ips, extra,
                     time.strftime("%H:%M:%S", time.gmtime(eta_s)))

    def close(self):
        if self.bar is not None:
            self.bar.close()


# stopping ---------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM (a scheduler's preemption notice) asks the loop to checkpoint and leave."""

    def __init__(self, grace: float):
        self.requested = False
        self.grace = grace
        self._old = None

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self.grace > 0 and hasattr(signal, "alarm"):
            signal.alarm(max(1, int(math.ceil(self.grace))))  # the default SIGALRM action ends us if saving hangs

    def __exit__(self, *exc):
        if self.requested and self.grace > 0 and hasattr(signal, "alarm"):
            signal.alarm(0)  # the checkpoint is written: a caller that goes on must not be killed later
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


# the loop -----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    epoch: int
    loss: float
    bad_steps: int
    seconds: float
    skipped_files: dict = field(default_factory=dict)


def effective_lr(cfg, env: Env) -> float:
    if cfg.lr > 0:
        return cfg.lr
    return cfg.base_lr * cfg.batch_size * cfg.accum_steps * env.world_size / 256


def fit(task: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, cfg, run_dir, env: Env, *,
        extra_state: Optional[dict] = None, on_epoch_end: Optional[Callable[[int, int], Optional[dict]]] = None
        ) -> TrainResult:
    """Train ``task`` for ``cfg.epochs`` over ``loader``; resumable; returns the final state."""
    run_dir = Path(run_dir)
    accum = cfg.accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size} x --accum-steps {accum} x {env.world_size} processes "
                         f"is larger than the {loader.num_images} training images")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    task.to(env.device)
    model = task
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")

    step, epoch, batch_in_epoch, bad_total = 0, 0, 0, 0
    state = load_latest(run_dir) if cfg.resume else None
    if state is not None:
        check_state_dict(task, state.get("model"), state["_path"])
        task.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        total_steps, bad_total = state["total_steps"], state.get("bad_steps", 0)
        _set_rng_state(state.get("rng"))
        if env.is_main:
            log.info("resumed from %s at epoch %d, step %d", state["_path"], epoch, step)
    elif cfg.resume and env.is_main:
        log.info("no checkpoint in %s: starting from scratch", run_dir)

    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = _schedule(optimizer, cfg, total_steps, min(warmup, total_steps // 2))  # as a resized run does
    metrics = Metrics(run_dir, env, open_tracker(getattr(cfg, "tracker", "none"), run_dir, _plain(vars(cfg)))
                      if env.is_main else None)
    progress = Progress(total_steps, step, env.is_main, cfg.log_every)
    t_start, seen, t_window = time.time(), 0, time.time()
    timed = cfg.time_limit > 0 and state is None
    max_steps_total, t_estimate = total_steps, (t_start, 0)
    bad_in_row, last_loss = 0, float("nan")

    def checkpoint():
        if env.is_main:
            save_checkpoint({
                "format": "mimkit", "version": 1, "kind": getattr(task, "name", type(task).__name__),
                "arch": getattr(task, "arch", {}), "model": task.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "total_steps": total_steps, "bad_steps": bad_total, "rng": _get_rng_state(),
                "config": _plain(vars(cfg)), **(extra_state or {}),
            }, run_dir / "checkpoints" / f"checkpoint-{step:08d}.pt")
            prune_checkpoints(run_dir, cfg.keep_checkpoints)
        if env.distributed:
            dist.barrier()

    task.train()
    with StopRequest(getattr(cfg, "sigterm_grace", 60.0)) as stop:
        while step < total_steps:
            loader.set_epoch(epoch, start_batch=batch_in_epoch)
            window_bad, window_loss = False, 0.0
            for i, (images, labels) in enumerate(loader, start=batch_in_epoch):
                if i >= steps_per_epoch * accum:  # a last partial accumulation window is dropped
                    break
                micro = i % accum
                if micro == 0:
                    schedule.step_update(step)
                    lr_now = optimizer.param_groups[0]["lr"]  # the step's lr (before any re-sizing below)
                    torch.manual_seed((cfg.seed * 7919 + step * 104729 + env.rank) % 2**63)  # dropout, drop path
                sync = micro == accum - 1  # the window's last micro-batch: gradients are averaged, then one update
                with (nullcontext() if sync or not env.distributed else model.no_sync()), autocast(env.device, cfg.precision):
                    loss = forward(images, labels, StepRandom(cfg.seed, step, micro, env))
                    loss = loss["loss"] if isinstance(loss, dict) else loss
                time_up = cfg.time_limit > 0 and time.time() - t_start > cfg.time_limit * 60
                flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                     torch.tensor(float(sync and stop.requested), device=loss.device),
                                     torch.tensor(float(sync and time_up), device=loss.device)])
                if env.distributed:  # all processes skip the same steps and stop after the same one
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                not_finite, stop_now, time_up = (bool(v) for v in flags.tolist())
                if not_finite:
                    window_bad = True
                    optimizer.zero_grad(set_to_none=True)
                else:
                    scaler.scale(loss / accum).backward()
                    window_loss += loss.detach().float() / accum
                if not sync:
                    continue
                # one optimizer step
                batch_in_epoch = i + 1
                seen += images.shape[0] * accum * env.world_size
                if window_bad:
                    bad_total += 1
                    bad_in_row += 1
                    optimizer.zero_grad(set_to_none=True)
                    if env.is_main:
                        log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, bad_in_row)
                    if bad_in_row >= cfg.max_bad_steps:
                        metrics.close()
                        progress.close()
                        raise DivergedError(f"the loss was not finite for {bad_in_row} steps in a row (step {step}); "
                                            f"stopped, the last good checkpoint is kept in {run_dir / 'checkpoints'}")
                else:
                    bad_in_row = 0
                    if cfg.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    last_loss = float(reduce_mean(window_loss, env)) if torch.is_tensor(window_loss) else window_loss
                step += 1
                window_bad, window_loss = False, 0.0

                now = time.time()
                ips = seen / max(now - t_window, 1e-9)
                # --time-limit: size the schedule from the measured speed, early and then every 100 steps and at
                # each epoch's end, so a machine that gets busier or quieter still ends on time with a full cosine
                if timed and step < total_steps and (step in (5, 10, 20, 50) or step % 100 == 0 or
                                                     (i + 1) == steps_per_epoch * accum):
                    per_step = (now - t_estimate[0]) / (step - t_estimate[1])
                    total_steps = _fit_time_limit(cfg, step, max_steps_total, cfg.time_limit * 60 - (now - t_start),
                                                  per_step, env)
                    schedule = _schedule(optimizer, cfg, total_steps, min(warmup, total_steps // 2))
                    t_estimate = (now, step)
                    progress.set_total(total_steps)
                progress.update(step, last_loss, ips, (total_steps - step) * (now - t_start) / max(step, 1))
                if step % cfg.log_every == 0 or step == total_steps:
                    metrics.write(step, loss=last_loss, lr=lr_now, images_per_s=ips,
                                  epoch=epoch)
                    seen, t_window = 0, now
                if stop_now or (stop.requested and not env.distributed):
                    checkpoint()
                    progress.close()
                    metrics.close()
                    raise Preempted(f"stopped by SIGTERM at step {step}; the checkpoint is saved, continue with --resume")
                epoch_ends = i + 1 >= steps_per_epoch * accum or step >= total_steps
                if cfg.save_every and step % cfg.save_every == 0 and not epoch_ends:
                    checkpoint()
                if time_up and step < total_steps:
                    if env.is_main:  # the estimate from the first steps was too hopeful (a busier machine)
                        log.warning("--time-limit reached at step %d of %d: stopping early", step, total_steps)
                    total_steps = step
                if step >= total_steps:
                    break
            # the epoch is over: its batches are done, the run is, or the loader ran out early (a batch of only
            # unreadable files yields nothing); never start the same epoch again, which could loop forever
            if batch_in_epoch < steps_per_epoch * accum and step < total_steps and env.is_main:
                log.warning("epoch %d ended after %d of %d batches", epoch, batch_in_epoch, steps_per_epoch * accum)
            metrics.write(step, epoch_time_s=time.time() - t_start, epoch=epoch)
            epoch_done = epoch
            epoch, batch_in_epoch = epoch + 1, 0
            checkpoint()
            if on_epoch_end is not None and env.is_main:
                values = on_epoch_end(epoch_done, step)  # e.g. --eval-every's k-NN top-1 and reconstructions
                if values:
                    metrics.write(step, epoch=epoch_done, **values)
                    progress.show(**{k: v for k, v in values.items() if isinstance(v, float)})
    progress.close()
    metrics.close()
    return TrainResult(step, epoch, last_loss, bad_total, time.time() - t_start, dict(getattr(loader, "skipped", {})))


def _schedule(optimizer, cfg, total_steps: int, warmup: int):
    # timm's cosine schedule, stepped per iteration; it honours per-group lr_scale (layer decay)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"]
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=cfg.min_lr,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def _fit_time_limit(cfg, step: int, max_total: int, seconds_left: float, per_step: float, env: Env) -> int:
    """Total steps that end the run within ``--time-limit`` at ``per_step`` seconds a step (never more than asked)."""
    per_step = torch.tensor(per_step)
    if env.distributed:  # every process must agree on the schedule
        dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
    new_total = max(step + 1, min(max_total, step + int(seconds_left / float(per_step))))
    if env.is_main:
        log.info("--time-limit %g min: %.2f s/step measured, the run is sized to %d steps", cfg.time_limit,
                 float(per_step), new_total)
    return new_total


def _get_rng_state() -> dict:
    _, keys, pos, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def _set_rng_state(state: Optional[dict]):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def _plain(d: dict) -> dict:
    """Options as plain values (at any depth), so the checkpoint loads with weights_only."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return {k: plain(v) for k, v in d.items()}
