"""``mimkit bench``: how fast a full MAE pretraining step runs here, against the peers, in one process.

For each named configuration (:data:`CONFIGS`) and precision it builds, with the same shapes, batch,
precision and thread count,

- ``mimkit``: :class:`~mimkit.models.MaskedAutoencoder` with the optimizer ``mimkit pretrain`` uses,
- ``hf``: Hugging Face transformers' ``ViTMAEForPreTraining`` with ``torch.optim.AdamW``,
- ``lightly``: lightly's MAE modules (``MaskedVisionTransformerTIMM`` encoder, ``MaskedVisionTransformerDecoderTIMM``
  decoder, masks from ``lightly.models.utils``, MSE on the masked patches) with ``torch.optim.AdamW``,

and times full training steps (forward, backward, optimizer) after warm-up. The contestants take turns,
repeat by repeat, so that a change in the machine's load hits all of them alike; each row reports the median
and the spread of images/s over the repeats, the ratio mimkit/peer, FLOPs per image (counted by
``torch.utils.flop_counter`` on one step), the achieved FLOP/s and its fraction of the dense matmul rate
measured in the same run (fp32 and bf16), where the step's time goes (``breakdown``: seconds in matmuls, attention,
norms and activations, the optimizer, copies and casts, and the rest, from the profiler), and the peak memory of
a step. It also times the data pipeline
alone (decode once, augment and collate batched tensors) and, for bf16, checks that the loss curve of the
first few hundred steps follows fp32's within the noise that a different draw of masks makes.

The contestants are in :mod:`.peers`, the measurements in :mod:`.measure`, the tables in :mod:`.report`; the
acceptance targets of the speed issue are judged from a result file by ``benchmarks/targets.py``, not here.
The peers are an optional extra (``pip install 'mimkit[bench]'``); a missing one is skipped with a note.
"""
import logging
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import List

import torch

from ..engine import setup
from ..files import write_json, write_text
from ..precision import resolve as resolve_precision
from .measure import (Runner, count_flops, load_average, loss_check, machine_info, matmul_rate, release_free_memory,
                      step_breakdown, step_memory, summary, time_data_pipeline, time_interleaved)
from .peers import BUILDERS, CONFIGS, PEERS, PRECISIONS, build_mimkit
from .report import format_table, markdown

log = logging.getLogger("mimkit")

__all__ = ["bench", "CONFIGS", "PEERS", "PRECISIONS"]


def _names(text: str) -> List[str]:
    """A comma-separated option (configs, precisions, peers) as a list."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def bench(cfg) -> dict:
    """Run the benchmark described by a :class:`mimkit.config.BenchConfig`; print a table, write JSON."""
    env = setup(cfg)
    device = env.device
    precisions = []  # auto: fp32, and bf16 too where the device runs it natively
    for p in _names(cfg.precision):
        precisions += ["fp32", resolve_precision("auto", device)[0]] if p == "auto" else [p]
    precisions = list(dict.fromkeys(precisions))
    peers = [p for p in _names(cfg.peers) if p != "none"]
    variants = {"off": ["mimkit"], "on": ["mimkit+compile"], "both": ["mimkit", "mimkit+compile"]}[cfg.compile]
    if cfg.grad_checkpointing:
        variants.append("mimkit+ckpt")
    started = datetime.now(timezone.utc)
    result = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(device),
              "load_before": load_average(), "settings": {k: getattr(cfg, k) for k in vars(cfg)}, "notes": [],
              "matmul": {}, "results": [], "data_pipeline": None, "loss_check": None}
    if device.type == "cuda":
        result["notes"].append("fp32 rows use TF32 matmuls, as mimkit pretrain does on a GPU")

    n = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # only the precisions asked for: a CPU without native bf16 runs bf16 matmuls at a fraction of a GFLOP/s
    matmul = {p: matmul_rate(device, dtypes[p], n)["all"] for p in precisions}

    def probe():  # the matmul rate again after every round, so the limit is measured under the same load
        for p in precisions:
            matmul[p] += matmul_rate(device, dtypes[p], n, repeats=1, seconds=0.2)["all"]

    available = []
    for p in peers:
        try:
            __import__({"hf": "transformers", "lightly": "lightly"}[p])
            available.append(p)
        except ImportError:
            result["notes"].append(f"peer {p} is not installed (pip install 'mimkit[bench]'): skipped")
            log.warning("bench: %s", result["notes"][-1])

    for name in _names(cfg.configs):
        result["results"] += _bench_config(name, cfg, device, precisions, variants, available, probe)
        release_free_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for p in precisions:
        result["matmul"][p] = {"size": n, **summary(matmul[p])}
    for row in result["results"]:
        row["matmul_flops"] = result["matmul"][row["precision"]]["median"]
        row["fraction_of_matmul"] = row["achieved_flops"] / row["matmul_flops"]

    first = _names(cfg.configs)[0]
    if cfg.data:
        spec = CONFIGS[first]
        batch = cfg.batch_size or spec.batch(device)
        workers = cfg.num_workers
        result["data_pipeline"] = {"config": first, **time_data_pipeline(
            cfg.data, spec.encoder["img_size"], batch, device, cfg.data_batches, cfg.repeats, workers, cfg.seed)}
    if cfg.loss_check_steps and "bf16" in precisions:
        if cfg.data:
            result["loss_check"] = loss_check(first, CONFIGS[first], device, cfg.data, cfg.loss_check_steps,
                                              cfg.loss_check_batch, cfg.seed)
        else:
            result["notes"].append("bf16 loss check skipped: it needs images (--data)")
    result["load_after"] = load_average()
    result["seconds"] = (datetime.now(timezone.utc) - started).total_seconds()
    print(format_table(result))
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result, indent=1)
        write_text(out.with_suffix(".md"), markdown(result) + "\n")
        log.info("bench: results in %s", out)
    return result


def _bench_config(name: str, cfg, device: torch.device, precisions, variants, peers, probe) -> List[dict]:
    """Every contestant at every precision on one configuration: rows of the result table."""
    spec = CONFIGS[name]
    batch = cfg.batch_size or spec.batch(device)
    torch.manual_seed(cfg.seed)
    img = spec.encoder["img_size"]
    images = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    contestants = build_mimkit(spec, device, variants) + [BUILDERS[p](spec, device) for p in peers]
    runners = [Runner(c, p) for p in precisions for c in contestants]
    log.info("bench %s: batch %d, %s, timing %s", name, batch, ", ".join(precisions),
             ", ".join(c.name for c in contestants))
    time_interleaved(runners, images, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats, between=probe)
    flops = {c.name: count_flops(c, images, "fp32") for c in contestants}
    rows = []
    for r in runners:
        c = r.contestant
        step_s = batch / statistics.median(r.images_per_s)
        rows.append({"config": name, "precision": r.precision, "impl": c.name, "batch": batch, "steps": r.steps,
                     "warmup_s": r.warmup_s, "images_per_s": summary(r.images_per_s),
                     "cpu_share": summary(r.cpu_share), "flops_per_image": flops[c.name],
                     "achieved_flops": flops[c.name] * statistics.median(r.images_per_s),
                     "breakdown": step_breakdown(c, images, r.precision, step_s),
                     "memory": step_memory(c, images, r.precision)})
    _add_ratios(rows, name)
    return rows


def _add_ratios(rows: List[dict], config: str):
    """mimkit rows get ``vs`` (their median images/s over each peer's at the same precision), ``vs_fp32`` (over
    the peer's fp32) and ``vs_paired`` (the median of the per-repeat ratios: each pair ran back to back)."""
    mine = [r for r in rows if r["config"] == config and r["impl"].startswith("mimkit")]
    peers = [r for r in rows if r["config"] == config and not r["impl"].startswith("mimkit")]
    for r in mine:
        ips = r["images_per_s"]
        r["vs"], r["vs_fp32"], r["vs_paired"] = {}, {}, {}
        for p in peers:
            ratio = ips["median"] / p["images_per_s"]["median"]
            if p["precision"] == r["precision"]:
                r["vs"][p["impl"]] = ratio
                r["vs_paired"][p["impl"]] = statistics.median(
                    a / b for a, b in zip(ips["all"], p["images_per_s"]["all"]))
            if p["precision"] == "fp32":
                r["vs_fp32"][p["impl"]] = ratio
