"""The model card (README.md) ``mimkit export --to hf`` writes beside the weights: what the model is, the data and
objective it was pretrained with, and the results its run recorded, so a copy on the Hub says where it came from.

What a card can say comes from the run directory of a mimkit checkpoint (``config.yaml``, the ``--eval-every``
k-NN lines of ``metrics.jsonl``, any ``results.json`` of evaluations written into it); weights converted from
another format say only that.
"""
import json
from pathlib import Path
from typing import Optional

import yaml


def _run_dir(path: str) -> Optional[Path]:
    if not path:
        return None
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):  # a run directory, or a file in its checkpoints/
        if (d / "config.yaml").is_file():
            return d
    return None


def model_card(info: dict, arch: dict, weights: str = "ViTMAEForPreTraining") -> str:
    """README.md text for exported weights; ``info`` is the reader's ``checkpoint_info``."""
    run = _run_dir(info.get("path", ""))
    cfg = {}
    if run is not None:
        try:
            cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            cfg = {}
    lines = ["---", "library_name: transformers", "tags: [mimkit, masked-image-modeling, vision]", "---", "",
             f"# {Path(str(run or info.get('path', 'model'))).name}", "",
             f"A ViT ({arch.get('embed_dim')}-d, {arch.get('depth')} blocks, patch {arch.get('patch_size')}, "
             f"{arch.get('img_size')} px) exported by mimkit as `transformers.{weights}`.", ""]
    if cfg:
        ratio = cfg.get("mask_ratio")
        lines += ["## Pretraining", "",
                  f"- data: `{cfg.get('data')}` (held out: {cfg.get('val_fraction')} of each class, never trained on)",
                  f"- objective: {cfg.get('objective')}" + (f", mask ratio {ratio}" if ratio else "")
                  + (", normalised-pixel targets" if cfg.get("norm_pix_loss") else ""),
                  f"- encoder preset: {cfg.get('model')}; {cfg.get('epochs')} epochs at batch {cfg.get('batch_size')} "
                  f"per process, seed {cfg.get('seed')}", ""]
    else:
        where = info.get("path") or "a model in memory"
        lines += ["## Origin", "", f"Converted from a {info.get('format')} checkpoint ({where}); its training data "
                  f"and objective are as its release states.", ""]
    results = _results(run) if run is not None else []
    lines += ["## Results", ""] + (results or ["No evaluation was recorded in the run directory."]) + [""]
    lines += ["## Use", "", "```python", "from transformers import AutoImageProcessor, " + weights,
              "processor = AutoImageProcessor.from_pretrained(PATH)", f"model = {weights}.from_pretrained(PATH)",
              "```", ""]
    return "\n".join(lines)


def _results(run: Path) -> list:
    out = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        knn = [json.loads(line) for line in metrics.read_text().splitlines() if '"knn_top1"' in line]
        if knn:
            last = knn[-1]
            out.append(f"- k-NN top-1 on held-out images during pretraining (--eval-every): {last['knn_top1']:.2f}% "
                       f"after epoch {last.get('epoch', -1) + 1} (step {last['step']})")
    for path in sorted(run.rglob("results.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "top1" in r:
            out.append(f"- {r.get('command', path.parent.name)}: top-1 {r['top1']:.2f}% on {r.get('num_val', '?')} "
                       f"held-out images ({path.relative_to(run)})")
    return out
