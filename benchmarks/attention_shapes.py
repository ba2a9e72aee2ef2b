"""Attention at MAE's short sequences: PyTorch's fused `scaled_dot_product_attention` against the same attention as
plain matmul-softmax-matmul, forward + backward, per precision and thread count.

    python benchmarks/attention_shapes.py --precision fp32 --threads 1 2

Shapes (batch, heads, tokens, head dim) are the tiny32 bench's: its encoder over the visible quarter (17 tokens
with the class token) and its decoder over all 65. Prints milliseconds per call (median of --repeats, each the
mean of --number calls) and the plain/fused ratio; docs/performance.md says which one mimkit's Attention uses.
Run it alone: a second job on the same cores measures the other job.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"tiny32 encoder": (128, 3, 17, 64), "tiny32 decoder": (128, 4, 65, 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def plain(q, k, v):
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def time_call(fn, shape, dtype, number: int, repeats: int) -> float:
    """Median milliseconds of forward + backward of ``fn`` over fresh leaf q, k, v of ``shape``."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(q, k, v).backward(grad)
        times.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--number", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print("| shape (B, H, N, D) | precision | threads | fused SDPA ms | plain ms | plain / fused |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for precision in args.precision:
            for name, shape in SHAPES.items():
                # interleaved, so a change in the machine's speed touches both
                a = time_call(fused, shape, DTYPES[precision], args.number, args.repeats)
                b = time_call(plain, shape, DTYPES[precision], args.number, args.repeats)
                a = min(a, time_call(fused, shape, DTYPES[precision], args.number, args.repeats))
                print(f"| {name} {shape} | {precision} | {threads} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
