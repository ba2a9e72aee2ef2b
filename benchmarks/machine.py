"""One command for a machine's numbers: what the README's performance and time-to-accuracy sections claim,
measured on the machine this runs on (CPU or GPU), in parts that run alone and resume.

    python benchmarks/machine.py                         # every part, in order (hours on 2 CPU cores)
    python benchmarks/machine.py --parts bench           # one part
    python benchmarks/machine.py --device cuda --parts bench,curve    # benchmarks/gpu.sh: the GPU case

Parts, with what each takes on this project's 2-core CPUs (fp32 on an AVX2 EPYC; bf16 on an AMX Xeon is 1.5-2x
faster in the training steps):
  bench     `mimkit bench tiny32` (base224 too on a GPU), eager and compiled, the precisions `auto` times, the
            profiler's breakdown of the step and the bf16 loss check: ~10 min
  curve     time to a good encoder: the CIFAR-10 recipe for 5, 10 and 20 minutes (on a GPU: the step counts
            those minutes took on the CPU, --curve-steps), each scored by k-NN and a linear probe on 10,000
            training images' features, and the untrained encoder: ~75 min
  finetune  the fine-tuning recipe: the recipe's encoder for 492 steps (the README's 30-minute encoder), fine-tuned
            30 minutes from it and from random init, and its linear probe on all 45k features: ~2 h
Every step is one `mimkit` command whose output folder marks it done: a second call skips finished steps and
resumes a pretraining run that was stopped (--resume). Writes OUT/numbers.json and OUT/numbers.md: the machine
(CPU model and flags, GPU, torch build, date), each figure, and the README's figure beside it only where the
README's came from the same CPU model (benchmarks/reference.json). A benchmark, never part of CI.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from time_to_accuracy import pretraining  # noqa: E402

from mimkit.bench.measure import machine_info  # noqa: E402
from mimkit.files import write_text  # noqa: E402
from mimkit.precision import resolve  # noqa: E402

PARTS = ("bench", "curve", "finetune")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine(device: str) -> dict:
    info = machine_info(torch.device(device))
    flags = set()
    try:
        flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split(":")[1].split()}
    except OSError:
        pass
    info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    info["auto_precision"] = "%s (%s)" % resolve("auto", torch.device(device))
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return info


class Steps:
    """Runs `mimkit` commands, each skipped when its output says it finished."""

    def __init__(self, out: Path, dry: bool):
        self.out, self.dry = out, dry

    def mimkit(self, *argv, output: Path, done: Path):
        if done.exists():
            print(f"[machine] done already: {output}")
            return
        started = (output / "run.json").exists()  # a step stopped part-way: pretraining resumes, the rest start over
        resume = (["--resume"] if argv[0] == "pretrain" else ["--overwrite"]) if started else []
        cmd = [sys.executable, "-m", "mimkit.cli", *map(str, argv), "--output", str(output), *resume]
        print("[machine] " + " ".join(cmd[2:]), flush=True)
        if not self.dry:
            subprocess.run(cmd, check=True)
            if done.suffix == ".done":  # a pretraining run leaves no mark of having finished: this script's own
                write_text(done, time.strftime("%Y-%m-%d %H:%M UTC\n", time.gmtime()))

    def pretrain(self, name: str, *argv) -> Path:
        run = self.out / name
        self.mimkit("pretrain", "--config", "configs/cifar10.yaml", "--data", self.data, "--figure-every", "0",
                    *argv, output=run, done=self.out / f"{name}.done")
        return run

    def evaluate(self, command: str, run: Path, name: str, *argv) -> dict:
        out = self.out / "evals" / name
        self.mimkit(command, "--checkpoint", run, "--data", self.data, *argv, output=out, done=out / "results.json")
        return {} if self.dry else json.loads((out / "results.json").read_text())


def part_bench(s: Steps, device: str) -> dict:
    configs = "tiny32,base224" if device.startswith("cuda") else "tiny32"
    out = s.out / "bench.json"
    if not out.exists():
        cmd = [sys.executable, "-m", "mimkit.cli", "bench", configs, "--precision", "auto", "--compile", "both",
               "--device", device, "--output", str(out)]
        if device.startswith("cuda"):
            cmd += ["--batch-size", "256", "--data", ""]
        print("[machine] " + " ".join(cmd[2:]), flush=True)
        if s.dry:
            return {}
        subprocess.run(cmd, check=True)
    figures = {}
    for r in json.loads(out.read_text())["results"]:
        name = f"bench {r['config']} {r['impl']} {r['precision']}"
        figures[f"{name} images/s"] = round(r["images_per_s"]["median"], 1)
        b = r.get("breakdown") or {}
        if sum(b.values()):
            figures[f"{name} step outside matmuls %"] = round(100 * (1 - b["matmul"] / sum(b.values())), 1)
    return figures


def part_curve(s: Steps, device: str, curve_steps) -> dict:
    figures = {}
    points = [("steps", n) for n in curve_steps] if curve_steps else [("minutes", m) for m in (5, 10, 20)]
    for kind, n in points:
        budget = ["--time-limit", "0", "--max-steps", n] if kind == "steps" else ["--time-limit", n]
        run = s.pretrain(f"curve-{n}{kind[0]}", *budget)
        knn = s.evaluate("knn", run, f"knn-{n}{kind[0]}", "--pool", "mean", "--train-images", 10000)
        probe = s.evaluate("linprobe", run, f"probe-{n}{kind[0]}", "--pool", "mean", "--train-images", 10000, "--lr", 4)
        if not s.dry:
            p = pretraining(run)
            figures[f"curve {n} {kind}: minutes, steps"] = f"{p['minutes']:.1f}, {p['steps']}"
            figures[f"curve {n} {kind}: k-NN top-1"] = knn["top1"]
            figures[f"curve {n} {kind}: probe top-1"] = probe["top1"]
    if points:
        run = s.out / f"curve-{points[0][1]}{points[0][0][0]}"
        knn = s.evaluate("knn", run, "knn-untrained", "--pool", "mean", "--train-images", 10000, "--random-init")
        probe = s.evaluate("linprobe", run, "probe-untrained", "--pool", "mean", "--train-images", 10000, "--lr", 4,
                           "--random-init")
        if not s.dry:
            figures["curve untrained: k-NN top-1"], figures["curve untrained: probe top-1"] = knn["top1"], probe["top1"]
    return figures


def part_finetune(s: Steps, device: str) -> dict:
    run = s.pretrain("encoder-492", "--time-limit", "0", "--max-steps", 492)
    recipe = ["--config", "configs/cifar10-finetune.yaml"]
    tuned = s.evaluate("finetune", run, "finetune", *recipe)
    random = s.evaluate("finetune", run, "finetune-random", *recipe, "--random-init")
    probe = s.evaluate("linprobe", run, "probe-all", "--pool", "mean", "--train-images", 0, "--lr", 4)
    if s.dry:
        return {}
    return {"finetune: encoder minutes, steps": "%.1f, %d" % (pretraining(run)["minutes"], pretraining(run)["steps"]),
            "finetune top-1": tuned["top1"], "finetune --random-init top-1": random["top1"],
            "linear probe (all 45k) top-1": probe["top1"]}


def compare(figures: dict, info: dict) -> list:
    """Rows (figure, here, README's or '', where the README's came from)."""
    ref = json.loads((HERE / "reference.json").read_text())
    rows = []
    for name, value in figures.items():
        same = [r for r in ref["figures"] if r["name"] == name and r["cpu"] == info["cpu"]
                and r.get("precision") in (None, info["auto_precision"].split()[0])]
        rows.append((name, value, same[0]["value"] if same else "", same[0]["source"] if same else ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--data", default="../shared/data/cifar10-train.tar.gz", help="CIFAR-10 folder or .tar.gz")
    ap.add_argument("--out", type=Path, default=Path("runs/machine"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--curve-steps", default="", help="the curve by step counts (the GPU case: 42,74,172,240)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(PARTS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.out, args.dry_run)
    steps.data = args.data
    state_path = args.out / "numbers.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"figures": {}}
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        ap.error("--device cuda: no GPU on this machine")
    info = None if args.dry_run else machine(args.device)
    state["machine"] = info
    curve_steps = [int(n) for n in args.curve_steps.split(",") if n.strip()]
    for part in parts:
        t0 = time.time()
        figures = {"bench": lambda: part_bench(steps, args.device), "finetune": lambda: part_finetune(steps, args.device),
                   "curve": lambda: part_curve(steps, args.device, curve_steps)}[part]()
        state["figures"].update(figures)
        state.setdefault("minutes", {})[part] = round((time.time() - t0) / 60, 1)
        if not args.dry_run:
            write_text(state_path, json.dumps(state, indent=1) + "\n")
    if args.dry_run:
        return
    lines = [f"# Numbers of {info['cpu']}" + (f" + {info['gpu']}" if info.get("gpu") else ""), "",
             f"{info['cpu_cores']} cores, flags {' '.join(info['cpu_flags']) or '-'}; torch {info['torch']}; "
             f"--precision auto: {info['auto_precision']}; {info['date']}", "",
             "| figure | here | README (same CPU model) | README source |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {v} | {r} | {src} |" for n, v, r, src in compare(state["figures"], info)]
    write_text(args.out / "numbers.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
