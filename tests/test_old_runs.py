"""Files written before issue 20 still load: run folders, their config.yaml and checkpoints.

``tests/data/old-runs/`` was written by commit fc6a980 (``tests/data/make_old_runs.py``: an RGB MAE, a one-channel
MAE whose config and arch carry the pixel dict, a SimMIM encoder; shrunk presets keep them at kilobytes). Breaking
it: a config key the reader no longer accepts (``mask_ratio`` or ``pixels`` dropped from ``PretrainConfig``) fails
``test_old_config_loads``; a checkpoint reader that no longer rebuilds the stored arch or pixel spec fails the
features or the k-NN run.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import mimkit
from mimkit.config import KnnConfig, PretrainConfig, load_config

OLD = Path(__file__).parent / "data" / "old-runs"
RUNS = sorted(p.name for p in OLD.iterdir() if p.is_dir())


def test_there_are_old_runs():
    assert {"pretrain-mae", "pretrain-mae-grey", "pretrain-simmim"} <= set(RUNS)


@pytest.mark.parametrize("run", RUNS)
def test_old_config_loads(run):
    cfg = load_config(PretrainConfig, str(OLD / run / "config.yaml"), {})
    assert cfg.mask_ratio == 0.75 and cfg.model == "vit_micro_patch4_32"
    assert bool(cfg.pixels) == (run == "pretrain-mae-grey")


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("where", ["folder", "checkpoint"])
def test_old_weights_give_the_same_features(run, where):
    """fp32 on the CPU, the same seeded input: the features that commit computed, to float rounding."""
    path = OLD / run if where == "folder" else next((OLD / run / "checkpoints").glob("checkpoint-*.pt"))
    model = mimkit.load(path)
    encoder = getattr(model, "encoder", model).eval()
    in_chans = encoder.patch_embed.proj.in_channels
    assert in_chans == (1 if run == "pretrain-mae-grey" else 3)
    x = torch.randn(2, in_chans, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = encoder.extract(x, "cls")
    expected = torch.tensor(json.loads((OLD / run / "expected.json").read_text())["features"])
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)


def test_an_old_grey_run_evaluates(tmp_path):
    """k-NN on an old one-channel run: its stored pixel spec decides how the images are read."""
    from mimkit.eval import knn
    run = tmp_path / "run"
    shutil.copytree(OLD / "pretrain-mae-grey", run)
    cfg = load_config(KnnConfig, None, dict(checkpoint=str(run), data="builtin", device="cpu", precision="fp32",
                                            batch_size=64, num_workers=0, feature_cache="", output=str(tmp_path / "knn")))
    results = knn(cfg)
    assert results["num_val"] > 0 and 0.0 <= results["top1"] <= 100.0


@pytest.mark.parametrize("version, want", [(1, "imagenet"), (2, "recorded")])
def test_rgb_statistics_are_read_as_trained(tmp_path, caplog, version, want):
    """Before checkpoint version 2, 8-bit RGB runs were normalised with ImageNet's statistics whatever --mean/--std
    they recorded: such a checkpoint is read back with ImageNet's (warned), a version-2 one with its own. Reading
    the recorded statistics for an old file (no as_trained) fails the version-1 case; applying it to new files
    fails the version-2 case."""
    import logging
    from mimkit.checkpoint_files import save_checkpoint
    from mimkit.checkpoints import load_encoder
    from mimkit.models import create_encoder
    from mimkit.objectives import OBJECTIVES
    from mimkit.pixels import IMAGENET_MEAN, IMAGENET_STD
    recorded = {"in_chans": 3, "dtype": "uint8", "low": None, "high": None, "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25]}
    arch = dict(encoder=dict(create_encoder("vit_micro_patch4_32").arch, pixels=recorded), decoder_dim=32,
                decoder_depth=1, decoder_heads=2, mask_ratio=0.75, norm_pix_loss=True)
    objective = OBJECTIVES["mae"].build(arch)
    path = save_checkpoint({"format": "mimkit", "version": version, "kind": "mae", "arch": objective.arch,
                            "model": objective.state_dict()}, tmp_path / "checkpoint.pt")
    caplog.set_level(logging.WARNING, logger="mimkit")
    spec = load_encoder(str(path)).pixels
    if want == "imagenet":
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert any("before checkpoint version 2" in r.getMessage() for r in caplog.records)
    else:
        assert list(spec.mean) == recorded["mean"] and list(spec.std) == recorded["std"]
        assert not any("before checkpoint version 2" in r.getMessage() for r in caplog.records)
