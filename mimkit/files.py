"""Writing files so that a crash, a kill or a full disk never leaves a half-written one: the one atomic writer.

Every file the project writes (checkpoints, configs, results, exports, figures' JSON) goes through
:func:`write_atomic`: the bytes go to a temporary file beside the target, are flushed and fsynced, then
renamed over it, and the folder is fsynced. On failure the temporary file is removed and the old file
is intact. The standard library has the pieces but no such function, hence this small module.
"""
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import yaml

PathLike = Union[str, os.PathLike]


def fsync_dir(path: PathLike):
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_tmp(path: PathLike, data: bytes) -> Path:
    """Write ``data`` beside ``path`` under a temporary name, flushed and fsynced; nothing is left on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace(tmp: PathLike, path: PathLike):
    """Rename ``tmp`` over ``path`` and make it durable; ``tmp`` is removed if that fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(Path(path).parent)


def write_atomic(path: PathLike, data: bytes) -> Path:
    """``data`` to ``path`` atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace(write_tmp(path, data), path)
    return path


def write_via(path: PathLike, save: Callable[[BinaryIO], None]) -> Path:
    """What a library's own ``save(file)`` writes (a PNG, an .npy, a plot), written atomically: the bytes are made
    in memory first, so a crash or a full disk never leaves a half-written figure or array."""
    buf = io.BytesIO()
    save(buf)
    return write_atomic(path, buf.getvalue())


def write_text(path: PathLike, text: str) -> Path:
    return write_atomic(path, text.encode())


def write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """A JSON file (paths and other objects as strings), written atomically."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def write_yaml(path: PathLike, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))
