"""How long `mimkit explore` takes to answer a mask-ratio slider move (one /api/reconstruct request: read and
prepare the image, encoder and decoder on the visible patches, the four panels and the error map as PNGs, JSON),
on the CPU with one thread, for ViT-Tiny at 32 px and ViT-B at 224 px (random init: the time does not depend on
the weights). The image is one of the built-in sample's, resized to the model's size as every evaluation does.

    OMP_NUM_THREADS=1 python benchmarks/explore_latency.py [--threads 1] [--moves 10]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from mimkit.checkpoints.export import export
from mimkit.explore import Explorer, create_app, load_models
from mimkit.models import create_mae

CASES = [("ViT-Tiny 32 px", "vit_tiny_patch4_32"), ("ViT-B 224 px", "vit_base_patch16_224")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--moves", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset in CASES:
            path = export(create_mae(preset).eval(), "mae", Path(tmp) / f"{preset}.pth")
            explorer = Explorer(load_models(str(path)), "builtin")
            with TestClient(create_app(explorer)) as client:
                ratios = [0.05 * k for k in range(3, 3 + args.moves)]
                client.post("/api/reconstruct", json={"image": {"name": "cat/0001.jpg"}, "ratio": 0.75})  # warm-up
                times = []
                for r in ratios:
                    t0 = time.perf_counter()
                    reply = client.post("/api/reconstruct", json={"image": {"name": "cat/0001.jpg"}, "ratio": r})
                    times.append(time.perf_counter() - t0)
                    assert reply.status_code == 200, reply.text
            print(f"{label:16s} {args.threads} thread(s): slider move median {1000 * statistics.median(times):7.1f} ms "
                  f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f}; {len(times)} moves)", flush=True)


if __name__ == "__main__":
    main()
