"""A full disk at every step of writing a file: fsync, rename, the checksum file, the metrics and the JSON / YAML
writes. Whatever fails, the previous file stays whole, nothing half-written is left, and the error is clear."""
import errno
import os
from pathlib import Path

import pytest
import torch

import mimkit.checkpoint_files as cio
import mimkit.files as mfiles
from mimkit.checkpoint_files import list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from mimkit.errors import CheckpointError

from helpers_faults import fit_tiny, tiny_cfg

torch.set_num_threads(1)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full(*_, **__):
    raise ENOSPC


def leftovers(d: Path) -> list:
    return [p.name for p in d.iterdir() if ".tmp" in p.name]


@pytest.fixture
def saved(tmp_path):
    """checkpoint-00000002.pt, whole, with its checksum."""
    path = tmp_path / "checkpoints" / "checkpoint-00000002.pt"
    save_checkpoint({"step": 2, "w": torch.full((100,), 2.0)}, path)
    return path


def assert_intact(path: Path):
    assert load_checkpoint(path)["step"] == 2  # verifies the checksum too
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("target", ["new", "overwrite"])
def test_full_at_fsync_keeps_what_was_there(saved, monkeypatch, target):
    """fsync of the temporary file fails: CheckpointError naming the disk, the old checkpoint whole, no temporary
    and no sidecar without its checkpoint. Committing before fsync (or leaving the temporary) fails this."""
    path = saved if target == "overwrite" else saved.with_name("checkpoint-00000004.pt")
    monkeypatch.setattr(mfiles.os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"step": 4, "w": torch.zeros(100)}, path)
    monkeypatch.undo()
    assert_intact(saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["checkpoint-00000002.pt", "checkpoint-00000002.pt.sha256"]


def test_full_at_rename_keeps_the_old_checkpoint(saved, monkeypatch):
    """The rename of a new checkpoint fails: its sidecar (written first) is removed again, the temporary too."""
    real = os.replace

    def rename(src, dst):
        if str(dst).endswith(".pt"):
            raise ENOSPC
        return real(src, dst)

    monkeypatch.setattr(cio.os, "replace", rename)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"step": 4, "w": torch.zeros(100)}, saved.with_name("checkpoint-00000004.pt"))
    monkeypatch.undo()
    assert_intact(saved)
    assert [p.name for p in list_checkpoints(saved.parent.parent)] == ["checkpoint-00000002.pt"]
    assert not saved.with_name("checkpoint-00000004.pt.sha256").exists()


def test_full_at_the_checksum_file_commits_no_checkpoint(saved, monkeypatch):
    """Writing the .sha256 fails: the new checkpoint is not committed (a checkpoint without its checksum could
    not be proven whole), the old one is intact. Renaming the checkpoint before its sidecar fails this."""
    real = mfiles.write_tmp

    def write_tmp(path, data):
        if str(path).endswith(".sha256"):
            raise ENOSPC
        return real(path, data)

    monkeypatch.setattr(mfiles, "write_tmp", write_tmp)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"step": 4, "w": torch.zeros(100)}, saved.with_name("checkpoint-00000004.pt"))
    monkeypatch.undo()
    assert_intact(saved)
    assert not saved.with_name("checkpoint-00000004.pt").exists()


@pytest.mark.parametrize("writer", ["write_json", "write_yaml", "write_text"])
def test_full_during_json_and_yaml_writes_keeps_the_old_file(tmp_path, monkeypatch, writer):
    """Every JSON / YAML / text file goes through mimkit.files: a full disk at the write or at fsync leaves the
    old file's bytes and no temporary. A writer that opened the target itself ('w' truncates first) fails this."""
    path = tmp_path / "results.json"
    getattr(mfiles, writer)(path, {"top1": 1.0} if writer != "write_text" else "old")
    before = path.read_bytes()
    for where in ("write", "fsync"):
        if where == "fsync":
            monkeypatch.setattr(mfiles.os, "fsync", full)
        else:
            monkeypatch.setattr(mfiles, "open", lambda *a, **k: (_ for _ in ()).throw(ENOSPC), raising=False)
        with pytest.raises(OSError, match="No space left"):
            getattr(mfiles, writer)(path, {"top1": 2.0} if writer != "write_text" else "new")
        monkeypatch.undo()
        assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_full_at_the_metrics_keeps_the_checkpoints_and_resume_works(tmp_path, monkeypatch):
    """The metrics file hits a full disk at step 5: the run stops with the OSError, every committed checkpoint
    verifies, and --resume finishes the run like an uninterrupted one."""
    import mimkit.engine as engine
    full_run, _, _ = fit_tiny(tiny_cfg(tmp_path / "a", save_every=2))
    real = engine.Metrics.write

    def write(self, step, **values):
        if step == 5:
            raise ENOSPC
        return real(self, step, **values)

    monkeypatch.setattr(engine.Metrics, "write", write)
    cfg = tiny_cfg(tmp_path / "b", save_every=2)
    with pytest.raises(OSError, match="No space left"):
        fit_tiny(cfg)
    monkeypatch.undo()
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(cfg.output)] == [2, 4]
    resumed, _, _ = fit_tiny(tiny_cfg(tmp_path / "b", save_every=2, resume=True))
    assert resumed.step == full_run.step
    a, b = load_latest(tmp_path / "a" / "run"), load_latest(cfg.output)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
