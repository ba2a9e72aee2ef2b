"""Streaming tar shards against the CIFAR-10 recipe: does the loader keep up, and does its memory stay flat?

1. Writes two generated shard sets, 20,000 and 200,000 images (CIFAR-10 JPEGs repeated under new keys, 1,000
   per shard), with webdataset's writer.
2. For each set, in a fresh process: streams ``--batches`` batches of the recipe's loader (batch 256, 32 px,
   RandomResizedCrop + flip, ``--num-workers``) and records images/s and the peak resident memory of the loader
   process plus its workers (sampled from /proc every 50 ms).
3. Times the recipe's training step (ViT-Tiny/4 MAE, decoder 128x2, AdamW, batch 256, on ``--device``) on
   in-memory batches.

Targets (issue 10): loader >= 3x the training step's images/s; the 200,000-image set's resident memory within
20% of the 20,000-image set's. Writes ``OUT/shards-bench.json`` and prints a table.

usage: python benchmarks/shards.py [--source ../shared/data/cifar10-train.tar.gz] [--out runs/bench-shards]
                                   [--device auto] [--num-workers -1] [--batches 150]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_set(source: str, out: Path, n: int) -> str:
    import webdataset as wds
    from mimkit.data import open_images
    pattern = out / f"{n}" / "shard-%06d.tar"
    done = out / f"{n}" / "done"
    if not done.exists():
        pattern.parent.mkdir(parents=True, exist_ok=True)
        src = open_images(source)
        with wds.ShardWriter(str(pattern), maxcount=1000, verbose=0) as sink:
            for i in range(n):
                j = i % len(src)
                sink.write({"__key__": f"{i:09d}", "jpg": src.read_bytes(j), "cls": src.labels[j]})
        done.write_text("ok")
    return str(out / f"{n}" / f"shard-{{000000..{(n - 1) // 1000:06d}}}.tar")


def _rss_tree_kib(pid: int) -> int:
    """Resident memory of a process and its children (workers), KiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def stream(pattern: str, batches: int, num_workers: int) -> dict:
    """Runs in its own process: images/s of the recipe's loader and the peak memory of the loader's processes."""
    from mimkit.data import make_loader, open_images, split_train_val
    peak = {"main": 0, "tree": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], _rss_tree_kib(os.getpid()))
            peak["main"] = max(peak["main"], _self_rss())
            time.sleep(0.05)

    t0 = time.perf_counter()
    src = open_images(pattern)
    train, _ = split_train_val(src, 0.1)
    t_index = time.perf_counter() - t0
    loader = make_loader(src, train, batch_size=256, recipe="pretrain", img_size=32, aug="rrc", seed=0,
                         num_workers=num_workers)
    threading.Thread(target=sample, daemon=True).start()
    it = iter(loader)
    next(it)  # worker start-up
    n, t0 = 0, time.perf_counter()
    for _, (x, _) in zip(range(batches), it):
        n += len(x)
    seconds = time.perf_counter() - t0
    stop.set()
    return {"images": len(src), "index_s": round(t_index, 2), "streams": loader.streams, "workers": loader.workers,
            "images_per_s": round(n / seconds, 1), "peak_rss_main_mib": round(peak["main"] / 1024, 1),
            "peak_rss_loader_mib": round(peak["tree"] / 1024, 1)}


def _self_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def step_rate(device: str, steps: int = 10):
    """(images/s, device) of the CIFAR-10 recipe's training step (forward, backward, AdamW) on in-memory batches."""
    import torch
    from timm.optim import create_optimizer_v2
    from mimkit.engine import StepRandom, Env
    from mimkit.models import create_mae
    from mimkit.objectives.mae import MAEObjective
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = create_mae("vit_tiny_patch4_32", decoder_dim=128, decoder_depth=2, decoder_heads=4).to(dev)
    task = MAEObjective(model)
    opt = create_optimizer_v2(task, "adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), fused=True)
    x = torch.randn(256, 3, 32, 32, device=dev)
    env = Env(dev, 0, 1)
    precision = torch.bfloat16 if dev.type == "cuda" else None
    for s in range(steps + 3):
        if s == 3:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=precision, enabled=precision is not None):
            loss = task(x, None, StepRandom(0, s, 0, env))
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 256 * steps / (time.perf_counter() - t0), str(dev)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared/data/cifar10-train.tar.gz"))
    ap.add_argument("--out", default="runs/bench-shards")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-workers", type=int, default=-1)
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--_stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._stream:  # the child: one set
        print(json.dumps(stream(args._stream, args.batches, args.num_workers)))
        return
    out = Path(args.out)
    sets = {}
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        pattern = write_set(args.source, out, n)
        print(f"set of {n} images: {pattern} (written in {time.perf_counter() - t0:.0f} s)", flush=True)
        child = subprocess.run([sys.executable, __file__, "--_stream", pattern, "--batches", str(args.batches),
                                "--num-workers", str(args.num_workers)], capture_output=True, text=True, check=True)
        sets[n] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  {sets[n]}", flush=True)
    rate, device = step_rate(args.device)
    small, large = (sets[k] for k in sorted(sets))
    result = {"sets": sets, "train_step_images_per_s": round(rate, 1), "device": device,
              "loader_over_step": round(small["images_per_s"] / rate, 2),
              "rss_large_over_small": round(large["peak_rss_loader_mib"] / small["peak_rss_loader_mib"], 3),
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"training step ({device}): {rate:.0f} img/s; loader {small['images_per_s']:.0f} img/s "
          f"({result['loader_over_step']}x, target >= 3x); loader memory {large['peak_rss_loader_mib']:.0f} MiB for "
          f"{large['images']} images vs {small['peak_rss_loader_mib']:.0f} MiB for {small['images']} "
          f"({result['rss_large_over_small']}x, target <= 1.2x)")


if __name__ == "__main__":
    main()
