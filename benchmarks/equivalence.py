"""Bit-identical training across a refactor: seeded 30-step ``mimkit pretrain`` runs, digested.

Each run is fp32 on the CPU with ``--deterministic`` on the embedded sample; the digest of a run is the sha256 of
its final checkpoint's weights and, separately, its optimizer state (tensors by name, dtype, shape and bytes; plain
values by their repr), so the run id, the time and the recorded config do not count. Run it on two commits and
compare the JSON files::

    PYTHONPATH=. python benchmarks/equivalence.py --output /tmp/eq.json \
        --compare benchmarks/results/equivalence-base.json

(about a minute on one core). ``--compare`` exits 1 when any digest differs and names the runs.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

COMMON = ["--model", "vit_micro_patch4_32", "--data", "builtin", "--device", "cpu", "--precision", "fp32",
          "--deterministic", "--seed", "0", "--max-steps", "30", "--batch-size", "16", "--epochs", "100",
          "--num-workers", "0", "--figure-every", "0", "--log-every", "10"]

# name -> the run's own flags (MAE's paper defaults unless given; 3-channel data gets ImageNet's mean and std)
RUNS = {
    "mae": ["--objective", "mae"],
    "mae-accum-clip-save": ["--objective", "mae", "--accum-steps", "2", "--clip-grad", "1", "--save-every", "7"],
    "simmim": ["--objective", "simmim"],
    "vit_mpp": ["--objective", "vit_mpp"],
    "igpt": ["--objective", "igpt", "--objective-args", "{palette_size: 16, palette_images: 64, kmeans_iters: 5}"],
}


def digest(value, h) -> None:
    """Feed ``value`` (nested dicts, lists, tensors, plain values) into ``h`` in a canonical order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            digest(value[k], h)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def sha(value) -> str:
    h = hashlib.sha256()
    digest(value, h)
    return h.hexdigest()


def run(name: str, flags: list, root: Path) -> dict:
    out = root / name
    cmd = [sys.executable, "-c", "import sys; from mimkit.cli import main; sys.exit(main())", "pretrain",
           *COMMON, *flags, "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{name}: pretrain failed:\n{done.stderr[-3000:]}")
    last = sorted((out / "checkpoints").glob("checkpoint-*.pt"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=True)
    return {"checkpoint": last.name, "step": state["step"], "weights": sha(state["model"]),
            "optimizer": sha(state["optimizer"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="the JSON file of digests to write")
    p.add_argument("--compare", help="a JSON file of digests to compare with (exit 1 when any differs)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            results[name] = run(name, RUNS[name], Path(tmp))
            print(f"{name:22s} step {results[name]['step']:3d} weights {results[name]['weights'][:16]} "
                  f"optimizer {results[name]['optimizer'][:16]}", flush=True)
    Path(args.output).write_text(json.dumps({"torch": torch.__version__, "runs": results}, indent=1) + "\n")
    if not args.compare:
        return 0
    base = json.loads(Path(args.compare).read_text())["runs"]
    differ = [n for n in results if n not in base or
              (results[n]["weights"], results[n]["optimizer"]) != (base[n]["weights"], base[n]["optimizer"])]
    print("all equal to " + args.compare if not differ else f"DIFFERENT from {args.compare}: {', '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
