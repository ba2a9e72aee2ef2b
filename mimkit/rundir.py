"""Run directories: one run per folder, so no run is ever overwritten or pruned by another.

A command that trains (pretrain, linprobe, finetune, tokenizer train) claims its ``--output`` before any
work: an empty ``--output`` means a new folder ``runs/<command>-<YYYYmmdd-HHMMSS>`` (a suffix keeps two
runs started in the same second apart); a folder that already holds a run (checkpoints, metrics,
results) is refused unless ``--resume`` continues it or ``--overwrite`` moves it aside to
``<folder>.old-<time>`` (never deleted). ``run.json`` records the run's id; every checkpoint records it
too, and pruning deletes only checkpoints of the current run. Under torchrun only rank 0 touches the
file system; the others receive the path (or the error) from it.
"""
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from .errors import ConfigError
from .files import write_json

log = logging.getLogger("mimkit")
RUN_FILE = "run.json"
RUNS_ROOT = "runs"
# what a run leaves in its folder; any of them means the folder holds a run
MARKERS = ("checkpoints", "metrics.jsonl", "results.json", "tokenizer.pt", RUN_FILE)


def run_contents(path) -> List[str]:
    """The markers of a run found in ``path`` (an empty ``checkpoints/`` folder does not count)."""
    path = Path(path)
    found = []
    for name in MARKERS:
        p = path / name
        if p.is_dir() and any(p.iterdir()) or p.is_file():
            found.append(name)
    return found


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _new_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ...: the first that did not exist, created here (atomic: mkdir)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        p = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run directory beside {base}")


def _move_aside(path: Path) -> Path:
    for n in range(1, 10_000):
        aside = path.with_name(f"{path.name}.old-{_stamp()}" + ("" if n == 1 else f"-{n}"))
        if not aside.exists():
            os.rename(path, aside)
            return aside
    raise ConfigError(f"--overwrite: could not move {path} aside")


def claim(output: str, command: str, resume: bool = False, overwrite: bool = False, guard: bool = True,
          facts: Optional[dict] = None) -> Path:
    """The run directory for a new (or, with ``resume``, continued) run, created, with its ``run.json``
    (``facts``, such as the precision ``auto`` chose, are recorded in it beside the id).

    ``guard=False`` (an evaluation that only writes its results) skips the one-run-per-folder check.
    """
    if not output:
        if resume:
            raise ConfigError("--resume needs --output: the run directory to continue")
        path = _new_folder(Path(RUNS_ROOT) / f"{command}-{_stamp()}")
        log.info("run directory: %s", path)
    else:
        path = Path(output)
        found = run_contents(path) if guard else []
        if found and not resume:
            if not overwrite:
                raise ConfigError(f"--output {path} already holds a run ({', '.join(found)}); pass --resume to "
                                  f"continue it or --overwrite to move it aside")
            aside = _move_aside(path)
            log.warning("--overwrite: moved the previous run %s to %s", path, aside)
        path.mkdir(parents=True, exist_ok=True)
    if guard and not (resume and (path / RUN_FILE).is_file()):
        write_json(path / RUN_FILE, {"run_id": uuid.uuid4().hex[:16], "command": command,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(facts or {})})
    return path


def prepare(cfg, command: str, env) -> Path:
    """Claim ``cfg.output`` for this run (see :func:`claim`) on the main process, share the result with the
    others, and return the folder (``cfg`` is left as given). Call before any work that writes."""
    result: list = [None, None]
    if env.is_main:
        try:
            facts = {"precision": env.precision, "device": str(env.device)}  # what --precision auto chose, kept
            result[0] = str(claim(cfg.output, command, getattr(cfg, "resume", False), getattr(cfg, "overwrite", False),
                                  guard=hasattr(cfg, "resume"), facts=facts))
        except ConfigError as e:
            result[1] = str(e)
    if env.distributed:  # the others wait for the main process to create (or move) the folder
        dist.broadcast_object_list(result, src=0)
    if result[1]:
        raise ConfigError(result[1])
    return Path(result[0])


def add_facts(path, facts: dict):
    """Add what the run resolved after its start (the mask ratio, the pixel spec) to ``path/run.json``; a command
    that claims no run (an evaluation that only writes its results) has none, and gets none."""
    f = Path(path) / RUN_FILE
    try:
        known = json.loads(f.read_text())
    except (OSError, ValueError):
        return
    write_json(f, {**known, **facts})


def run_id(path, create: bool = False) -> Optional[str]:
    """The id in ``path/run.json``; with ``create``, a new one is written when the folder has none (a direct
    ``engine.fit`` call that skipped :func:`prepare`)."""
    f = Path(path) / RUN_FILE
    try:
        return json.loads(f.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        if not create:
            return None
    rid = uuid.uuid4().hex[:16]
    write_json(f, {"run_id": rid, "command": "fit", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return rid
