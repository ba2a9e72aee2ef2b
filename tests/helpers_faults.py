"""Helpers for the fault, bad-data and safe-loading tests.

* ``SyntheticLoader``: deterministic random images, resumable (``set_epoch(epoch, start_batch)``), so the
  engine can be tested in-process without decoding files.
* ``FaultyObjective``: the micro MAE with faults injected by the number of forward calls: a NaN or infinite
  loss, a SIGTERM to its own process, a hang, or an exception on one rank.
* ``make_fuzz_folder``: every kind of broken, odd or hostile image file a real data set contains;
  ``noise_folder``: a plain labeled folder of noise images.
* Run as a script, this module is the ``mimkit`` command with ``FaultyObjective`` registered as the objective
  ``faulty`` (its faults come from ``--objective-args``); the subprocess tests drive it like ``mimkit``.
"""
import dataclasses
import io
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (python tests/helpers_faults.py) or under torchrun
    sys.path.insert(0, str(ROOT))

from mimkit.config import opt  # noqa: E402
from mimkit.objectives.base import ObjectiveOptions  # noqa: E402
from mimkit.objectives.mae import MAEObjective  # noqa: E402

# the tiny pretraining run every fault test uses: 900 builtin images, 28 steps of 32 an epoch
TINY = dict(data="builtin", model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            threads=1, num_workers=0, figure_every=0, deterministic=True, base_lr=1e-3, warmup_epochs=0.1,
            log_every=1, device="cpu")  # CPU tests: on a one-GPU machine two torchrun ranks would ask for a second GPU


def flags(options: dict) -> list:
    """{'batch_size': 32, 'resume': True} -> ['--batch-size', '32', '--resume']."""
    out = []
    for k, v in options.items():
        if isinstance(v, bool):
            out.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        elif isinstance(v, dict):
            import yaml
            out += [f"--{k.replace('_', '-')}", yaml.safe_dump(v, default_flow_style=True).strip()]
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def cli_command(command: str, options: dict) -> list:
    """argv that runs ``mimkit COMMAND`` (with the ``faulty`` objective available) in a fresh interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), command, *flags(options)]


def child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    return env


_PORTS_GIVEN = set()


def free_port() -> int:
    """A port for a torchrun store. Binding port 0 and releasing it races: the kernel hands the same ephemeral port
    to the next bind anywhere on the machine (the other pytest worker's, gloo's own connections) before torchrun
    binds it. So each pytest-xdist worker draws from its own block below the ephemeral range (32768+ on Linux),
    never twice in one process, and checks the port binds now."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + 1000 * (index % 12)
    rng = random.Random(os.getpid())
    for _ in range(200):
        port = rng.randrange(low, low + 1000)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {low}..{low + 999}")


class SyntheticLoader:
    """``n`` random images; epoch ``e``'s batch ``b`` depends only on (seed, e, b); the engine's loader protocol."""

    def __init__(self, n: int = 32, batch_size: int = 8, img_size: int = 32, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.img_size, self.seed = n, batch_size, img_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch, self.skipped = 0, 0, {}

    @property
    def num_images(self):
        return self.n

    def __len__(self):
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        G = self.batch_size * self.world_size
        for b in range(self.start_batch, len(self)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + b)
            x = torch.randn(G, 3, self.img_size, self.img_size, generator=g)
            part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            yield x[part], torch.zeros(self.batch_size, dtype=torch.long)


class FaultyObjective(MAEObjective):
    """The MAE objective with faults by forward call number (1-based, counted in this process).

    ``nan_at`` / ``inf_at``: calls whose loss is NaN / +inf (``nan_from``: every call from there on; ``nan_rank``:
    only on that rank);
    ``sigterm_at`` (+ ``sigterm_rank``): the call that sends SIGTERM to this process; ``hang_at``: the call that
    sleeps forever;
    ``raise_at`` (+ ``raise_rank``): the call that raises RuntimeError on that rank.
    """
    name = "faulty"

    def __init__(self, model, nan_at=(), inf_at=(), nan_from=0, sigterm_at=0, sigterm_rank=-1, hang_at=0, raise_at=0,
                 raise_rank=-1, nan_rank=-1):
        super().__init__(model)
        self.nan_at, self.inf_at, self.nan_from = set(nan_at), set(inf_at), nan_from
        self.sigterm_at, self.sigterm_rank, self.hang_at = sigterm_at, sigterm_rank, hang_at
        self.raise_at, self.raise_rank, self.nan_rank = raise_at, raise_rank, nan_rank
        self.calls = 0

    description = "MAE with injected faults (tests only)"
    paper_mask_ratio = 0.75

    @dataclasses.dataclass
    class Options(ObjectiveOptions):
        nan_at: Any = opt((), "calls whose loss is NaN")
        inf_at: Any = opt((), "calls whose loss is +inf")
        nan_from: int = opt(0, "every call from here on is NaN")
        sigterm_at: int = opt(0, "the call that sends SIGTERM")
        sigterm_rank: int = opt(-1, "the rank that sends it (-1: all)")
        hang_at: int = opt(0, "the call that sleeps forever")
        raise_at: int = opt(0, "the call that raises")
        raise_rank: int = opt(-1, "the rank that raises (-1: all)")
        nan_rank: int = opt(-1, "the rank whose losses nan_at/nan_from spoil (-1: all)")

    @classmethod
    def from_config(cls, cfg, options=None):
        base = MAEObjective.from_config(cfg, MAEObjective.Options())  # the faults are ours
        return cls(base.model, **dataclasses.asdict(options or cls.Options()))

    def forward(self, images, labels=None, rng=None):
        self.calls += 1
        c = self.calls
        rank = int(os.environ.get("RANK", "0"))
        if c == self.raise_at and self.raise_rank in (-1, rank):
            raise RuntimeError(f"injected failure on rank {rank} at call {c}")
        if c == self.sigterm_at and self.sigterm_rank in (-1, rank):
            os.kill(os.getpid(), signal.SIGTERM)
        if c == self.hang_at:
            while True:
                time.sleep(1)
        loss = super().forward(images, labels, rng)
        if (c in self.nan_at or (self.nan_from and c >= self.nan_from)) and self.nan_rank in (-1, rank):
            return loss * float("nan")
        if c in self.inf_at:
            return loss * float("inf")
        return loss


def register_faulty():
    from mimkit.objectives import register
    register(FaultyObjective)


def tiny_cfg(tmp_path, **overrides):
    """A PretrainConfig for in-process engine runs (the data options are unused there)."""
    from mimkit.config import PretrainConfig, load_config
    register_faulty()
    opts = {**TINY, "batch_size": 8, "epochs": 2, "output": str(tmp_path / "run"), "objective": "faulty"}
    opts.update(overrides)
    return load_config(PretrainConfig, overrides=opts)


def fit_tiny(cfg, loader=None, **objective_args):
    """Run the engine in-process on synthetic data with a FaultyObjective; returns (result, objective, optimizer)."""
    from mimkit.engine import fit, seed_everything, setup
    from timm.optim import create_optimizer_v2
    env = setup(cfg)
    seed_everything(cfg.seed)
    task = FaultyObjective.from_config(cfg)
    for k, v in objective_args.items():
        setattr(task, k, set(v) if k in ("nan_at", "inf_at") else v)
    opt = create_optimizer_v2(task, "adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    result = fit(task, opt, loader or SyntheticLoader(batch_size=cfg.batch_size), cfg, cfg.output, env)
    return result, task, opt


def run_logged(argv, timeout: float, env=None, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with text output and a timeout that kills the whole process group (no stray children)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or child_env(),
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(map(str, argv))} did not end within {timeout} s (a hang)\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


# a folder of broken, odd and hostile image files (test_fuzz_data) ----------------------------------------
SAMPLE = ROOT / "mimkit" / "data" / "sample"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring a huge image over a tiny compressed body (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A whole, decodable black PNG of side x side pixels that compresses ~1000:1: a real decompression bomb
    (17000 px: 289M pixels, 0.87 GB once decoded, from a file of under 1 MB)."""
    assert side % 1000 == 0
    rows = b"\x00" * ((1 + 3 * side) * 1000)  # 1000 rows of filter byte + RGB, all zero
    z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: one block set, repeated (a full flush makes each
    block = z.compress(rows) + z.flush(zlib.Z_FULL_FLUSH)  # independent), so building it stays fast
    adler = 1
    for _ in range(side // 1000):
        adler = zlib.adler32(rows, adler)
    body = b"\x78\x01" + block * (side // 1000) + z.flush() + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    data = bytearray(encode(noise_image(16, 16), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def noise_folder(root: Path, classes: int, per_class: int, name: str = "c{c}/{i}.png", seed: int = 0,
                 size: int = 32) -> Path:
    """A labeled folder of distinct RGB noise images (one sub-folder a class), for the data and run tests."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for i in range(per_class):
            path = Path(root) / name.format(c=c, i=i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return Path(root)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_fuzz_folder(root: Path, n_good: int = 40):
    """Build the folder; returns (bad, good, ignored): relative names (str, surrogate-escaped for non-UTF-8 names)
    of files training must skip and name, files it must use, and entries that are not images at all."""
    root = Path(root)
    good_dir, fz = root / "good", root / "fuzz"
    good_dir.mkdir(parents=True)
    fz.mkdir()
    sample = sorted(SAMPLE.glob("*/*.jpg"))[::25][:n_good]
    for i, p in enumerate(sample):
        shutil.copy(p, good_dir / f"{i:04d}.jpg")
    bad, good, ignored = set(), {f"good/{i:04d}.jpg" for i in range(len(sample))}, set()

    def put(name, data, is_bad):
        (fz / name).write_bytes(data)
        (bad if is_bad else good).add(f"fuzz/{name}")

    rng = np.random.default_rng(1)
    put("random_bytes.jpg", rng.bytes(5000), True)
    put("text_named.png", b"this is not an image\n" * 10, True)
    put("zero_bytes.jpg", b"", True)
    jpg, png = encode(noise_image(64, 64), "JPEG", quality=90), encode(noise_image(64, 64), "PNG")
    put("truncated.jpg", jpg[:len(jpg) // 2], True)
    put("truncated.png", png[:len(png) // 2], True)
    broken_crc = bytearray(png)
    broken_crc[40] ^= 0xFF  # inside the first IDAT
    put("corrupt_idat.png", bytes(broken_crc), True)
    put("one_pixel.png", encode(noise_image(1, 1), "PNG"), True)
    put("smaller_than_a_patch_3x3.png", encode(noise_image(3, 3), "PNG"), True)
    put("bomb_100000x100000.png", png_declaring(100_000, 100_000), True)
    put("bomb_20000x20000.png", png_declaring(20_000, 20_000), True)  # between PIL's warning and error limits
    put("bomb_65000x65000.jpg", jpeg_declaring(65_000, 65_000), True)
    put("bomb_whole_17000x17000.png", png_bomb(17_000), True)  # decodes fully: only the pixel guard stops it
    # odd but valid: must be used, not skipped
    put("cmyk.jpg", encode(noise_image(40, 40).convert("CMYK"), "JPEG"), False)
    put("grey_16bit.png", encode(Image.fromarray((np.arange(40 * 40, dtype=np.uint16) * 40).reshape(40, 40)), "PNG"),
        False)
    pal = noise_image(40, 40).convert("P", palette=Image.ADAPTIVE, colors=16)
    put("palette_transparent.png", encode(pal, "PNG", transparency=0), False)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    put("exif_rotated.jpg", encode(noise_image(48, 32), "JPEG", exif=exif), False)
    frames = [Image.new("P", (40, 40), c) for c in (10, 200, 90)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    put("animated_gif_content.jpg", gif, False)  # a GIF named .jpg: decoded by content
    put("animated.png", encode(noise_image(40, 40), "PNG", save_all=True, append_images=[noise_image(40, 40, 2)]), False)
    (fz / "animated.gif").write_bytes(gif)
    ignored.add("fuzz/animated.gif")  # not an image extension the loader reads
    # names that are not UTF-8
    raw = os.fsencode(fz)
    with open(os.path.join(raw, b"caf\xe9_latin1.jpg"), "wb") as f:
        f.write(encode(noise_image(40, 40), "JPEG"))
    good.add("fuzz/" + os.fsdecode(b"caf\xe9_latin1.jpg"))
    with open(os.path.join(raw, b"\xff\xfe_broken.jpg"), "wb") as f:
        f.write(rng.bytes(300))
    bad.add("fuzz/" + os.fsdecode(b"\xff\xfe_broken.jpg"))
    # links: a folder loop, a file loop, a dangling link
    os.symlink("..", fz / "loop_dir")
    os.symlink("b_loop.jpg", fz / "a_loop.jpg")
    os.symlink("a_loop.jpg", fz / "b_loop.jpg")
    bad.update({"fuzz/a_loop.jpg", "fuzz/b_loop.jpg"})
    os.symlink("does_not_exist.jpg", fz / "dangling.jpg")
    bad.add("fuzz/dangling.jpg")
    # unreadable: no permissions (root reads it anyway), a named pipe (opening it would block), a folder
    (fz / "no_permission.jpg").write_bytes(encode(noise_image(40, 40), "JPEG"))
    os.chmod(fz / "no_permission.jpg", 0)
    (bad if not os.access(fz / "no_permission.jpg", os.R_OK) else good).add("fuzz/no_permission.jpg")
    os.mkfifo(fz / "named_pipe.jpg")
    bad.add("fuzz/named_pipe.jpg")
    (fz / "folder.jpg").mkdir()
    ignored.add("fuzz/folder.jpg")
    return bad, good, ignored


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def current_rss() -> int:
    """This process's resident memory now, bytes (Linux /proc)."""
    return 1024 * _status_kb("VmRSS")


def peak_rss() -> int:
    """The peak resident memory of this process and of its finished children (data loader workers), bytes.

    This process's own peak is /proc's VmHWM, which belongs to its address space and starts anew at exec; not
    getrusage's ru_maxrss, which Linux carries across exec: a command started from a large parent (pytest after
    hundreds of tests) would report the parent's size as its own peak. The workers are forked from this process
    (no exec), so their ru_maxrss is their own."""
    import resource
    return max(1024 * _status_kb("VmHWM"), 1024 * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


if __name__ == "__main__":  # the mimkit command, plus the 'faulty' objective
    register_faulty()
    from mimkit.cli import main
    report = os.environ.get("MIMKIT_TEST_MEMORY_REPORT")
    if report:  # the baseline is taken after every import training needs, so the report is the training's own cost
        import json
        import mimkit.pretrain  # noqa: F401
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            pass
        baseline = current_rss()
        code = main(sys.argv[1:])
        Path(report).write_text(json.dumps({"baseline": baseline, "peak": peak_rss()}))
        sys.exit(code)
    sys.exit(main(sys.argv[1:]))
