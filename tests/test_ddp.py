"""DDP on 2 CPU processes (gloo) trains exactly as one process on the same global batch: parameters and AdamW's
state after 10 steps past a 1-step warm-up. The test proves it can fail: the same run with gradients summed instead
of averaged (a DDP communication hook, tests/ddp_runner.py) must not pass the comparison."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.checkpoint_files import list_checkpoints, load_checkpoint

RUNNER = Path(__file__).with_name("ddp_runner.py")
ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--data", "builtin", "--model", "vit_micro_patch4_32", "--decoder-dim", "32", "--decoder-depth", "1",
          "--decoder-heads", "2", "--max-steps", "10", "--lr", "2e-3", "--warmup-epochs", "0.02", "--threads", "1",
          "--num-workers", "0", "--figure-every", "0", "--deterministic", "--log-every", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, procs: int, batch: int, sum_grads: bool = False) -> dict:
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                                      "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIMKIT_TEST_SUM_GRADS": "1" if sum_grads else "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, *launcher, str(RUNNER), "pretrain", *COMMON, "--batch-size", str(batch),
                        "--output", str(out)], capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    state = load_checkpoint(list_checkpoints(out)[-1])
    assert state["step"] == 10
    return state


def differences(a: dict, b: dict) -> dict:
    """The largest relative difference of the parameters and of each kind of optimizer state."""
    worst = {"params": 0.0}
    for k in a["model"]:
        worst["params"] = max(worst["params"], float((a["model"][k] - b["model"][k]).abs().max()))
    for i, s in a["optimizer"]["state"].items():
        for name, t in s.items():
            if torch.is_tensor(t) and t.is_floating_point() and t.ndim:
                u = b["optimizer"]["state"][i][name]
                rel = float((t - u).abs().max() / t.abs().max().clamp_min(1e-12))
                worst[name] = max(worst.get(name, 0.0), rel)
    return worst


@pytest.mark.slow
def test_two_processes_train_as_one_and_summed_gradients_are_caught(tmp_path):
    """2 x 8 images (gloo) against 1 x 16: after 10 steps AdamW's exp_avg / exp_avg_sq agree to 1e-4 relative
    (measured ~1e-6) and the parameters to 1e-3 (measured 1.5e-4: Adam divides by sqrt(v), which magnifies
    round-off on weights whose gradients are near 0, so the moments are the sharp comparison). Summing instead of averaging the gradients doubles exp_avg (and quadruples
    exp_avg_sq), which this test's own mutation run shows it catches."""
    one = run(tmp_path / "one", 1, 16)
    two = run(tmp_path / "two", 2, 8)
    d = differences(one, two)
    print(f"[ddp] largest differences, 2 processes vs 1: {d}")
    assert d["params"] < 1e-3 and d["exp_avg"] < 1e-4 and d["exp_avg_sq"] < 1e-4, d
    summed = differences(one, run(tmp_path / "summed", 2, 8, sum_grads=True))
    print(f"[ddp] with summed gradients: {summed}")
    assert summed["exp_avg"] > 0.5 and summed["exp_avg_sq"] > 1.0, summed
