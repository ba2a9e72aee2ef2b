"""Writing and reading checkpoints so that nothing is lost and nothing foreign runs.

A checkpoint is a ``torch.save`` file of plain containers and tensors, always read back
with ``weights_only=True`` (a pickle that would run code is refused). It is written to a
temporary file, flushed and fsynced, then renamed into place; a ``.sha256`` file beside
it (renamed before the checkpoint, so it is never missing for a committed file) lets a
reader prove the bytes are whole. The newest few are kept; a damaged newest one falls
back to the one before.
"""
import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import List, Optional

import torch

log = logging.getLogger("mimkit")
CKPT_RE = re.compile(r"checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` atomically with its checksum; on failure (a full disk) the old files stay intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:
        _write_atomic(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
        _write_atomic(path, data)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from None
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path, map_location="cpu", verify: bool = True) -> dict:
    """Read a checkpoint safely: checksum verified when present, ``weights_only`` always."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    data = path.read_bytes()
    side = path.with_name(path.name + ".sha256")
    if verify and side.is_file() and side.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is damaged (checksum mismatch)")
    return safe_torch_load(io.BytesIO(data), str(path), map_location)


def safe_torch_load(f, name: str, map_location="cpu"):
    """``torch.load`` that never unpickles code; says so clearly when a file would need it."""
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError for foreign objects
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "Unpickl" in type(e).__name__:
            raise CheckpointError(f"refusing to load {name}: it holds Python objects beyond tensors, which could run "
                                  f"code on load (only weights_only files are read)") from None
        raise CheckpointError(f"cannot read checkpoint {name}: {msg.splitlines()[0] if msg else type(e).__name__}") from None


def list_checkpoints(run_dir) -> List[Path]:
    """Checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(run_dir, map_location="cpu") -> Optional[dict]:
    """The newest checkpoint that loads; damaged ones are skipped with a warning. None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, map_location)
            state["_path"] = str(path)
            return state
        except CheckpointError as e:
            log.warning("%s; falling back to the previous checkpoint", e)
    return None


def prune_checkpoints(run_dir, keep: int):
    for path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    d = Path(run_dir) / "checkpoints"
    if d.is_dir():  # sidecars or temporaries left by a killed writer
        names = {p.name for p in list_checkpoints(run_dir)}
        for p in d.iterdir():
            if (p.name.endswith(".sha256") and p.name[:-7] not in names) or ".tmp" in p.name:
                p.unlink(missing_ok=True)
