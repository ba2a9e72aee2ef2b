"""DDP on 2 CPU processes (gloo) trains exactly as one process on the same global batch: parameters and AdamW's
state after 10 steps past a 1-step warm-up, in fp32 and in bf16 (each with its own tolerance), on the CPU whatever
the machine has. The test proves it can fail: the same run with gradients summed instead of averaged (a DDP
communication hook, tests/ddp_runner.py) must not pass the comparison, in either precision."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_faults import free_port
from mimkit.checkpoint_files import list_checkpoints, load_checkpoint

RUNNER = Path(__file__).with_name("ddp_runner.py")
ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--data", "builtin", "--model", "vit_micro_patch4_32", "--decoder-dim", "32", "--decoder-depth", "1",
          "--decoder-heads", "2", "--max-steps", "10", "--lr", "2e-3", "--warmup-epochs", "0.02", "--threads", "1",
          "--num-workers", "0", "--figure-every", "0", "--deterministic", "--log-every", "5", "--device", "cpu"]


def run(out: Path, procs: int, batch: int, precision: str, sum_grads: bool = False) -> dict:
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                                      "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIMKIT_TEST_SUM_GRADS": "1" if sum_grads else "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, *launcher, str(RUNNER), "pretrain", *COMMON, "--batch-size", str(batch),
                        "--precision", precision, "--output", str(out)], capture_output=True, text=True, timeout=400, env=env)
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


# The largest allowed differences, 2 processes against 1 (relative for the moments, absolute for the parameters).
# fp32: AdamW's moments agree to ~1e-6 (measured), bound 1e-4; the parameters to 1.5e-4 (measured), bound 1e-3:
# Adam divides by sqrt(v), which magnifies round-off on weights whose gradients are near 0, so the moments are the
# sharp comparison.
# bf16: autocast rounds every matmul's inputs to bf16's 8-bit mantissa (unit round-off 2^-8 = 0.39%); the two runs
# split the batch differently, so their matmuls round different partial sums: the moments differ by a few units
# of round-off (0.33% and 0.71% measured on an AMX CPU), bound 4% (10 units); the parameters move at most
# lr x steps = 0.02 in 10 Adam steps and differed by 0.0083, bound 0.015. Summed gradients double exp_avg (a
# relative difference of 1.0) and quadruple exp_avg_sq (3.0): far outside either bound.
BOUNDS = {"fp32": {"params": 1e-3, "exp_avg": 1e-4, "exp_avg_sq": 1e-4},
          "bf16": {"params": 0.015, "exp_avg": 0.04, "exp_avg_sq": 0.04}}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_processes_train_as_one_and_summed_gradients_are_caught(tmp_path, precision):
    """2 x 8 images (gloo) against 1 x 16, 10 steps, within BOUNDS[precision]; summing instead of averaging the
    gradients doubles exp_avg (and quadruples exp_avg_sq), which this test's own mutation run shows it catches."""
    bound = BOUNDS[precision]
    one = run(tmp_path / "one", 1, 16, precision)
    two = run(tmp_path / "two", 2, 8, precision)
    d = differences(one, two)
    print(f"[ddp] {precision}: largest differences, 2 processes vs 1: {d}")
    assert all(d[k] < bound[k] for k in bound), (d, bound)
    summed = differences(one, run(tmp_path / "summed", 2, 8, precision, sum_grads=True))
    print(f"[ddp] {precision}: with summed gradients: {summed}")
    assert summed["exp_avg"] > 0.5 and summed["exp_avg_sq"] > 1.0, summed
