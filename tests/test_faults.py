"""Faults during training: kills, preemption, non-finite losses, a full disk, a crashing rank.

Nothing is lost: every committed checkpoint verifies, a damaged newest one falls back to the one before, and a
run killed at random points (also mid-write) and resumed ends with bit-identical parameters.
"""
import errno
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimkit.checkpoint_files import list_checkpoints, load_checkpoint, load_latest, prune_checkpoints, save_checkpoint
from mimkit.errors import CheckpointError, DivergedError, Preempted

from helpers_faults import (ROOT, TINY, child_env, cli_command, fit_tiny, free_port, run_logged, tiny_cfg)

torch.set_num_threads(1)
SEED = int(os.environ.get("MIMKIT_FAULT_SEED", random.SystemRandom().randrange(10**6)))
COUNTS = {}  # what the kill tests survived; printed (pytest -s) for the closing note


def _report(name, n):
    COUNTS[name] = COUNTS.get(name, 0) + n
    print(f"[faults] {name}: {COUNTS[name]} (seed {SEED}; rerun with MIMKIT_FAULT_SEED={SEED})")


def _equal_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# checkpoint files --------------------------------------------------------------------------------------------
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        save_checkpoint({"model": {"w": torch.full((1000,), float(step))}, "step": step}, d / f"checkpoint-{step:08d}.pt")
    # damage the newest three in three ways: truncated, one flipped byte, and garbage with no sidecar
    p8, p6, p4 = (d / f"checkpoint-{s:08d}.pt" for s in (8, 6, 4))
    p8.write_bytes(p8.read_bytes()[:-100])
    data = bytearray(p6.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p6.write_bytes(bytes(data))
    p4.write_bytes(os.urandom(300))
    p4.with_name(p4.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        state = load_latest(tmp_path)
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.full((1000,), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert "checkpoint-00000008.pt is damaged (checksum mismatch)" in warnings[0]
    assert "checkpoint-00000006.pt is damaged" in warnings[1]
    assert "checkpoint-00000004.pt" in warnings[2] and "falling back" in warnings[2]
    for p in (p8, p6, p4):
        with pytest.raises(CheckpointError, match=p.name):
            load_checkpoint(p)


def test_keep_last_n_and_leftovers_of_a_killed_writer_are_removed(tmp_path):
    d = tmp_path / "checkpoints"
    for step in range(1, 7):
        save_checkpoint({"step": step}, d / f"checkpoint-{step:08d}.pt")
        prune_checkpoints(tmp_path, 3)
    (d / ".checkpoint-00000007.pt.tmp123").write_bytes(b"partial")
    (d / "checkpoint-00000007.pt.sha256").write_text("0" * 64)  # sidecar whose checkpoint never landed
    prune_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in d.iterdir()) == [f"checkpoint-{s:08d}.pt{x}" for s in (4, 5, 6) for x in ("", ".sha256")]
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [4, 5, 6]


def test_overwriting_a_checkpoint_never_pairs_it_with_a_wrong_checksum(tmp_path, monkeypatch):
    """The same step saved twice (a run resumed from an older checkpoint reaches it again): the old sidecar goes
    before the rename, so a kill between the two leaves whole bytes, never bytes beside another file's hash."""
    import mimkit.checkpoint_files as cio
    path = tmp_path / "checkpoints" / "checkpoint-00000004.pt"
    save_checkpoint({"rev": 1, "w": torch.zeros(10)}, path)
    seen = []
    real_replace = os.replace

    def watch(src, dst):  # at each rename, the files in place must load and verify
        if Path(dst) == path:
            seen.append(load_checkpoint(path)["rev"])
        real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", watch)
    save_checkpoint({"rev": 2, "w": torch.ones(10)}, path)
    monkeypatch.setattr(cio.os, "replace", real_replace)
    assert seen == [1] and load_checkpoint(path)["rev"] == 2


def test_a_checkpoint_that_would_not_load_back_is_refused_before_writing(tmp_path):
    import numpy as np
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\['acc'\].*numpy"):
        save_checkpoint({"model": {}, "extra": {"acc": np.float64(0.5)}}, tmp_path / "checkpoint-00000001.pt")
    assert not (tmp_path / "checkpoint-00000001.pt").exists()


# SIGKILL while checkpoints are written ---------------------------------------------------------------------
WRITER = """
import sys, torch
from pathlib import Path
from mimkit.checkpoint_files import load_latest, prune_checkpoints, save_checkpoint
run = Path(sys.argv[1])
state = load_latest(run)
step = state["step"] if state else 0
print("ready", flush=True)
while True:  # checkpoints forever, each twice (a new file, then an overwrite), resuming from the newest
    step += 1
    for rev in (0, 1):
        save_checkpoint({"model": {"w": torch.full((1_000_000,), float(step))}, "step": step, "rev": rev},
                        run / "checkpoints" / f"checkpoint-{step:08d}.pt")
    prune_checkpoints(run, 2)
"""


def _writing(ckpt_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` has a checkpoint's temporary file in place (left behind if it was killed there)."""
    return ckpt_dir.is_dir() and any(n.endswith(f".pt.tmp{pid}") for n in os.listdir(ckpt_dir))


def test_sigkill_during_checkpoint_writes_never_leaves_a_damaged_checkpoint(tmp_path):
    """A writer process is SIGKILLed at random moments, half of them as soon as a write is seen in progress;
    after each kill every committed checkpoint verifies and holds its own step, and nothing committed is lost."""
    rng = random.Random(SEED)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    kills, mid_write, last = 0, 0, 0
    while kills < 12 or mid_write < 4:
        assert kills < 40, f"could not hit a write in progress ({mid_write} of {kills} kills did)"
        # a fresh interpreter (spawned, not forked: a fork of pytest's process inherits its threads and state)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], env=child_env(), stdout=subprocess.PIPE,
                                 text=True)
        pid = child.pid
        assert child.stdout.readline().strip() == "ready"  # imports done: the delays below count from here
        want_write, delay = kills % 2 == 0, rng.uniform(0.0, 0.3)
        t0 = time.time()
        while True:
            if want_write and _writing(ckpts, pid):
                break
            if not want_write and time.time() - t0 >= delay:
                break
            if time.time() - t0 > 30:
                child.kill()
                child.wait()
                raise AssertionError("the writer made no progress in 30 s")
            time.sleep(0.0002)
        child.kill()
        assert child.wait() == -signal.SIGKILL
        child.stdout.close()
        kills, mid_write = kills + 1, mid_write + _writing(ckpts, pid)
        for p in list_checkpoints(run):
            w = load_checkpoint(p)["model"]["w"]  # verifies the checksum; raises if damaged
            assert torch.equal(w, torch.full((1_000_000,), float(int(p.stem.split("-")[1]))))
        state = load_latest(run)
        newest = state["step"] if state else 0
        assert newest >= last, "a committed checkpoint was lost"
        last = newest
    assert last > 0
    _report("checkpoint writers killed (SIGKILL)", kills)
    _report("of them in the middle of a write", mid_write)


# the engine, in-process -----------------------------------------------------------------------------------
def test_sigterm_checkpoints_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    full, _, _ = fit_tiny(tiny_cfg(tmp_path / "a"))
    cfg = tiny_cfg(tmp_path / "b", sigterm_grace=30.0)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 3"):
        fit_tiny(cfg, sigterm_at=3)
    assert signal.alarm(0) == 0, "the grace alarm must be cancelled once the checkpoint is written"
    assert signal.getsignal(signal.SIGTERM) == handler
    assert load_latest(cfg.output)["step"] == 3
    resumed, _, _ = fit_tiny(tiny_cfg(tmp_path / "b", resume=True))
    assert resumed.step == full.step == 8
    a, b = load_latest(tmp_path / "a" / "run"), load_latest(cfg.output)
    _equal_states(a["model"], b["model"])
    for i in a["optimizer"]["state"]:  # AdamW's moments and step counts too
        _equal_states(a["optimizer"]["state"][i], b["optimizer"]["state"][i])


def test_non_finite_losses_are_skipped_and_counted(tmp_path):
    result, task, opt = fit_tiny(tiny_cfg(tmp_path), nan_at=[2, 5], inf_at=[3])
    assert result.step == 8 and result.bad_steps == 3
    assert all(torch.isfinite(p).all() for p in task.parameters())
    # a skipped step does not move the optimizer: 8 steps, 5 updates
    assert {int(s["step"]) for s in opt.state.values()} == {5}
    assert load_latest(tiny_cfg(tmp_path).output)["bad_steps"] == 3


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path, max_bad_steps=3, save_every=1, keep_checkpoints=5)
    with caplog.at_level(logging.WARNING, logger="mimkit"), \
            pytest.raises(DivergedError, match=r"not finite for 3 steps in a row.*last good checkpoint is kept"):
        fit_tiny(cfg, nan_from=5)
    assert sum("non-finite loss" in r.getMessage() for r in caplog.records) == 3
    states = {load_checkpoint(p)["step"]: load_checkpoint(p) for p in list_checkpoints(cfg.output)}
    assert sorted(states) == [2, 3, 4, 5, 6]  # the steps with NaN losses changed nothing
    _equal_states(states[4]["model"], states[6]["model"])
    assert all(torch.isfinite(t).all() for t in states[6]["model"].values() if t.is_floating_point())


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import builtins
    import mimkit.checkpoint_files as cio
    writes = {"n": 0}

    class FullDisk:  # writes half of what it is given, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = builtins.open(file, mode, *a, **k)
        if ".pt.tmp" in str(file):
            writes["n"] += 1
            if writes["n"] > 1:  # the first checkpoint fits, the disk is full from the second on
                return FullDisk(f)
        return f

    import mimkit.files as mfiles
    monkeypatch.setattr(mfiles, "open", fake_open, raising=False)
    cfg = tiny_cfg(tmp_path, save_every=2, epochs=1)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*checkpoint-00000004\.pt: "
                                              r"No space left on device"):
        fit_tiny(cfg)
    names = sorted(os.listdir(Path(cfg.output) / "checkpoints"))
    assert names == ["checkpoint-00000002.pt", "checkpoint-00000002.pt.sha256"]  # no partial file, no orphan
    assert load_latest(cfg.output)["step"] == 2
    # an overwrite that fails leaves the old bytes and their checksum
    path = Path(cfg.output) / "checkpoints" / "checkpoint-00000002.pt"
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"step": 99}, path)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 2


def test_resume_rejects_a_checkpoint_of_another_model_naming_the_tensor(tmp_path):
    fit_tiny(tiny_cfg(tmp_path, epochs=1))
    with pytest.raises(CheckpointError, match=r"checkpoint-00000004\.pt: tensor 'model\.mask_token' has shape "
                                              r"\(1, 1, 32\), expected \(1, 1, 48\)"):
        fit_tiny(tiny_cfg(tmp_path, epochs=2, resume=True, decoder_dim=48, decoder_heads=2))


# real processes ----------------------------------------------------------------------------------------------
def test_sigterm_grace_ends_a_hung_run(tmp_path):
    """After SIGTERM the run has --sigterm-grace seconds; a step that hangs does not keep it alive."""
    import subprocess
    opts = {**TINY, "batch_size": 32, "epochs": 1, "output": str(tmp_path / "run"), "objective": "faulty",
            "objective_args": {"hang_at": 4}, "sigterm_grace": 2, "cache": "on"}
    proc = subprocess.Popen(cli_command("pretrain", opts), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        metrics = tmp_path / "run" / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None and \
                not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)  # now inside the hung step
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGALRM, proc.stderr.read()[-2000:]
    assert 1.5 <= waited < 10, waited


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.slow
def test_kill_and_resume_a_real_pretrain_ends_bit_identical(tmp_path):
    """``mimkit pretrain`` killed (SIGKILL) at random points, at least once in the middle of a checkpoint write,
    and preempted once (SIGTERM), each time resumed with the same command: it ends with the uninterrupted
    run's parameters and optimizer state, bit for bit."""
    import subprocess
    rng = random.Random(SEED)
    steps = 40  # 28 steps an epoch: the run crosses an epoch boundary
    base = {**TINY, "batch_size": 32, "epochs": 2, "max_steps": steps, "save_every": 2, "keep_checkpoints": 2,
            "cache": "on", "log_every": 1}
    ref = tmp_path / "reference"
    done = run_logged(cli_command("pretrain", {**base, "output": str(ref)}), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    cmd = cli_command("pretrain", {**base, "output": str(run), "resume": True})
    ckpts, metrics = run / "checkpoints", run / "metrics.jsonl"
    kills, mid_write, sigterms = 0, 0, 0
    plan = ["random", "write", "random", "sigterm", "random", "write", "random", "random"]
    for n, what in enumerate(plan):
        log = tmp_path / f"segment{n}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        try:
            n0, t_end = _lines(metrics), time.time() + 120
            # where to stop it: a random number (0-3) of new steps, then a random fraction of a step; or the
            # first checkpoint write ('write'); or after two new steps with SIGTERM ('sigterm')
            new_steps = {"random": rng.randint(0, 3), "write": 0, "sigterm": 2}[what]
            jitter = rng.uniform(0.0, 0.3) if what == "random" else 0.0
            while time.time() < t_end and proc.poll() is None:
                if what == "write":
                    if _writing(ckpts, proc.pid):
                        break
                    time.sleep(0.0003)
                    continue
                if _lines(metrics) >= n0 + new_steps:
                    time.sleep(jitter)
                    break
                time.sleep(0.005)
            assert proc.poll() is None, f"the run ended before interruption {n} ({what}):\n{log.read_text()[-2000:]}"
            if what == "sigterm":
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
                text = log.read_text()
                assert proc.returncode == 143, text[-2000:]
                assert "stopped by SIGTERM" in text and "continue with --resume" in text
                sigterms += 1
            else:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                mid_write += _writing(ckpts, proc.pid)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for p in list_checkpoints(run):
            load_checkpoint(p)  # every committed checkpoint verifies
    done = run_logged(cmd, timeout=300)  # then let it finish
    assert done.returncode == 0, done.stderr[-3000:]
    assert kills >= 5 and mid_write >= 1 and sigterms == 1, (kills, mid_write, sigterms)
    a = load_checkpoint(ref / "checkpoints" / f"checkpoint-{steps:08d}.pt")
    b = load_checkpoint(run / "checkpoints" / f"checkpoint-{steps:08d}.pt")
    _equal_states(a["model"], b["model"])
    for k in a["optimizer"]["state"]:
        _equal_states(a["optimizer"]["state"][k], b["optimizer"]["state"][k])
    _report("pretrain processes killed (SIGKILL) and resumed", kills)
    _report("of them during a checkpoint write", mid_write)
    _report("pretrain processes preempted (SIGTERM) and resumed", sigterms)


@pytest.mark.slow
def test_a_crashing_rank_ends_the_whole_torchrun_job(tmp_path):
    """Under torchrun with 2 CPU processes, rank 1 raising ends the job with that error, without a hang."""
    opts = {**TINY, "batch_size": 8, "epochs": 1, "max_steps": 20, "output": str(tmp_path / "run"),
            "objective": "faulty", "objective_args": {"raise_at": 3, "raise_rank": 1}, "dist_timeout": 30,
            "cache": "on"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli_command("pretrain", opts)[1:]]
    t0 = time.time()
    done = run_logged(argv, timeout=150, cwd=str(ROOT))
    elapsed = time.time() - t0
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "injected failure on rank 1 at call 3" in out, out[-3000:]
    print(f"[faults] torchrun job with a crashing rank ended in {elapsed:.0f} s (rc {done.returncode})")


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Only rank 1 gets SIGTERM: the ranks agree to stop after the same step, rank 0 writes the checkpoint, and
    every rank exits 143 (no mismatched collectives, no hang)."""
    opts = {**TINY, "batch_size": 8, "epochs": 1, "max_steps": 20, "output": str(tmp_path / "run"),
            "objective": "faulty", "objective_args": {"sigterm_at": 3, "sigterm_rank": 1}, "dist_timeout": 30,
            "cache": "on"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli_command("pretrain", opts)[1:]]
    done = run_logged(argv, timeout=150, cwd=str(ROOT))
    out = done.stdout + done.stderr
    assert out.count("stopped by SIGTERM at step 3;") == 2, out[-3000:]
    assert load_latest(tmp_path / "run")["step"] == 3


def test_a_loader_that_runs_out_early_does_not_loop_forever(tmp_path):
    """A batch of only unreadable files yields nothing; the epoch then ends early instead of restarting forever."""
    from helpers_faults import SyntheticLoader

    class Short(SyntheticLoader):
        def __iter__(self):  # the last batch of every epoch is lost
            for b, batch in enumerate(super().__iter__(), start=self.start_batch):
                if b < len(self) - 1:
                    yield batch

    def hang(*_):
        raise AssertionError("the engine kept restarting an epoch the loader had finished")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        result, _, _ = fit_tiny(tiny_cfg(tmp_path), loader=Short(batch_size=8))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert result.step == 8 and result.epoch == 3  # 3 steps an epoch instead of 4


def test_gradient_accumulation_makes_one_update_per_window(tmp_path):
    """--accum-steps 2 on one process: 8 batches an epoch are 4 optimizer steps (not 8), over both epochs."""
    result, _, opt = fit_tiny(tiny_cfg(tmp_path, accum_steps=2, batch_size=4))
    assert (result.step, result.epoch) == (8, 2)
    assert {int(s["step"]) for s in opt.state.values()} == {8}
