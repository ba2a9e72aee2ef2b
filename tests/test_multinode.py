"""Two "nodes" of one process each on this machine (torchrun --nnodes 2, c10d rendezvous on localhost) pretraining
from tar shards: the same parameters as one process on the same global batches; a rank that dies stops the other
with a clear message instead of a hang."""
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers_faults import TINY, cli_command, child_env, free_port, noise_folder

pytestmark = pytest.mark.slow
pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mimkit.data.shards import write_shards
    root = noise_folder(tmp_path_factory.mktemp("imgs"), classes=2, per_class=20)
    return write_shards(root, tmp_path_factory.mktemp("shards"), shard_size=6)


def _two_nodes(opts, timeout=150):
    """Start both torchrun agents (node 0 hosts the rendezvous store); return their (returncode, output)."""
    port = free_port()
    procs = []
    for node in range(2):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mimkit-two-nodes",
                "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--max-restarts", "0",
                *cli_command("pretrain", opts)[1:]]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=child_env(), start_new_session=True))
    outs = []
    for p in procs:
        try:
            outs.append((p.wait(timeout=timeout), p.stdout.read()))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, 9)
            pytest.fail("a torchrun node hung")
    return outs


def test_two_nodes_match_one_process(shards, tmp_path):
    """Two nodes x (batch 4, one read stream each) end with the parameters of one process x (batch 8, two
    streams), up to fp32 reduction order. Giving each rank the same streams (ignoring the rank) fails this, and so
    does summing the gradients over the nodes instead of averaging them."""
    from mimkit.checkpoints import load_latest
    from mimkit.cli import main
    base = {**TINY, "data": shards, "epochs": 2, "shard_streams": 2, "output": str(tmp_path / "one"),
            "precision": "fp32", "device": "cpu"}  # fp32 tolerances below, whatever 'auto' means on this machine
    for key in ("threads", "log_every"):
        base.pop(key)
    t0 = time.time()
    for (rc, out) in _two_nodes({**base, "batch_size": 4, "output": str(tmp_path / "two")}):
        assert rc == 0, out[-3000:]
    t_two = time.time() - t0
    args = [a for k, v in {**base, "batch_size": 8}.items()
            for a in ((f"--{k.replace('_', '-')}",) if v is True else (f"--no-{k.replace('_', '-')}",) if v is False
                      else (f"--{k.replace('_', '-')}", str(v)))]
    assert main(["pretrain", *args]) == 0
    one, two = load_latest(tmp_path / "one"), load_latest(tmp_path / "two")
    assert one["step"] == two["step"] > 0
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5, rtol=1e-4), k
    print(f"[multinode] two nodes: {t_two:.0f} s for {two['step']} steps")


def test_a_dead_rank_stops_the_other_node(shards, tmp_path):
    """Rank 1 (node 1) dies at its 2nd step: both agents end, non-zero, within the test's timeout, and rank 0
    names the lost peer in one line (without the CLI's translation of the failed collective, this fails)."""
    from helpers_faults import register_faulty  # noqa: F401  (the faulty objective is registered in the child)
    opts = {**TINY, "data": shards, "epochs": 1, "batch_size": 4, "shard_streams": 2, "dist_timeout": 30,
            "output": str(tmp_path / "run"), "objective": "faulty", "objective_args": {"raise_at": 2, "raise_rank": 1}}
    t0 = time.time()
    (rc0, out0), (rc1, out1) = _two_nodes(opts, timeout=120)
    assert rc0 != 0 and rc1 != 0
    assert "injected failure on rank 1" in out0 + out1
    assert "mimkit pretrain: error: another process of this job stopped" in out0, out0[-3000:]
    print(f"[multinode] a dead rank ended both nodes in {time.time() - t0:.0f} s")
