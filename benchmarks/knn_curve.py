"""The `--eval-every` k-NN curve of one or more pretraining runs, read back from their TensorBoard logs.

    python benchmarks/knn_curve.py runs/cifar10-archive runs/cifar10-shards --out docs/figures/cifar10-knn-curve.png

Prints each run's (step, epoch, wall minutes, k-NN top-1) as a Markdown table and plots k-NN top-1 against
pretraining minutes. It reads the `knn_top1` scalars TensorBoard shows (not metrics.jsonl), so what it prints is
what a user watching the run in TensorBoard saw.
"""
import argparse
import json
from datetime import datetime
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curve(run: Path):
    """[(step, wall minutes since the run started (run.json), k-NN top-1 %)] of one run."""
    started = json.loads((run / "run.json").read_text())["started"]
    start = datetime.strptime(started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [(e.step, (e.wall_time - start) / 60, e.value) for e in events.Scalars("knn_top1")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="PNG of the curves")
    args = ap.parse_args()
    curves = {run.name: curve(run) for run in args.runs}
    for name, points in curves.items():
        print(f"\n{name}\n\n| step | minutes | k-NN top-1 |\n| --- | --- | --- |")
        for step, minutes, top1 in points:
            print(f"| {step} | {minutes:.1f} | {top1:.2f} |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from mimkit.files import write_via
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, points in curves.items():
            ax.plot([m for _, m, _ in points], [t for _, _, t in points], marker="o", label=name)
        ax.set_xlabel("pretraining wall minutes")
        ax.set_ylabel("k-NN top-1 (%), held-out subset")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        write_via(args.out, lambda f: fig.savefig(f, format="png", dpi=120))
        print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
