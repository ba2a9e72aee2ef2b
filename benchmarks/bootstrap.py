"""The uncertainty of a difference in mIoU between two segmentation runs scored on the same held-out images: a
paired bootstrap over the images (each resample draws N images with replacement, the same draw for both runs, and
recomputes both mIoUs from the summed per-image counts that ``mimkit segment`` writes to ``per_image.npz``).

    python benchmarks/bootstrap.py runs/seg-mae runs/seg-random     # A - B, its standard error, 95% interval
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mimkit.segment import miou_from_counts  # noqa: E402


def load(run) -> tuple:
    data = np.load(Path(run) / "per_image.npz")
    return data["counts"], list(data["names"])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """``a``, ``b``: (N, K, 3) per-image counts of the same N images. Returns the difference of mIoU (A - B) on all
    images, the bootstrap standard error of it, the 2.5 / 97.5 percentiles and the difference in standard errors."""
    n = len(a)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)
    sa = (weights @ a.reshape(n, -1)).reshape(resamples, *a.shape[1:])
    sb = (weights @ b.reshape(n, -1)).reshape(resamples, *b.shape[1:])
    diffs = np.array([miou_from_counts(x) - miou_from_counts(y) for x, y in zip(sa, sb)])
    diff = miou_from_counts(a.sum(0)) - miou_from_counts(b.sum(0))
    se = float(diffs.std(ddof=1))
    return {"miou_a": miou_from_counts(a.sum(0)), "miou_b": miou_from_counts(b.sum(0)), "difference": diff,
            "standard_error": se, "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "z": diff / se if se > 0 else float("inf"), "images": n, "resamples": resamples}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="segment run (or folder with per_image.npz) A")
    ap.add_argument("b", help="segment run B, scored on the same images")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    (ca, na), (cb, nb) = load(args.a), load(args.b)
    if na != nb:
        sys.exit(f"bootstrap: {args.a} and {args.b} were scored on different images")
    r = paired_bootstrap(ca, cb, args.resamples, args.seed)
    print(f"mIoU {r['miou_a']:.2f} ({args.a}) - {r['miou_b']:.2f} ({args.b}) = {r['difference']:+.2f} "
          f"+- {r['standard_error']:.2f} (paired bootstrap over {r['images']} images, {r['resamples']} resamples; "
          f"95% interval {r['ci95'][0]:+.2f} .. {r['ci95'][1]:+.2f}; {r['z']:.1f} standard errors)")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
