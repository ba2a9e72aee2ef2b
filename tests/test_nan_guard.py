"""The non-finite loss guard where it is easiest to get wrong: inside an accumulation window, and under DDP when
only one process sees the NaN."""
import sys
import time

import pytest
import torch

from mimkit.checkpoint_files import list_checkpoints, load_checkpoint

from helpers_faults import ROOT, TINY, cli_command, fit_tiny, free_port, run_logged, tiny_cfg

torch.set_num_threads(1)


def test_a_nan_micro_batch_skips_its_whole_accumulation_window(tmp_path):
    """accum 2: micro-batch 3 (the first half of step 2's window) is NaN. The whole window is skipped (no update
    from its finite second half), one bad step is counted, and the other 3 steps update: the optimizer made 3
    steps. Dropping the window's flag (updating with the finite half alone) fails this with 4 updates."""
    result, task, opt = fit_tiny(tiny_cfg(tmp_path, accum_steps=2), nan_at=[3])
    assert result.step == 4 and result.bad_steps == 1
    assert {int(s["step"]) for s in opt.state.values()} == {3}
    assert all(torch.isfinite(p).all() for p in task.parameters())


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """2 processes (gloo), rank 1's loss is NaN at its 3rd forward only: both ranks skip that step together (the
    flags are all-reduced), the run finishes its 6 steps without a hang and counts 1 bad step, 5 updates.
    Without the all-reduce rank 0 updates alone and the collectives mismatch (a hang, cut by --dist-timeout)."""
    opts = {**TINY, "batch_size": 8, "epochs": 1, "max_steps": 6, "output": str(tmp_path / "run"), "objective": "faulty",
            "objective_args": {"nan_at": [3], "nan_rank": 1}, "dist_timeout": 60, "cache": "on"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli_command("pretrain", opts)[1:]]
    t0 = time.time()
    done = run_logged(argv, timeout=240, cwd=str(ROOT))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 6 and state["bad_steps"] == 1
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}
    print(f"[faults] NaN on one rank: skipped on both, {time.time() - t0:.0f} s")
