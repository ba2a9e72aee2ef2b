"""Weights from the Hugging Face Hub (hf://ORG/NAME[@REVISION]) read offline from a local cache built here in the
cache's documented layout (models--ORG--NAME/{refs,snapshots}); nothing is downloaded."""
import pytest
import torch

from mimkit.checkpoints import export, load_encoder
from mimkit.errors import CheckpointError
from mimkit.models import create_mae

hub = pytest.importorskip("huggingface_hub")
COMMIT, OLD = "a" * 40, "b" * 40


def _cached_repo(cache, repo, commit, refs, fill):
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    fill(snap)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE in tmp, HF_HUB_OFFLINE=1; org/tiny-mae (HF ViTMAE folder) at main, and an older commit tagged
    v1; org/official (an official-layout MAE .pth, one file) at main."""
    from huggingface_hub import constants
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    new, old = create_mae("vit_micro_patch4_32"), create_mae("vit_micro_patch4_32")
    _cached_repo(root, "org/tiny-mae", COMMIT, ["main"], lambda d: export(new, "hf", d))
    _cached_repo(root, "org/tiny-mae", OLD, ["v1"], lambda d: export(old, "hf", d))
    _cached_repo(root, "org/official", COMMIT, ["main"],
                 lambda d: d.mkdir(parents=True) or export(new, "mae", d / "mae_pretrain_vit_micro.pth"))
    return new, old


def _same(encoder, mae):
    want = mae.encoder.state_dict()
    return all(torch.equal(v, want[k]) for k, v in encoder.state_dict().items())


def test_hub_ids_read_from_the_cache_offline(cache):
    """hf://org/tiny-mae is main's weights, @v1 and @COMMIT the older ones, and a single-file official repo
    resolves to its .pth; resolving every id to main (ignoring @REVISION) fails this."""
    new, old = cache
    assert _same(load_encoder("hf://org/tiny-mae"), new)
    assert _same(load_encoder("hf://org/tiny-mae@v1"), old)
    assert _same(load_encoder(f"hf://org/tiny-mae@{OLD}"), old)
    assert _same(load_encoder("hf://org/official"), new)
    assert _same(load_encoder("hf://org/official/mae_pretrain_vit_micro.pth"), new)


def test_not_cached_and_unknown_revision_are_one_line(cache):
    """A repository not in the cache while offline, and a revision the cache does not hold, name themselves."""
    with pytest.raises(CheckpointError, match=r"hf://org/missing: org/missing is not in the local Hugging Face "
                                              r"cache .* and HF_HUB_OFFLINE is set") as e:
        load_encoder("hf://org/missing")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"revision 'v9' of org/tiny-mae is not in the local cache .*"
                                              r"\(cached: main, v1\)"):
        load_encoder("hf://org/tiny-mae@v9")
    with pytest.raises(CheckpointError, match=r"expected hf://ORG/NAME"):
        load_encoder("hf://justaname")


def test_official_release_on_the_hub_inits_pretraining_and_evaluates(cache, tmp_path):
    """--init hf://... starts pretraining from the cached official-layout weights and knn --checkpoint hf://...
    evaluates them, both offline (the CLI path: the options' file check must let hf:// through); the run exported
    --to hf loads with transformers' from_pretrained and AutoImageProcessor and its model card names the data,
    the objective and the k-NN result (a card without the run's config or metrics fails this)."""
    import json
    from mimkit.cli import main
    from mimkit.checkpoints import load_latest
    assert main(["pretrain", "--init", "hf://org/official", "--model", "vit_micro_patch4_32", "--epochs", "1",
                 "--max-steps", "1", "--batch-size", "16", "--num-workers", "0", "--figure-every", "0",
                 "--output", str(tmp_path / "run"), "--lr", "1e-12", "--eval-every", "1", "--eval-images",
                 "100"]) == 0
    state = load_latest(tmp_path / "run")
    want = cache[0].encoder.state_dict()
    got = {k[len("model.encoder."):]: v for k, v in state["model"].items() if k.startswith("model.encoder.")}
    assert got and all(torch.allclose(v, want[k], atol=1e-6) for k, v in got.items() if k in want)
    assert main(["knn", "--checkpoint", "hf://org/official", "--output", str(tmp_path / "knn"), "--feature-cache",
                 "", "--num-workers", "0", "--train-images", "200"]) == 0
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["top1"] > 0
    assert main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 0
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf"))
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    import numpy as np
    pixels = processor(images=[np.zeros((40, 48, 3), dtype=np.uint8)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and model.config.hidden_size == 96
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "data: `builtin`" in card and "objective: mae" in card and "k-NN top-1" in card
