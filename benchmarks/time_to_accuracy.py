"""Time to a good encoder: k-NN and linear-probe top-1 against pretraining minutes, read from run folders.

    python benchmarks/time_to_accuracy.py runs/tta-5 runs/tta-10 runs/tta-20 runs/cifar10-archive \
        --evals runs --out docs/figures/cifar10-time-to-accuracy.png

Each pretraining run is a point: its minutes are the training loop's wall time (the engine's `epoch_time_s`
in metrics.jsonl, the time since the loop started at each epoch's end, at the last one: start-up and data
opening excluded, in-loop `--eval-every` included),
its steps and images from the same file, its precision as asked (config.yaml) and chosen (run.json). Its
scores are the `mimkit knn` and `mimkit linprobe` results found under `--evals` whose `checkpoint` is that run;
results of `--random-init` evaluations of any of the runs give the 0-minute point (the untrained encoder).
Prints a Markdown table and plots top-1 against minutes, one line per asked precision and evaluation.
"""
import argparse
import json
from pathlib import Path

import yaml


def _jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pretraining(run: Path) -> dict:
    """minutes, steps, images, batch and precision of one pretraining run folder."""
    lines = _jsonl(run / "metrics.jsonl")
    seconds = max(m["epoch_time_s"] for m in lines if "epoch_time_s" in m)  # since the loop started
    steps = max(m["step"] for m in lines)
    config = yaml.safe_load((run / "config.yaml").read_text())
    info = json.loads((run / "run.json").read_text())
    batch = int(config.get("batch_size", 0))
    asked = config.get("precision", "?")
    chosen = info.get("precision") or ("not recorded" if asked == "auto" else asked)  # run.json has it since 11-30
    return {"run": str(run), "minutes": seconds / 60, "steps": steps, "images": steps * batch,
            "precision": asked if chosen == asked else f"{asked} -> {chosen}", "asked": asked}


def evaluations(roots) -> list:
    """Every knn / linprobe results.json under ``roots``."""
    found = []
    for root in roots:
        for f in sorted(Path(root).glob("*/results.json")):
            r = json.loads(f.read_text())
            if r.get("command") in ("knn", "linprobe"):
                found.append(r)
    return found


def table(runs, evals) -> list:
    """Rows (label, minutes, steps, images, asked precision, asked -> chosen, k-NN top-1, probe top-1), the
    untrained encoder first."""
    def score(command, checkpoint, random_init):
        hits = [e["top1"] for e in evals if e["command"] == command and bool(e.get("random_init")) == random_init
                and (random_init or Path(e["checkpoint"]) == Path(checkpoint))]
        return hits[-1] if hits else None

    names = {str(Path(r["run"])) for r in runs}
    untrained = [e for e in evals if e.get("random_init") and str(Path(e["checkpoint"])) in names]
    rows = []
    if untrained:
        rows.append(("untrained", 0.0, 0, 0, "-", "-", score("knn", None, True), score("linprobe", None, True)))
    for r in sorted(runs, key=lambda r: (r["asked"], r["minutes"])):
        rows.append((Path(r["run"]).name, r["minutes"], r["steps"], r["images"], r["asked"], r["precision"],
                     score("knn", r["run"], False), score("linprobe", r["run"], False)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pretraining run folders")
    ap.add_argument("--evals", nargs="+", type=Path, default=[Path("runs")],
                    help="folders holding knn / linprobe result folders")
    ap.add_argument("--out", type=Path, help="PNG of the curves")
    args = ap.parse_args()
    runs = [pretraining(r) for r in args.runs]
    rows = table(runs, evaluations(args.evals))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print("| run | pretraining minutes | steps | images | precision | k-NN top-1 | linear probe top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, minutes, steps, images, _, precision, knn, probe in rows:
        print(f"| {name} | {minutes:.1f} | {steps} | {images} | {precision} | {fmt(knn)} | {fmt(probe)} |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from mimkit.files import write_via
        fig, ax = plt.subplots(figsize=(5, 3.2))
        start = [r for r in rows if r[0] == "untrained"]
        for precision in sorted({r[4] for r in rows if r[0] != "untrained"}):
            points = start + [r for r in rows if r[4] == precision]
            for col, label, style in ((7, "linear probe", "o-"), (6, "k-NN", "s--")):
                xy = [(r[1], r[col]) for r in points if r[col] is not None]
                if xy:
                    ax.plot(*zip(*xy), style, label=f"{label}, {precision}")
        ax.set_xlabel("pretraining minutes")
        ax.set_ylabel("top-1 on the held-out 5k (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_via(args.out, lambda f: fig.savefig(f, format="png", dpi=120))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
