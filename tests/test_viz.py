"""Reconstruction figures and their errors, through the command line as a user runs them."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def mimkit_cli(*args):
    return subprocess.run([sys.executable, "-m", "mimkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """60 reddish images in 'a', 8 bluish ones in 'b' (sorted first: all of 'a'), and a tiny MAE run on them."""
    root = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(0)
    for cls, n, colour in (("a", 60, (220, 30, 30)), ("b", 8, (30, 30, 220))):
        (root / cls).mkdir()
        for k in range(n):
            pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{cls}{k:02d}.png")
    run = root.parent / (root.name + "-run")
    proc = mimkit_cli("pretrain", "--data", root, "--model", "vit_micro_patch4_32", "--decoder-dim", "32",
                      "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8", "--max-steps", "2",
                      "--val-fraction", "0.5", "--threads", "1", "--num-workers", "0", "--output", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run


def _original_colours(grid_png, rows: int) -> list:
    """'red' or 'blue' for the original (first) panel of each row of a reconstruction grid: 4 panels a row, each
    32 px enlarged to 128, 2 px padding."""
    grid = np.asarray(Image.open(grid_png).convert("RGB")).astype(int)
    out = []
    for r in range(rows):
        r_, _, b = grid[2 + r * 130 + 64, 2 + 64]
        out.append("red" if r_ > b else "blue")
    return out


def test_reconstruct_shows_every_class_of_a_folder(two_classes, tmp_path):
    """The first images in sorted order are all of class 'a': showing the first --num-images files (the old
    behaviour) fails this."""
    root, run = two_classes
    proc = mimkit_cli("reconstruct", "--checkpoint", run, "--images", root, "--num-images", "4", "--no-grid",
                      "--output", tmp_path / "each")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = sorted(p.name[0] for p in (tmp_path / "each").glob("*.png"))
    assert shown == ["a", "a", "b", "b"]
    assert "+-" in proc.stdout and "standard error" in proc.stdout  # the score states its noise


def test_the_pretraining_figure_shows_every_class(two_classes):
    """30 held-out images of 'a' and 4 of 'b': every 4th held-out image (the old pick) is all 'a'; round-robin
    over the classes shows both."""
    _, run = two_classes
    colours = _original_colours(run / "figures" / "reconstruction.png", 8)
    assert colours.count("blue") == 4 and colours.count("red") == 4


@pytest.mark.parametrize("args, says", [
    (["--num-images", "0"], "--num-images"),
    (["--val-fraction", "0.2", "--images", "ONE"], "--val-fraction 0.2 holds out no image"),
])
def test_reconstruct_user_errors_are_one_line(two_classes, tmp_path, args, says):
    """A user's mistake is one line naming the option, exit 2. The old ValueError for --val-fraction was a traceback
    (exit 1, many lines); without the --num-images check the run gets as far as the loader, whose error names the
    image folder instead of the option."""
    root, run = two_classes
    args = [str(root / "a" / "a00.png") if a == "ONE" else a for a in args]
    proc = mimkit_cli("reconstruct", "--checkpoint", run, "--output", tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
