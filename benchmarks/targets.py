"""The acceptance targets of the speed issue, judged from a ``mimkit bench --out RESULT.json`` file.

    python benchmarks/targets.py RESULT.json [RESULT.json ...]

prints one line per target (met / MISS, measured, needed) and exits 1 when one is missed. These are the
project's goals for its benchmark machines, not part of the library: ``mimkit bench`` itself only measures.
"""
import json
import sys
from typing import List

from mimkit.bench import CONFIGS


def targets(result: dict) -> List[dict]:
    """The speed issue's targets, each with its measured value (rows that were not timed are left out).

    CPU: fp32 mimkit >= 1.25x the faster peer's fp32; at 32 px also bf16 mimkit >= 2x the faster peer's fp32,
    with the loss check passing; the data pipeline >= 3x the fastest mimkit training step.
    GPU: bf16 mimkit >= 1.3x the faster peer's bf16, and >= 40% of the measured bf16 matmul rate.
    """
    rows, gpu = result["results"], str(result["machine"]["device"]).startswith("cuda")
    rules = [("bf16", "bf16", 1.3)] if gpu else [("fp32", "fp32", 1.25), ("bf16", "fp32", 2.0)]
    out = []
    for m in (r for r in rows if r["impl"] in ("mimkit", "mimkit+compile")):  # +ckpt trades speed for memory
        for precision, against, need in rules:
            if m["precision"] != precision or (not gpu and precision == "bf16" and CONFIGS[m["config"]].encoder[
                    "img_size"] != 32):
                continue
            peers = [r for r in rows if r["config"] == m["config"] and r["precision"] == against
                     and not r["impl"].startswith("mimkit")]
            if not peers:
                continue
            p = max(peers, key=lambda r: r["images_per_s"]["median"])
            ratio = m["images_per_s"]["median"] / p["images_per_s"]["median"]
            t = {"what": f"{m['config']} {m['impl']} {precision} / faster peer {against} ({p['impl']})",
                 "need": need, "measured": ratio, "met": ratio >= need}
            lc = result.get("loss_check")
            if precision == "bf16" and not gpu:
                t["loss_check_passed"] = bool(lc and lc["config"] == m["config"] and lc["passed"])
                t["met"] = t["met"] and t["loss_check_passed"]
            out.append(t)
        if gpu and m["precision"] == "bf16":
            out.append({"what": f"{m['config']} {m['impl']} bf16 fraction of the bf16 matmul rate", "need": 0.40,
                        "measured": m["fraction_of_matmul"], "met": m["fraction_of_matmul"] >= 0.40})
    dp = result.get("data_pipeline")
    train = [r for r in rows if dp and r["config"] == dp["config"] and r["impl"].startswith("mimkit")]
    if train:
        ratio = dp["images_per_s"]["median"] / max(r["images_per_s"]["median"] for r in train)
        out.append({"what": f"data pipeline / fastest mimkit {dp['config']} training step", "need": 3.0,
                    "measured": ratio, "met": ratio >= 3.0})
    return out


def main(paths: List[str]) -> int:
    missed = 0
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        print(f"{path}:")
        for t in targets(result):
            print(f"  {'met ' if t['met'] else 'MISS'} {t['what']}: {t['measured']:.2f} (need {t['need']})")
            missed += not t["met"]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
