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
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from .checkpoint_files import check_state_dict, load_latest, prune_checkpoints, save_checkpoint
from .config import world_size
from .errors import ConfigError, DivergedError, Preempted
from .precision import autocast, device_choice, resolve as resolve_precision
from .rundir import run_id as read_run_id
from .trackers import open_tracker

log = logging.getLogger("mimkit")
# 2: 8-bit RGB input normalised with the run's recorded statistics (1: with ImageNet's; checkpoints.read.as_trained)
CHECKPOINT_VERSION = 2


# processes and devices ---------------------------------------------------------------------------
@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: str = "fp32"  # what --precision resolved to on this device (mimkit.precision.resolve)
    precision_note: str = ""  # why, logged when training starts

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
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
    if want == "cuda":  # one process per visible GPU: two ranks on one GPU would fail inside NCCL, obscurely
        count = torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"LOCAL_RANK {local} but only {count} GPU(s) visible: start one process per GPU "
                              f"(torchrun --nproc-per-node {count})")
        want = f"cuda:{local}"
    device = torch.device(want)
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
    precision, why = resolve_precision(cfg.precision, device)
    note = f"--precision auto: {precision} ({why})" if cfg.precision == "auto" else ""
    native, native_why = device_choice(device)
    if precision == "bf16" and native != "bf16":
        note = f"{note + '; ' if note else ''}bf16 on {device}: {native_why}"
    return Env(device, rank, world, precision, note)


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


def pretrain_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """MAE's AdamW (betas 0.9, 0.95) with timm's parameter groups (no decay on norms, biases, tokens, position
    embeddings); fused: one kernel over all parameters, 3-4x faster than the per-tensor loop on the CPU
    (`mimkit bench`)."""
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=True)


def effective_lr(cfg, env: Env) -> float:
    if cfg.lr > 0:
        return cfg.lr
    return cfg.base_lr * cfg.batch_size * cfg.accum_steps * env.world_size / 256


def fit(task: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, cfg, run_dir, env: Env, *,
        extra_state: Optional[dict] = None, on_epoch_end: Optional[Callable[[int, int], Optional[dict]]] = None,
        on_step: Optional[Callable[[int, int, bool], Optional[dict]]] = None) -> TrainResult:
    """Train ``task`` for ``cfg.epochs`` over ``loader``; resumable; returns the final state. On the main process,
    ``on_epoch_end(epoch, step)`` runs after each epoch's checkpoint and ``on_step(step, steps_per_epoch, last)``
    after each optimizer step and before the first (e.g. --eval-every at fractions of an epoch); values they return
    are written as metrics."""
    run_dir = Path(run_dir)
    if env.is_main:  # commands claim it first (rundir.prepare); a direct caller of fit gets it made here
        run_dir.mkdir(parents=True, exist_ok=True)
    if env.precision_note and env.is_main:  # here, not in setup: a bad input's error stays the only line
        log.info(env.precision_note)
    batches, steps_per_epoch, pos = _plan(cfg, loader, env)  # batches per epoch: whole accumulation windows only
    model, forward, scaler = _wrap(task, cfg, env)
    resumed = _resume(task, optimizer, scaler, pos, run_dir, cfg, env)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = _schedule(optimizer, cfg, pos.total_steps, min(warmup, pos.total_steps // 2))  # as a resized run does
    report = Report(run_dir, pos, cfg, env)
    clock = TimeLimit(cfg.time_limit, pos.total_steps, report.t_start, resizes=not resumed, env=env)
    window = Accumulation(task, model, forward, optimizer, scaler, cfg, env)
    guard = NonFiniteGuard(cfg.max_bad_steps, pos, run_dir, env)
    save = CheckpointWriter(task, optimizer, scaler, pos, cfg, run_dir, env, extra_state)
    last_loss = float("nan")

    task.train()
    with StopRequest(getattr(cfg, "sigterm_grace", 60.0)) as stop, report:
        def watch(last: bool):  # on_step's values (e.g. --eval-every's k-NN), written as metrics
            values = on_step(pos.step, steps_per_epoch, last) if on_step is not None and env.is_main else None
            if values:
                report.epoch_values(pos.step, round(pos.step / steps_per_epoch, 4), values)

        if pos.step == 0:  # where a fresh run starts from
            watch(last=False)
        while pos.step < pos.total_steps:
            loader.set_epoch(pos.epoch, start_batch=pos.batch_in_epoch)
            window.reset()
            for i, (images, labels) in enumerate(loader, start=pos.batch_in_epoch):
                if i >= batches:  # a last partial accumulation window is dropped
                    break
                micro = i % cfg.accum_steps
                sync = micro == cfg.accum_steps - 1  # the window's last micro-batch: gradients averaged, one update
                if micro == 0:
                    lr_now = _start_step(schedule, optimizer, pos.step, cfg.seed, env)
                loss = window.forward(images, labels, StepRandom(cfg.seed, pos.step, micro, env), sync)
                not_finite, stop_now, time_up = _agree(loss, sync and stop.requested, sync and clock.up(), env)
                window.backward(loss, not_finite)
                if not sync:
                    continue
                pos.batch_in_epoch = i + 1
                report.speed.add(images.shape[0] * cfg.accum_steps * env.world_size)
                loss_now = window.update()  # one optimizer step, or None: skipped for a non-finite loss
                guard.check(loss_now)
                last_loss = last_loss if loss_now is None else loss_now
                pos.step += 1

                now = time.time()
                if clock.due(pos.step, pos.total_steps, epoch_end=i + 1 == batches):
                    pos.total_steps = clock.size(pos.step, now)
                    schedule = _schedule(optimizer, cfg, pos.total_steps, min(warmup, pos.total_steps // 2))
                    report.progress.set_total(pos.total_steps)
                report.step(pos, last_loss, lr_now, now)
                if stop_now or (stop.requested and not env.distributed):
                    save()
                    raise Preempted(f"stopped by SIGTERM at step {pos.step}; the checkpoint is saved, "
                                    f"continue with --resume")
                epoch_ends = i + 1 >= batches or pos.step >= pos.total_steps
                if cfg.save_every and pos.step % cfg.save_every == 0 and not epoch_ends:
                    save()
                if time_up:
                    pos.total_steps = clock.stop_at(pos.step, pos.total_steps)
                watch(last=pos.step >= pos.total_steps)
                if pos.step >= pos.total_steps:
                    break
            # the epoch is over: its batches are done, the run is, or the loader ran out early (a batch of only
            # unreadable files yields nothing); never start the same epoch again, which could loop forever
            if pos.batch_in_epoch < batches and pos.step < pos.total_steps and env.is_main:
                log.warning("epoch %d ended after %d of %d batches", pos.epoch, pos.batch_in_epoch, batches)
            report.epoch(pos)
            epoch_done = pos.epoch
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            save()
            if on_epoch_end is not None and env.is_main:
                values = on_epoch_end(epoch_done, pos.step)  # e.g. --eval-every's k-NN top-1 and reconstructions
                if values:
                    report.epoch_values(pos.step, epoch_done, values)
    return TrainResult(pos.step, pos.epoch, last_loss, pos.bad_steps, time.time() - report.t_start,
                       dict(getattr(loader, "skipped", {})))


# the loop's parts ------------------------------------------------------------------------------------------
@dataclass
class Position:
    """Where a run stands; what a checkpoint records and a resume restores."""
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_steps: int = 0


def _plan(cfg, loader, env: Env):
    """(batches per epoch, optimizer steps per epoch, the starting Position) for ``cfg.epochs`` / ``--max-steps``."""
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} x {env.world_size} "
                          f"processes is larger than the {loader.num_images} training images")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch * cfg.accum_steps, steps_per_epoch, Position(total_steps)


def _wrap(task, cfg, env: Env):
    """The task on its device: (the module gradients sync through, what the loop calls, the fp16 loss scaler)."""
    task.to(env.device)
    model = task
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model
    return model, forward, torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")


def _resume(task, optimizer, scaler, pos: Position, run_dir: Path, cfg, env: Env) -> bool:
    """With ``--resume``, restore weights, optimizer, scaler, position and random state from the newest checkpoint."""
    state = load_latest(run_dir) if cfg.resume else None
    if state is None:
        if cfg.resume and env.is_main:
            log.info("no checkpoint in %s: starting from scratch", run_dir)
        return False
    check_state_dict(task, state.get("model"), state["_path"])
    task.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    pos.step, pos.epoch, pos.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    pos.total_steps, pos.bad_steps = state["total_steps"], state.get("bad_steps", 0)
    _set_rng_state(state.get("rng"))
    if env.is_main:
        log.info("resumed from %s at epoch %d, step %d", state["_path"], pos.epoch, pos.step)
    return True


class Accumulation:
    """One optimizer step over ``--accum-steps`` micro-batches: their gradients add up (DDP averages them only on
    the last), a non-finite loss spoils the whole window, and the window ends in one clipped update or a skip."""

    def __init__(self, task, model, forward, optimizer, scaler, cfg, env: Env):
        self.task, self.model, self.forward_fn = task, model, forward
        self.optimizer, self.scaler, self.cfg, self.env = optimizer, scaler, cfg, env
        self.reset()

    def reset(self):
        self.bad, self.loss = False, 0.0

    def forward(self, images, labels, rng: StepRandom, sync: bool) -> torch.Tensor:
        no_sync = nullcontext() if sync or not self.env.distributed else self.model.no_sync()
        with no_sync, autocast(self.env.device, self.env.precision):
            loss = self.forward_fn(images, labels, rng)
            return loss["loss"] if isinstance(loss, dict) else loss

    def backward(self, loss: torch.Tensor, not_finite: bool):
        if not_finite:
            self.bad = True
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
            self.loss += loss.detach().float() / self.cfg.accum_steps

    def update(self) -> Optional[float]:
        """The window's update and its mean loss over all processes; None (no update) if a loss was not finite."""
        loss = None
        if not self.bad:
            if self.cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss = float(reduce_mean(self.loss, self.env))
        self.optimizer.zero_grad(set_to_none=True)
        self.reset()
        return loss


def _agree(loss: torch.Tensor, stop: bool, time_up: bool, env: Env):
    """(loss not finite, stop now, time is up), the same on every process: all skip the same steps and stop after
    the same one."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), torch.tensor(float(stop), device=loss.device),
                         torch.tensor(float(time_up), device=loss.device)])
    if env.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in flags.tolist())


class NonFiniteGuard:
    """A step whose loss is not finite is skipped and counted; ``--max-bad-steps`` of them in a row end the run
    (the last good checkpoint stays)."""

    def __init__(self, max_in_row: int, pos: Position, run_dir: Path, env: Env):
        self.max_in_row, self.pos, self.run_dir, self.env = max_in_row, pos, run_dir, env
        self.in_row = 0

    def check(self, loss: Optional[float]):
        if loss is not None:
            self.in_row = 0
            return
        self.pos.bad_steps += 1
        self.in_row += 1
        if self.env.is_main:
            log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.pos.step, self.in_row)
        if self.in_row >= self.max_in_row:
            raise DivergedError(f"the loss was not finite for {self.in_row} steps in a row (step {self.pos.step}); "
                                f"stopped, the last good checkpoint is kept in {self.run_dir / 'checkpoints'}")


def _start_step(schedule, optimizer, step: int, seed: int, env: Env) -> float:
    """The step's learning rate (before any re-sizing later in the step), and its seed for dropout and drop path."""
    schedule.step_update(step)
    torch.manual_seed((seed * 7919 + step * 104729 + env.rank) % 2**63)
    return optimizer.param_groups[0]["lr"]


class Report:
    """Progress (tqdm or log lines), metrics lines every ``--log-every`` steps and at the end, the speed between
    them; closed when the loop leaves, however it leaves."""

    def __init__(self, run_dir: Path, pos: Position, cfg, env: Env):
        self.metrics = Metrics(run_dir, env, open_tracker(getattr(cfg, "tracker", "none"), run_dir, _plain(vars(cfg)))
                               if env.is_main else None)
        self.progress = Progress(pos.total_steps, pos.step, env.is_main, cfg.log_every)
        self.log_every = cfg.log_every
        self.t_start = time.time()
        self.speed = Throughput(self.t_start)

    def step(self, pos: Position, loss: float, lr: float, now: float):
        ips = self.speed.per_s(now)
        eta_s = (pos.total_steps - pos.step) * (now - self.t_start) / max(pos.step, 1)
        self.progress.update(pos.step, loss, ips, eta_s)
        if pos.step % self.log_every == 0 or pos.step == pos.total_steps:
            self.metrics.write(pos.step, loss=loss, lr=lr, images_per_s=ips, epoch=pos.epoch)
            self.speed.restart(now)

    def epoch(self, pos: Position):
        self.metrics.write(pos.step, epoch_time_s=time.time() - self.t_start, epoch=pos.epoch)

    def epoch_values(self, step: int, epoch: float, values: dict):
        """What a callback returned (e.g. --eval-every's k-NN top-1): written, and numbers shown."""
        self.metrics.write(step, epoch=epoch, **values)
        self.progress.show(**{k: v for k, v in values.items() if isinstance(v, float)})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.close()
        self.metrics.close()


class Throughput:
    """Images per second since the last metrics line."""

    def __init__(self, now: float):
        self.restart(now)

    def restart(self, now: float):
        self.images, self.since = 0, now

    def add(self, images: int):
        self.images += images

    def per_s(self, now: float) -> float:
        return self.images / max(now - self.since, 1e-9)


class TimeLimit:
    """``--time-limit``: the run stops in time, and a fresh run sizes its schedule from the measured speed, early
    and then every 100 steps and at each epoch's end, so a machine that gets busier or quieter still ends on time
    with a full cosine. The sizing is logged when it first happens and when it moves by more than ``NOTE``."""
    SIZE_AT = (5, 10, 20, 50)
    NOTE = 0.05

    def __init__(self, minutes: float, max_total: int, t_start: float, resizes: bool, env: Env):
        self.minutes, self.max_total, self.t_start, self.env = minutes, max_total, t_start, env
        self.resizes = minutes > 0 and resizes
        self.measured_from = (t_start, 0)  # (time, step) the speed is measured from
        self.logged: Optional[int] = None

    def up(self) -> bool:
        return self.minutes > 0 and time.time() - self.t_start > self.minutes * 60

    def stop_at(self, step: int, total: int) -> int:
        """The total once time is up: this step."""
        if step < total and self.env.is_main:  # the estimate from the first steps was too hopeful (a busier machine)
            log.warning("--time-limit reached at step %d of %d: stopping early", step, total)
        return min(step, total)

    def due(self, step: int, total: int, epoch_end: bool) -> bool:
        return self.resizes and step < total and (step in self.SIZE_AT or step % 100 == 0 or epoch_end)

    def size(self, step: int, now: float) -> int:
        """Total steps that end the run within the limit at the speed measured since the last sizing (never more
        than asked); every process agrees on it."""
        per_step = torch.tensor((now - self.measured_from[0]) / (step - self.measured_from[1]))
        if self.env.distributed:
            dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
        seconds_left = self.minutes * 60 - (now - self.t_start)
        total = max(step + 1, min(self.max_total, step + int(seconds_left / float(per_step))))
        self.measured_from = (now, step)
        if self.env.is_main:
            news = self.logged is None or abs(total - self.logged) > self.NOTE * self.logged
            log.log(logging.INFO if news else logging.DEBUG,
                    "--time-limit %g min: %.2f s/step measured, the run is sized to %d steps",
                    self.minutes, float(per_step), total)
            if news:
                self.logged = total
        return total


class CheckpointWriter:
    """``save()`` writes the run's whole state at its current Position (main process), keeps the newest
    ``--keep-checkpoints`` and waits for every process."""

    def __init__(self, task, optimizer, scaler, pos: Position, cfg, run_dir: Path, env: Env,
                 extra_state: Optional[dict]):
        self.task, self.optimizer, self.scaler, self.pos = task, optimizer, scaler, pos
        self.cfg, self.run_dir, self.env, self.extra_state = cfg, run_dir, env, extra_state or {}
        self.run_id = read_run_id(run_dir, create=env.is_main)  # checkpoints record it; pruning removes only this run's

    def __call__(self):
        if self.env.is_main:
            pos = self.pos
            save_checkpoint({
                "format": "mimkit", "version": CHECKPOINT_VERSION,
                "kind": getattr(self.task, "name", type(self.task).__name__),
                "arch": getattr(self.task, "arch", {}), "model": self.task.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": pos.step,
                "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch, "total_steps": pos.total_steps,
                "bad_steps": pos.bad_steps, "rng": _get_rng_state(), "config": _plain(vars(self.cfg)),
                "run_id": self.run_id,
                **self.extra_state,
            }, self.run_dir / "checkpoints" / f"checkpoint-{pos.step:08d}.pt")
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, self.run_id)
        if self.env.distributed:
            dist.barrier()


def _schedule(optimizer, cfg, total_steps: int, warmup: int):
    # timm's cosine schedule, stepped per iteration; it honours per-group lr_scale (layer decay)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"]
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=cfg.min_lr,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


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
