"""``mimkit sweep CONFIG``: pretrain a list or grid of configurations on one budget, evaluate each the same way,
and put the answers in one table and a few plots.

A sweep file (see ``configs/lineage.yaml``)::

    output: runs/lineage
    base: {model: vit_micro_patch4_32, data: /tmp/cifar10-train, batch_size: 128, epochs: 100}
    budget: {time_limit: 3}           # minutes of pretraining per run (or epochs / max_steps)
    runs:                             # each: a name and the pretrain options it changes
      - {name: mae, objective: mae}
      - {name: beit, objective: beit, objective_args: {tokenizer: auto}}
    grid: {mask_ratio: [0.25, 0.5, 0.75]}   # optional: crossed with every run
    eval: [knn, linprobe]
    knn: {k: 20}
    linprobe: {epochs: 20}
    tokenizer: {codebook_size: 1024, time_limit: 2}   # trained once for `tokenizer: auto`

Precedence for each run: the sweep's run options (seed, device, precision, threads, ...) < ``base`` <
``budget`` < the run's own options < its grid values. Layout: ``OUTPUT/NAME/pretrain`` (the pretraining
run), ``OUTPUT/NAME/{knn,linprobe,finetune}`` (each evaluation), ``OUTPUT/NAME/result.json`` (the row).
A run whose ``result.json`` exists is not redone, a finished pretraining or evaluation is not repeated,
and an interrupted pretraining resumes from its checkpoint: running the same command again continues
where it stopped. ``OUTPUT/results.md``, ``results.json`` and ``*.png`` are rewritten from all rows.

Pretraining compute is reported as wall-clock minutes and as FLOPs: the forward + backward FLOPs of one
training image (counted by ``torch.utils.flop_counter`` on the built objective) times the images seen.
"""
import copy
import itertools
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .checkpoint_files import list_checkpoints, load_checkpoint
from .files import write_json, write_text, write_via
from .config import (FinetuneConfig, KnnConfig, LinprobeConfig, PretrainConfig, RunOptions, SweepConfig, TokenizerConfig, load_config, option_fields, save_config)
from .errors import ConfigError
from .flops import counted_flops
from .errors import CheckpointError as CkptError, DataError, DivergedError
from .eval import finetune, knn, linprobe
from .models.presets import ENCODERS
from .objectives import OBJECTIVES, check_objective
from .pretrain import pretrain
from .tokenizer import train_tokenizer

log = logging.getLogger("mimkit")
EVAL_CONFIGS = {"knn": KnnConfig, "linprobe": LinprobeConfig, "finetune": FinetuneConfig}
RUN_OPTIONS = [f.name for f, _ in option_fields(RunOptions) if f.name != "output"]
RANDOM_INIT = "random-init"


class SweepError(ConfigError):
    """Some runs failed; the others are in the table. One line, as every user-facing error."""


# the runs -----------------------------------------------------------------------------------------------------
def _set(d: dict, key: str, value):
    """``objective_args.KEY`` (dotted) sets a nested option; plain keys set top-level ones."""
    if "." in key:
        head, rest = key.split(".", 1)
        d[head] = dict(d.get(head) or {})
        _set(d[head], rest, value)
    else:
        d[key] = value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            _set(out, k, copy.deepcopy(v))
    return out


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand_runs(cfg: SweepConfig) -> List[dict]:
    """Every run: ``{"name", "options": the run's own pretrain options, "grid": its grid values}``."""
    runs = cfg.runs or [{"name": "base"}]
    keys = list(cfg.grid)
    combos = list(itertools.product(*(cfg.grid[k] for k in keys))) if keys else [()]
    out = []
    for run in runs:
        options = {k: v for k, v in run.items() if k != "name"}
        for combo in combos:
            grid = dict(zip(keys, combo))
            name = "-".join([run["name"]] + [f"{k.split('.')[-1]}{_fmt(v)}" for k, v in grid.items()])
            if len(runs) == 1 and cfg.runs == [] and grid:
                name = "-".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in grid.items())
            out.append({"name": name, "options": options, "grid": grid})
    return out


def run_values(cfg: SweepConfig, run: dict) -> dict:
    """The pretrain options of one run, before ``output`` and the tokenizer are filled in."""
    values = {k: getattr(cfg, k) for k in RUN_OPTIONS}
    values = _merge(values, cfg.base)
    values = _merge(values, cfg.budget)
    values = _merge(values, run["options"])
    for k, v in run["grid"].items():
        _set(values, k, v)
    return values


def needs_tokenizer(values: dict) -> bool:
    args = values.get("objective_args") or {}
    wants = values.get("objective") == "beit" or (values.get("objective", "mae") == "mae" and args.get("target") == "tokens")
    return args.get("tokenizer") == "auto" or (wants and not args.get("tokenizer"))


def settings(run: dict) -> str:
    """What a run changes, in one short string (for the table)."""
    flat = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v
    walk("", {k: v for k, v in run["options"].items() if k != "objective"})
    walk("", run["grid"])
    return ", ".join(f"{k.replace('objective_args.', '')}={_fmt(v)}" for k, v in flat.items()
                     if k not in ("objective_args.tokenizer",))


# one run ------------------------------------------------------------------------------------------------------
def run_command(name: str, cfg):
    """Run one step a sweep drives, by name (``pretrain``, ``knn``, ``linprobe``, ``finetune``, or ``tokenizer``:
    training BEiT's tokenizer), with its options dataclass; what ``mimkit`` would run for the same options."""
    return {"pretrain": pretrain, "knn": knn, "linprobe": linprobe, "finetune": finetune,
            "tokenizer": train_tokenizer}[name](cfg)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_flops_per_image(kind: str, arch: dict, img_size: int) -> float:
    """Forward + backward FLOPs of one training image for the objective ``kind`` with ``arch``."""
    objective = OBJECTIVES[kind].build(arch).train()
    for m in objective.modules():  # the counter sees attention's matmuls only outside fused kernels
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    images = torch.randn(2, 3, img_size, img_size)

    def step():
        loss = objective(images, None, None)
        (loss["loss"] if isinstance(loss, dict) else loss).backward()
    return counted_flops(step) / images.shape[0]


def describe(kind: str, arch: dict) -> dict:
    """The axes the plots use, as the model was built: mask ratio and decoder shape (None where they do not apply)."""
    ratio = arch.get("mask_ratio")
    if kind == "igpt" and (arch.get("encoder") or {}).get("causal"):
        ratio = None  # GPT hides nothing
    return {"mask_ratio": ratio, "decoder_depth": arch.get("decoder_depth"), "decoder_dim": arch.get("decoder_dim")}


def pretrain_run(values: dict, run_dir: Path) -> dict:
    """Pretrain (or finish pretraining) one run; returns its compute record."""
    done = run_dir / "sweep-pretrain.json"
    record = _read_json(done)
    if record is not None:
        return record
    cfg = load_config(PretrainConfig, None, {**values, "output": str(run_dir), "resume": True})
    resumed = bool(list_checkpoints(run_dir))
    result = run_command("pretrain", cfg)
    ckpt = list_checkpoints(run_dir)[-1]
    state = load_checkpoint(ckpt)
    kind, arch = state["kind"], state["arch"]
    img_size = cfg.img_size or (arch.get("encoder") or {}).get("img_size") or 32
    per_image = train_flops_per_image(kind, arch, img_size)
    images_seen = int(result.step) * cfg.batch_size * cfg.accum_steps
    record = {"objective": kind, "steps": int(result.step), "epochs": int(result.epoch), "final_loss": result.loss,
              "pretrain_seconds": round(result.seconds, 1), "resumed": resumed, "images_seen": images_seen,
              "train_flops_per_image": per_image, "pretrain_flops": per_image * images_seen,
              "checkpoint": str(ckpt), **describe(kind, arch)}
    write_json(done, record)
    return record


def eval_run(cfg: SweepConfig, which: str, values: dict, run_dir: Path, checkpoint: Optional[str]) -> dict:
    """One evaluation of one run (or of the untrained encoder when ``checkpoint`` is None); cached."""
    out = run_dir / which
    cached = _read_json(out / "results.json")
    if cached is not None and "top1" in cached:
        return cached
    cls = EVAL_CONFIGS[which]
    fields = {f.name for f, _ in option_fields(cls)}
    opts = {k: values[k] for k in RUN_OPTIONS + ["data", "val_fraction", "img_size"] if k in values and k in fields}
    opts.update(output=str(out))
    if checkpoint is None:
        opts.update(random_init=True, model=values.get("model", PretrainConfig.model))
    else:
        opts.update(checkpoint=checkpoint)
    if "resume" in fields:
        opts["resume"] = True
    opts.update(getattr(cfg, which) or {})
    return run_command(which, load_config(cls, None, opts))


def run_one(cfg: SweepConfig, run: dict, out: Path, tokenizer: Optional[str]) -> dict:
    run_dir = out / run["name"]
    values = run_values(cfg, run)
    if needs_tokenizer(values):
        if tokenizer is None:
            raise ConfigError(f"run {run['name']} needs a tokenizer: give the sweep a tokenizer: section (trained once) "
                              f"or objective_args.tokenizer: PATH")
        values.setdefault("objective_args", {})["tokenizer"] = tokenizer
    spec = {"options": run["options"], "grid": run["grid"], "values": values, "eval": list(cfg.eval),
            "eval_options": {e: getattr(cfg, e) for e in cfg.eval}}
    cached = _read_json(run_dir / "result.json")
    if cached is not None:
        if _jsonable(cached.get("spec")) != _jsonable(spec):
            log.warning("sweep: %s was run with other options than the sweep file now gives; its old results are "
                        "kept (delete %s to redo it)", run["name"], run_dir)
        return cached
    log.info("sweep: run %s (%s)", run["name"], settings(run) or "base options")
    record = pretrain_run(values, run_dir / "pretrain")
    evals = {e: eval_run(cfg, e, values, run_dir, record["checkpoint"]) for e in cfg.eval}
    row = {"name": run["name"], "settings": settings(run), **record,
           **{f"{e}_top1": evals[e].get("top1") for e in cfg.eval},
           **{f"{e}_top5": evals[e].get("top5") for e in cfg.eval}, "spec": spec}
    write_json(run_dir / "result.json", row)
    return row


def _jsonable(x):
    return json.loads(json.dumps(x, default=str, sort_keys=True))


def random_init_row(cfg: SweepConfig, out: Path) -> dict:
    run_dir = out / RANDOM_INIT
    cached = _read_json(run_dir / "result.json")
    if cached is not None:
        return cached
    values = run_values(cfg, {"options": {}, "grid": {}})
    evals = {e: eval_run(cfg, e, values, run_dir, None) for e in cfg.eval}
    row = {"name": RANDOM_INIT, "settings": "no pretraining", "objective": "-", "steps": 0, "pretrain_seconds": 0.0,
           "pretrain_flops": 0.0, **{f"{e}_top1": evals[e].get("top1") for e in cfg.eval},
           **{f"{e}_top5": evals[e].get("top5") for e in cfg.eval}}
    write_json(run_dir / "result.json", row)
    return row


def shared_tokenizer(cfg: SweepConfig, out: Path, runs: List[dict]) -> Optional[str]:
    """Train the sweep's tokenizer once (when a run needs it), on the base data; returns its path."""
    if not any(needs_tokenizer(run_values(cfg, r)) for r in runs):
        return None
    if not cfg.tokenizer:
        return None
    tok_dir = out / "tokenizer"
    path = tok_dir / "tokenizer.pt"
    if path.is_file():
        return str(path)
    base = run_values(cfg, {"options": {}, "grid": {}})
    fields = {f.name for f, _ in option_fields(TokenizerConfig)}
    opts = {k: v for k, v in base.items() if k in fields and k in RUN_OPTIONS + ["data", "val_fraction", "img_size"]}
    model = base.get("model", PretrainConfig.model)
    if model in ENCODERS:
        opts["patch_size"] = ENCODERS[model]["patch_size"]
    opts.update(output=str(tok_dir), resume=True)
    opts.update(cfg.tokenizer)
    log.info("sweep: training the shared tokenizer in %s", tok_dir)
    run_command("tokenizer", load_config(TokenizerConfig, None, opts))
    return str(path)


# the sweep ----------------------------------------------------------------------------------------------------
def check_run_options(run: dict, values: dict, out: Path):
    """The run's pretrain options and its objective's option names, as one-line errors naming the run."""
    try:
        cfg = load_config(PretrainConfig, None, {**values, "output": str(out / run["name"] / "pretrain")})
        check_objective(cfg)  # names and values only: a tokenizer path is opened when the run starts
    except ConfigError as e:
        raise ConfigError(f"run {run['name']}: {e}") from None


def sweep(cfg: SweepConfig) -> dict:
    """Run (or continue) every run of the sweep, then write ``results.md``, ``results.json`` and the plots."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "sweep.yaml")
    runs = expand_runs(cfg)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("the sweep gives two runs the same name; rename the runs")
    for run in runs:  # every run's options are checked before any work starts
        check_run_options(run, run_values(cfg, run), out)
    t0 = time.time()
    tokenizer = shared_tokenizer(cfg, out, runs)
    rows, failed = [], []
    if cfg.random_init:
        rows.append(_attempt(lambda: random_init_row(cfg, out), RANDOM_INIT, failed))
    for run in runs:
        rows.append(_attempt(lambda: run_one(cfg, run, out, tokenizer), run["name"], failed))
    summary = write_results(cfg, out, rows)
    if cfg.plots:
        summary["plots"] = plot_results(out, rows, list(cfg.eval))
    log.info("sweep: %d runs in %.1f min; table in %s", len(rows), (time.time() - t0) / 60, out / "results.md")
    if failed:
        raise SweepError(f"{len(failed)} of {len(rows)} runs failed: " + "; ".join(f"{n}: {m}" for n, m in failed)
                         + " (the rest are in the table; run the sweep again to retry)")
    return summary


def _attempt(fn, name: str, failed: list) -> dict:
    try:
        return fn()
    except (ConfigError, DataError, CkptError, DivergedError) as e:
        log.error("sweep: run %s failed: %s", name, e)
        failed.append((name, str(e)))
        return {"name": name, "error": str(e)}


# the table ----------------------------------------------------------------------------------------------------
def machine() -> str:
    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return (f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} using "
            f"{torch.get_num_threads()} threads, device {dev}")


def _images(n) -> str:
    return "" if n is None else f"{n / 1000:.0f}k" if n >= 1000 else str(n)


def _num(v, fmt="{:.1f}") -> str:
    return "" if v is None else fmt.format(v)


def write_results(cfg: SweepConfig, out: Path, rows: List[dict]) -> dict:
    evals = list(cfg.eval)
    base = {k: v for k, v in cfg.base.items()}
    header = ["run", "objective", "settings", "steps", "images seen", "pretrain min", "PFLOPs"] + \
             [f"{e} top-1" for e in evals]
    lines = [f"# Sweep results: {out.name}", "",
             f"- data: {base.get('data', 'builtin')} (validation: the last {base.get('val_fraction', 0.1):g} of each "
             f"class, never pretrained on); model: {base.get('model', PretrainConfig.model)}",
             f"- budget per run: {', '.join(f'{k}={_fmt(v)}' for k, v in cfg.budget.items()) or 'as in base'}",
             f"- evaluation: {', '.join(evals)} "
             + " ".join(f"({e}: {', '.join(f'{k}={_fmt(v)}' for k, v in getattr(cfg, e).items())})"
                        for e in evals if getattr(cfg, e)),
             f"- machine: {machine()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * (len(header) - 2))
            continue
        flops = r.get("pretrain_flops")
        cells = [r["name"], r.get("objective", ""), r.get("settings", ""), str(r.get("steps", "")),
                 _images(r.get("images_seen")), _num((r.get("pretrain_seconds") or 0) / 60),
                 _num(flops / 1e15 if flops is not None else None, "{:.3g}")]
        cells += [_num(r.get(f"{e}_top1")) for e in evals]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Top-1 accuracy in percent on the held-out split. PFLOPs: forward + backward FLOPs of pretraining "
              "(per-image count x images seen)."]
    plots = [p for p in ("accuracy_vs_mask_ratio.png", "accuracy_vs_decoder_depth.png", "accuracy_vs_compute.png")
             if (out / p).exists()]
    if plots:
        lines += [""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    summary = {"machine": machine(), "budget": cfg.budget, "base": base, "eval": evals,
               "runs": [{k: v for k, v in r.items() if k != "spec"} for r in rows]}
    write_json(out / "results.json", summary)
    return summary


# the plots ----------------------------------------------------------------------------------------------------
def _series_key(row: dict, axis: str) -> str:
    """Runs that differ only in ``axis`` share a line: the key is everything else the run changes."""
    spec = row.get("spec") or {}
    changed = _merge(spec.get("options") or {}, spec.get("grid") or {})
    changed.pop(axis, None)
    for k in (axis, "tokenizer"):
        (changed.get("objective_args") or {}).pop(k, None)
    if isinstance(changed.get("objective_args"), dict) and not changed["objective_args"]:
        changed.pop("objective_args")
    objective = row.get("objective", "")
    rest = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(changed.items()) if k != "objective")
    return objective + (f" ({rest})" if rest else "")


def _random_init_line(ax, rows: List[dict], e: str):
    """The untrained encoder as a dashed reference line, so the plot's scale shows how much pretraining buys."""
    base = [r for r in rows if r["name"] == RANDOM_INIT and r.get(f"{e}_top1") is not None]
    if base:
        ax.axhline(base[0][f"{e}_top1"], color="gray", ls="--", lw=1, label="random init")
        ax.legend(fontsize=7)


def plot_results(out: Path, rows: List[dict], evals: List[str]) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r and any(r.get(f"{e}_top1") is not None for e in evals)]
    written = []
    for axis, label in (("mask_ratio", "mask ratio"), ("decoder_depth", "decoder depth")):
        values = {r.get(axis) for r in good if r.get(axis) is not None}
        if len(values) < 2:
            continue
        fig, axes = plt.subplots(1, len(evals), figsize=(4.5 * len(evals), 3.6), squeeze=False)
        drawn = False
        for ax, e in zip(axes[0], evals):
            series: Dict[str, list] = {}
            for r in good:
                if r.get(axis) is not None and r.get(f"{e}_top1") is not None:
                    series.setdefault(_series_key(r, axis), []).append((r[axis], r[f"{e}_top1"]))
            for key, pts in sorted(series.items()):
                if len({x for x, _ in pts}) < 2:
                    continue
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=key)
                drawn = True
            _random_init_line(ax, good, e)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{e} top-1 (%)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if drawn:
            name = f"accuracy_vs_{axis}.png"
            fig.tight_layout()
            write_via(out / name, lambda f: fig.savefig(f, format="png", dpi=120))
            written.append(name)
        plt.close(fig)
    pts = [r for r in good if r.get("pretrain_flops")]
    if pts:
        fig, axes = plt.subplots(1, len(evals), figsize=(4.5 * len(evals), 3.6), squeeze=False)
        for ax, e in zip(axes[0], evals):
            for r in pts:
                if r.get(f"{e}_top1") is None:
                    continue
                ax.scatter(r["pretrain_flops"] / 1e15, r[f"{e}_top1"], s=18)
                ax.annotate(r["name"], (r["pretrain_flops"] / 1e15, r[f"{e}_top1"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
            _random_init_line(ax, good, e)
            xs = [r["pretrain_flops"] for r in pts]
            if max(xs) > 10 * min(xs):  # a log axis only where the compute spans an order of magnitude
                ax.set_xscale("log")
            ax.set_xlabel("pretraining compute (PFLOPs, forward + backward)")
            ax.set_ylabel(f"{e} top-1 (%)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        write_via(out / "accuracy_vs_compute.png", lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append("accuracy_vs_compute.png")
    if written:  # the table links the plots
        md = out / "results.md"
        text = md.read_text()
        links = "\n".join(f"![{p[:-4].replace('_', ' ')}]({p})" for p in written if f"({p})" not in text)
        if links:
            write_text(md, text + "\n" + links + "\n")
    return written
