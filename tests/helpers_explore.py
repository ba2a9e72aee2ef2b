"""What the explore tests share: a checkpoint of a few steps made here, a small image folder, the CLI in-process."""
import json
import shutil
from pathlib import Path

import mimkit.data
from mimkit.cli import main

SAMPLE = Path(mimkit.data.__file__).parent / "sample"


def cli(*args) -> int:
    return main([str(a) for a in args])


def make_run(out: Path, data="builtin", steps: int = 3) -> Path:
    """A tiny MAE pretrained for ``steps`` steps (fp32 on the CPU, one thread)."""
    assert cli("pretrain", "--data", data, "--model", "vit_micro_patch4_32", "--decoder-dim", "32", "--decoder-depth",
               "1", "--decoder-heads", "2", "--batch-size", "16", "--max-steps", steps, "--precision", "fp32",
               "--device", "cpu", "--threads", "1", "--num-workers", "0", "--figure-every", "0", "--output", out) == 0
    return out


def make_folder(root: Path, per_class: int = 6) -> Path:
    """Three classes of the built-in sample."""
    for cls in ("cat", "ship", "truck"):
        (root / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(f, root / cls / f.name)
    return root


def cli_loss(checkpoint, images, out: Path, ratio: float, seed: int = 0, masking: str = "random") -> float:
    """`mimkit reconstruct`'s loss on the hidden patches of one image file."""
    assert cli("reconstruct", "--checkpoint", checkpoint, "--data", images, "--num-images", 1, "--mask-ratio", ratio,
               "--seed", seed, "--masking", masking, "--output", out) == 0
    score = json.loads((out / "results.json").read_text())
    assert score["images"] == 1
    return score["masked_mse"]
