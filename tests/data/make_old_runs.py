"""Writes ``tests/data/old-runs/``: run folders as a past mimkit wrote them, for ``tests/test_old_runs.py``.

Run once against the commit whose files the test keeps (issue 20: fc6a980, before the run object)::

    git worktree add /tmp/base fc6a980
    PYTHONPATH=/tmp/base python tests/data/make_old_runs.py tests/data/old-runs

To keep the files at kilobytes, the ``vit_micro_patch4_32`` preset and the 32 px decoder are shrunk in this process
only (width 8, one block): the checkpoints store that arch, which is what every reader rebuilds from. Each folder
gets ``expected.json``: the encoder's class-token features of a seeded input, as that commit computed them.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import mimkit
from mimkit.config import PretrainConfig, load_config
from mimkit.models import presets
from mimkit.pretrain import pretrain

RUNS = {
    "pretrain-mae": {"objective": "mae"},
    "pretrain-mae-grey": {"objective": "mae", "in_chans": 1, "mean": "auto", "std": "auto"},
    "pretrain-simmim": {"objective": "simmim"},
}


def main(root: Path):
    presets.ENCODERS["vit_micro_patch4_32"] = dict(img_size=32, patch_size=4, embed_dim=8, depth=1, num_heads=1)
    presets.DECODERS["small32"] = dict(decoder_dim=8, decoder_depth=1, decoder_heads=1)
    shutil.rmtree(root, ignore_errors=True)
    for name, extra in RUNS.items():
        out = root / name
        cfg = load_config(PretrainConfig, None, dict(
            model="vit_micro_patch4_32", data="builtin", device="cpu", precision="fp32", seed=0, max_steps=2,
            batch_size=8, epochs=1, num_workers=0, figure_every=0, keep_checkpoints=1, output=str(out), **extra))
        pretrain(cfg)
        shutil.rmtree(out / "figures", ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
        encoder = mimkit.load(out)
        encoder = getattr(encoder, "encoder", encoder).eval()
        x = torch.randn(2, encoder.patch_embed.proj.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            feats = encoder.extract(x, "cls")
        (out / "expected.json").write_text(json.dumps({"features": np.asarray(feats).tolist()}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
