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
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from .errors import CheckpointError
from .files import fsync_dir, write_atomic, write_tmp

log = logging.getLogger("mimkit")
CKPT_RE = re.compile(r"checkpoint-(\d+)\.pt$")


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` atomically with its checksum; on failure (a full disk) the old files stay intact.

    The bytes go to a temporary file first (where a full disk fails, before anything is committed). A new
    file then gets its ``.sha256`` before the rename, so a committed checkpoint always has one. When ``path``
    already exists, its old sidecar is removed before the rename and the new one written after it: at no
    moment does a sidecar sit beside bytes it does not describe (which would make a whole file look damaged).
    """
    path = Path(path)
    _check_weights_only(state, "state")
    side = path.with_name(path.name + ".sha256")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest().encode()
        tmp = write_tmp(path, data)
        if path.exists():
            side.unlink(missing_ok=True)
            fsync_dir(path.parent)
            os.replace(tmp, path)
            write_atomic(side, digest)
        else:
            write_atomic(side, digest)
            try:
                os.replace(tmp, path)
            except BaseException:
                side.unlink(missing_ok=True)
                raise
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


_PLAIN = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device, torch.Size)  # exact types


def tensor_copies(named: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Own, contiguous CPU storage per tensor (safetensors refuses shared or strided ones)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in named.items()}


def save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[dict] = None) -> Path:
    """A ``.safetensors`` file of ``tensors`` (copied as :func:`tensor_copies`), written atomically."""
    from safetensors.torch import save
    path = Path(path)
    data = save(tensor_copies(tensors), metadata={"format": "pt", **(metadata or {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, data)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None
    return path


def _check_weights_only(obj, where: str):
    """Refuse to write what ``weights_only`` loading could not read back (numpy scalars, custom classes, ...)."""
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key")
            _check_weights_only(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
    elif not (type(obj) in _PLAIN or isinstance(obj, torch.Tensor)):  # numpy.float64 is a float subclass
        raise CheckpointError(f"cannot save {where}: a {type(obj).__module__}.{type(obj).__qualname__} would not "
                              f"load with weights_only (use tensors, numbers, strings, lists and dicts)")


def check_state_dict(expected, got, source: str, strict: bool = True):
    """Compare a loaded state dict with a model's (``expected``: module or state dict) before loading it.

    Every value must be a tensor of the expected shape; floating point may change precision, any other dtype
    must match exactly. With ``strict``, missing and unexpected names are errors too. Raises
    :class:`CheckpointError` naming the first offending tensor.
    """
    if isinstance(expected, torch.nn.Module):
        expected = expected.state_dict()
    if not isinstance(got, dict):
        raise CheckpointError(f"{source}: expected a mapping of tensor names to tensors, got {type(got).__name__}")
    for name, value in got.items():
        if name not in expected:
            if strict:
                raise CheckpointError(f"{source}: unexpected tensor {name!r}")
            continue
        want = expected[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(want.shape)}")
        if value.dtype != want.dtype and not (value.dtype.is_floating_point and want.dtype.is_floating_point):
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {value.dtype}, expected {want.dtype}")
    if strict:
        missing = [n for n in expected if n not in got]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")


def load_checkpoint(path, map_location="cpu", verify: bool = True) -> dict:
    """Read a checkpoint safely: checksum verified when present, ``weights_only`` always."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    data = path.read_bytes()
    side = path.with_name(path.name + ".sha256")
    if verify and side.is_file() and side.read_bytes().strip() != hashlib.sha256(data).hexdigest().encode():
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
            log.info("%s: using checkpoint %s", run_dir, path)
            return state
        except CheckpointError as e:
            log.warning("%s; falling back to the previous checkpoint", e)
    return None


def checkpoint_run_id(path) -> Optional[str]:
    """The run id a checkpoint records (None: none, or unreadable); reads the small pickle, not the tensors (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or foreign: not provably this run's, so never pruned
        return None
    return state.get("run_id") if isinstance(state, dict) else None


def prune_checkpoints(run_dir, keep: int, run_id: Optional[str] = None):
    """Keep the newest ``keep`` checkpoints; with ``run_id``, only checkpoints recording that run are counted and
    deleted, so a run never removes another run's files."""
    ours = list_checkpoints(run_dir)
    if run_id is not None:
        ours = [p for p in ours if checkpoint_run_id(p) == run_id]
    for path in ours[:-keep]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    d = Path(run_dir) / "checkpoints"
    if d.is_dir():  # sidecars or temporaries left by a killed writer
        names = {p.name for p in list_checkpoints(run_dir)}
        for p in d.iterdir():
            if (p.name.endswith(".sha256") and p.name[:-7] not in names) or ".tmp" in p.name:
                p.unlink(missing_ok=True)
