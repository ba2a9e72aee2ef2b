"""The command line end to end on a tiny image folder, as a user would run it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import mimkit.data

SAMPLE = Path(mimkit.data.__file__).parent / "sample"


def mimkit_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "mimkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for cls in ("cat", "ship", "truck"):
        files = sorted((SAMPLE / cls).glob("*.jpg"))[:40]
        (root / cls).mkdir()
        for f in files:
            shutil.copy(f, root / cls / f.name)
    return root


TINY = ["--model", "vit_micro_patch4_32", "--threads", "1", "--num-workers", "0"]


def test_pretrain_evaluate_reconstruct_export(tiny_folder, tmp_path):
    run = tmp_path / "run"
    mimkit_cli("pretrain", "--data", tiny_folder, *TINY, "--epochs", "2", "--batch-size", "16", "--decoder-dim", "32",
               "--decoder-depth", "1", "--decoder-heads", "2", "--output", run)
    assert (run / "config.yaml").is_file() and (run / "figures" / "reconstruction.png").is_file()

    for cmd, extra in [("knn", []), ("linprobe", ["--epochs", "2", "--lr", "1.0"]),
                       ("finetune", ["--epochs", "1", "--batch-size", "16", "--blocks", "1"])]:
        out = tmp_path / cmd
        mimkit_cli(cmd, "--checkpoint", run, "--data", tiny_folder, "--threads", "1", "--num-workers", "0",
                   "--output", out, *extra)
        res = json.loads((out / "results.json").read_text())
        assert 0 <= res["top1"] <= res["top5"] <= 100
    mimkit_cli("knn", "--checkpoint", run, "--random-init", "--data", tiny_folder, "--output", tmp_path / "knn-rand")

    figs = tmp_path / "figs"
    mimkit_cli("reconstruct", "--checkpoint", run, "--images", tiny_folder, "--num-images", "4", "--no-grid",
               "--mask-ratio", "0.5", "--output", figs)
    pngs = list(figs.glob("*.png"))
    assert len(pngs) == 4
    w, h = Image.open(pngs[0]).size
    assert w > 3 * h  # four panels side by side
    score = json.loads((figs / "results.json").read_text())
    assert score["images"] == 4 and not score["held_out"] and score["masked_mse"] > 0

    # held-out images: the last 10% of each class (4 of 40 per class), all scored, the grid shows 6 of them
    held = tmp_path / "held"
    proc = mimkit_cli("reconstruct", "--checkpoint", run, "--images", tiny_folder, "--num-images", "6",
                      "--val-fraction", "0.1", "--output", held)
    score = json.loads((held / "results.json").read_text())
    assert score["images"] == 12 and score["held_out"] and score["normalised_target"]
    assert "MSE on hidden patches" in proc.stdout and "12 held-out images" in proc.stdout
    assert (held / "reconstruction-mask0.75-seed0.png").is_file()


def test_config_file_and_flag_override(tiny_folder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {tiny_folder}\nmodel: vit_micro_patch4_32\nepochs: 5\nbatch_size: 16\nmax_steps: 2\n"
                   "threads: 1\nnum_workers: 0\ndecoder_depth: 1\n")
    run = tmp_path / "run"
    mimkit_cli("pretrain", "--config", cfg, "--epochs", "1", "--output", run)
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["batch_size"] == 16 and saved["decoder_depth"] == 1


def test_help_lists_options_and_defaults():
    out = mimkit_cli("pretrain", "--help").stdout
    assert "--mask-ratio" in out and "--precision" in out and "default: auto" in out
    assert all(name in out for name in ("mae", "simmim", "vit_mpp", "beit", "igpt"))  # --objective names them
    assert "vit_tiny_patch4_32" in mimkit_cli("models").stdout


@pytest.mark.parametrize("args,needle", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--mask-ratio", "1.2"], "--mask-ratio"),
    (["--mask-rato", "0.5"], "--mask-ratio"),
])
def test_bad_input_is_one_line(args, needle, tmp_path):
    proc = mimkit_cli("pretrain", *TINY, "--output", tmp_path / "r", *args, check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_empty_folder_and_too_small_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = mimkit_cli("pretrain", *TINY, "--data", empty, "--output", tmp_path / "r", check=False)
    assert proc.returncode == 2 and str(empty) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    small = tmp_path / "small"
    small.mkdir()
    for i in range(4):
        Image.new("RGB", (3, 3), (i, i, i)).save(small / f"{i}.png")
    proc = mimkit_cli("pretrain", *TINY, "--data", small, "--output", tmp_path / "r2", check=False)
    assert proc.returncode == 2 and "0.png" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
