"""Bad data: a folder of broken, odd and hostile files. Training over it finishes, skips and names each bad file,
reports the count, and stays within bounded time and memory; odd but valid images are used, not skipped."""
import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helpers_faults import SAMPLE, TINY, noise_image, child_env, cli_command, encode, make_fuzz_folder

torch.set_num_threads(1)
PATCH = 4  # vit_micro_patch4_32
TINY_NAMES = {"fuzz/one_pixel.png", "fuzz/smaller_than_a_patch_3x3.png"}
PIPE = "fuzz/named_pipe.jpg"
# Peak resident memory of training (main process or its loader worker) above the same process's resident memory
# after its imports, which differ between environments (1.51 GiB absolute in CI's system Python, less in a venv).
# The need: a guarded decode of these files costs a few MB; the whole 17000 x 17000 bomb, if decoded, costs 0.87 GB
# (the bombs with a truncated body cost little even unguarded: their pixel memory is allocated but never touched).
# Training the micro model over this folder measured 58 MiB above the baseline (730 MiB) in one run and 587 MiB
# in the clean-clone CI run of 2026-11-30 (cause not yet found: see the closing note); 768 MiB passes that and
# stays below what the whole bomb's pixels alone would cost (0.81 GiB).
MEMORY_LIMIT = 768 * 2 ** 20


class Hang(Exception):
    """Not an OSError (a TimeoutError would be taken for an unreadable file and turned into a BadImage)."""


@contextmanager
def deadline(seconds: int, what: str):
    def fail(*_):
        raise Hang(f"{what}: still running after {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _shown(name: str) -> str:
    """How a (possibly non-UTF-8) file name appears in the log on stderr (Python escapes lone surrogates)."""
    return name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "data"
    bad, good, ignored = make_fuzz_folder(root)
    return root, bad, good, ignored


def test_the_fuzz_folder_lists_what_it_should(fuzz):
    from mimkit.data import open_images
    root, bad, good, ignored = fuzz
    names = set(open_images(root).names)
    assert names == bad | good, (names ^ (bad | good))
    assert not names & ignored
    print(f"\n[fuzz] bad files: {len(bad)}, odd but valid files: {len(good) - 40}, not images: {len(ignored)}")


def test_every_file_decodes_to_rgb_or_is_a_bad_image(fuzz):
    """Decoding never raises anything but BadImage, never hangs, and reads odd valid images correctly."""
    from mimkit.data import load_image, open_images
    from mimkit.errors import BadImage
    root, bad, good, _ = fuzz
    src = open_images(root)
    tried = 0
    for i, name in enumerate(src.names):
        if name == PIPE:
            continue  # see test_a_named_pipe_does_not_block
        with deadline(10, f"decoding {name!a}"):
            try:
                img = load_image(src, i)
            except BadImage as e:
                assert name in bad, f"{name!a} is valid but was refused: {e}"
                assert e.name == name and "\n" not in str(e)
            else:
                assert img.mode == "RGB"
                assert name in good or name in TINY_NAMES, f"{name!a} is broken but decoded"
                if name in TINY_NAMES:
                    assert min(img.size) < PATCH
                if name == "fuzz/exif_rotated.jpg":
                    assert img.size == (32, 48)  # stored 48x32 with 'rotate 90': upright is 32 wide
        tried += 1
    assert tried == len(src.names) - 1


def test_a_named_pipe_does_not_block(fuzz):
    from mimkit.data import load_image, open_images
    from mimkit.errors import BadImage
    root, _, _, _ = fuzz
    src = open_images(root)
    with deadline(5, "reading a named pipe"), pytest.raises(BadImage):
        load_image(src, src.names.index(PIPE))


def _training_folder(root: Path, dest: Path, drop=()):
    """A copy of the fuzz folder without ``drop``, topped up with good images so that every file falls into a
    batch of 8 (no image left out by drop_last)."""
    skip = {Path(root, n) for n in drop}
    shutil.copytree(root, dest, symlinks=True, ignore=lambda d, names: [n for n in names if Path(d, n) in skip])
    from mimkit.data import open_images
    n, extra = len(open_images(dest)), 0
    samples = sorted(SAMPLE.glob("*/*.jpg"))[1::25]
    while (n + extra) % 8:
        shutil.copy(samples[extra], dest / "good" / f"extra{extra}.jpg")
        extra += 1
    return [f"good/extra{i}.jpg" for i in range(extra)]


@pytest.fixture(scope="module")
def trained(fuzz, tmp_path_factory):
    """``mimkit pretrain`` over the fuzz folder (without the named pipe, which hangs, and the images smaller than
    a patch, tested on their own below), two epochs, one worker process."""
    root, bad, good, _ = fuzz
    tmp = tmp_path_factory.mktemp("fuzzrun")
    data = tmp / "data"
    extra = _training_folder(root, data, drop=[PIPE, *TINY_NAMES])
    opts = {**TINY, "data": str(data), "output": str(tmp / "run"), "batch_size": 8, "epochs": 2, "val_fraction": 0,
            "num_workers": 1, "cache": "auto", "log_every": 100}
    t0 = time.time()
    report = tmp / "memory.json"
    proc = subprocess.Popen(cli_command("pretrain", opts), env=child_env(MIMKIT_TEST_MEMORY_REPORT=str(report)),
                            stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "stderr.log", "w"), start_new_session=True)
    status, usage = None, None
    while time.time() - t0 < 300:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"training over the fuzz folder hung:\n{(tmp / 'stderr.log').read_text()[-3000:]}")
    proc.returncode = os.waitstatus_to_exitcode(status)
    log = (tmp / "stderr.log").read_text(errors="replace")
    expect_bad = bad - {PIPE} - TINY_NAMES
    expect_good = (good | set(extra)) - TINY_NAMES
    import json
    memory = json.loads(report.read_text()) if report.is_file() else {"baseline": 0, "peak": usage.ru_maxrss * 1024}
    return dict(rc=proc.returncode, log=log, seconds=time.time() - t0, growth=memory["peak"] - memory["baseline"],
                memory=memory, data=data, bad=expect_bad, good=expect_good)


def test_training_over_the_fuzz_folder_finishes_and_names_every_bad_file(trained):
    """Training finishes, names every bad file, and its memory stays bounded. Loosening the bomb guard
    (``Image.MAX_IMAGE_PIXELS = 2 ** 29`` in mimkit/data/decode.py, which lets the whole 17000 x 17000 bomb decode)
    fails the memory bound."""
    t = trained
    assert t["rc"] == 0, t["log"][-3000:]
    assert "Traceback" not in t["log"] and "Logging error" not in t["log"], t["log"][-3000:]
    named = re.findall(r"skipping image (.+?): ", t["log"])
    for name in t["bad"]:
        shown = _shown(os.path.join(str(t["data"]), name))
        assert shown in named, f"{name!a} was not named as skipped"
    for name in t["good"]:
        assert _shown(os.path.join(str(t["data"]), name)) not in named, f"valid {name!a} was skipped"
    m = re.search(r"skipped (\d+) unreadable image file\(s\)", t["log"])
    assert m and int(m.group(1)) == len(t["bad"]), (m and m.group(0), len(t["bad"]))
    assert t["growth"] < MEMORY_LIMIT, f"peak memory {t['growth'] / 2**30:.2f} GiB above the baseline ({t['memory']})"
    print(f"\n[fuzz] trained over {len(t['bad'])} bad + {len(t['good'])} good files in {t['seconds']:.0f} s, "
          f"peak RSS {t['growth'] / 2**20:.0f} MiB above {t['memory']['baseline'] / 2**20:.0f} MiB after imports")


def test_each_bad_file_is_named_only_once(trained):
    named = re.findall(r"skipping image (.+?): ", trained["log"])
    repeated = {n for n in named if named.count(n) > 1}
    assert not repeated, repeated


def test_images_smaller_than_a_patch_are_skipped_and_named_not_fatal(tmp_path, caplog):
    from mimkit.config import PretrainConfig, load_config
    from mimkit.pretrain import pretrain
    data = tmp_path / "data"
    data.mkdir()
    for i, p in enumerate(sorted(SAMPLE.glob("*/*.jpg"))[:30]):
        shutil.copy(p, data / f"{i:02d}.jpg")
    (data / "07_one_pixel.png").write_bytes(encode(noise_image(1, 1), "PNG"))
    (data / "15_three_px.png").write_bytes(encode(noise_image(3, 3), "PNG"))
    cfg = load_config(PretrainConfig, overrides={**TINY, "data": str(data), "output": str(tmp_path / "run"),
                                                 "batch_size": 8, "epochs": 1, "val_fraction": 0})
    result = pretrain(cfg)
    assert set(result.skipped_files) == {"07_one_pixel.png", "15_three_px.png"}


def test_the_cached_path_skips_undecodable_files_too(tmp_path):
    """Same-size images are decoded once into memory; the bad ones are found there and named once."""
    from mimkit.config import PretrainConfig, load_config
    from mimkit.pretrain import pretrain
    data = tmp_path / "data"
    data.mkdir()
    for i, p in enumerate(sorted(SAMPLE.glob("*/*.jpg"))[:29]):
        shutil.copy(p, data / f"b{i:02d}.jpg")
    bad = {"a_random.jpg": os.urandom(700), "a_empty.png": b"", "c_truncated.jpg": (SAMPLE / "cat" / "0000.jpg")
           .read_bytes()[:300]}
    for name, blob in bad.items():
        (data / name).write_bytes(blob)
    cfg = load_config(PretrainConfig, overrides={**TINY, "data": str(data), "output": str(tmp_path / "run"),
                                                 "batch_size": 8, "epochs": 2, "val_fraction": 0, "cache": "on",
                                                 "figure_every": 0})
    with deadline(120, "training on the cached path"):
        result = pretrain(cfg)
    assert set(result.skipped_files) == set(bad)
    assert result.step == 2 * (32 // 8)
