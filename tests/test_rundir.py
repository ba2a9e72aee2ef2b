"""Runs never overwrite each other: one run per folder, --resume / --overwrite, pruning only this run's files."""
import hashlib
import logging
import re
import time

import pytest
import torch

from mimkit import cli, rundir
from mimkit.checkpoint_files import (checkpoint_run_id, list_checkpoints, load_checkpoint, prune_checkpoints,
                                   save_checkpoint)
from mimkit.config import FinetuneConfig, LinprobeConfig, PretrainConfig, TokenizerConfig, load_config
from mimkit.errors import ConfigError

torch.set_num_threads(1)
TINY = ["--data", "builtin", "--model", "vit_micro_patch4_32", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--batch-size", "16", "--threads", "1", "--num-workers", "0", "--figure-every", "0",
        "--warmup-epochs", "0.1", "--log-every", "1"]


def snapshot(path) -> dict:
    """Every file under ``path`` (TensorBoard's event files aside) and a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def pretrain_cli(capsys, *args) -> tuple:
    code = cli.main(["pretrain", *TINY, *args])
    return code, capsys.readouterr().err.strip()


def test_the_issues_two_commands_leave_the_first_run_intact(tmp_path, capsys):
    """The issue's commands: a second fresh run into runs/x refuses in one line naming --resume and --overwrite,
    and the first run's files are byte for byte what they were. Removing the guard in ``rundir.claim`` fails
    this (the second run prunes the first one's checkpoints and appends to its metrics)."""
    x = tmp_path / "x"
    code, _ = pretrain_cli(capsys, "--output", str(x), "--max-steps", "6", "--save-every", "2")
    assert code == 0
    before = snapshot(x)
    assert [p.name for p in list_checkpoints(x)] == ["checkpoint-00000004.pt", "checkpoint-00000006.pt"]
    code, err = pretrain_cli(capsys, "--output", str(x), "--max-steps", "4", "--save-every", "2", "--seed", "1")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--resume" in err and "--overwrite" in err and str(x) in err
    assert snapshot(x) == before


def test_overwrite_moves_the_old_run_aside_and_the_new_run_is_whole(tmp_path, capsys, caplog):
    """--overwrite renames runs/x to runs/x.old-TIME with every file intact, and runs/x then holds only the new
    run. Deleting the old folder instead of moving it (shutil.rmtree) fails this, as does leaving it in place."""
    x = tmp_path / "x"
    assert pretrain_cli(capsys, "--output", str(x), "--max-steps", "6", "--save-every", "2")[0] == 0
    before = snapshot(x)
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        code, err = pretrain_cli(capsys, "--output", str(x), "--max-steps", "4", "--save-every", "2", "--seed", "1",
                                 "--overwrite")
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("x.old-")]
    assert len(aside) == 1 and re.fullmatch(r"x\.old-\d{8}-\d{6}", aside[0].name)
    assert snapshot(aside[0]) == before
    assert any("moved the previous run" in r.getMessage() for r in caplog.records)
    steps = [load_checkpoint(p)["step"] for p in list_checkpoints(x)]
    assert steps == [2, 4]
    assert all(load_checkpoint(p)["config"]["seed"] == 1 for p in list_checkpoints(x))
    lines = (x / "metrics.jsonl").read_text().splitlines()
    assert max(int(re.search(r'"step": (\d+)', l).group(1)) for l in lines) == 4  # no line of the old run


def test_resume_continues_the_run_in_place(tmp_path, capsys, monkeypatch):
    """--resume into a used folder is allowed and keeps the run id (a new id would orphan the old checkpoints
    from pruning, which this catches by counting them)."""
    import mimkit.engine as engine
    x = tmp_path / "x"
    original = engine.Progress.update

    def crash(self, step, *a, **k):
        original(self, step, *a, **k)
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Progress, "update", crash)
    assert pretrain_cli(capsys, "--output", str(x), "--max-steps", "8", "--save-every", "2")[0] == 130
    monkeypatch.setattr(engine.Progress, "update", original)
    rid = rundir.run_id(x)
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(x)] == [2, 4]
    assert pretrain_cli(capsys, "--output", str(x), "--max-steps", "8", "--save-every", "2", "--resume")[0] == 0
    assert rundir.run_id(x) == rid
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(x)] == [6, 8]
    assert all(checkpoint_run_id(p) == rid for p in list_checkpoints(x))


def test_pruning_deletes_only_the_current_runs_checkpoints(tmp_path):
    """Checkpoints of another run (higher step numbers, or no run id at all) survive pruning; only this run's
    older ones go. Pruning by step number alone (ignoring ``run_id``) fails this: it deletes the new run's."""
    d = tmp_path / "checkpoints"
    for step, rid in ((56, "other"), (60, "other"), (70, None), (10, "me"), (20, "me"), (30, "me")):
        state = {"step": step, "w": torch.zeros(4)}
        if rid:
            state["run_id"] = rid
        save_checkpoint(state, d / f"checkpoint-{step:08d}.pt")
    prune_checkpoints(tmp_path, 1, run_id="me")
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [30, 56, 60, 70]


def test_default_output_is_a_new_folder_per_run_even_in_the_same_second(tmp_path, monkeypatch, caplog):
    """Without --output each run gets runs/COMMAND-YYYYmmdd-HHMMSS, a suffix when the second is taken, and the
    folder is logged. ``mkdir(exist_ok=True)`` in ``rundir._new_folder`` fails this (both runs share a folder)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-120000" if "%H%M%S" in fmt else "t")
    with caplog.at_level(logging.INFO, logger="mimkit"):
        a = rundir.claim("", "pretrain")
        b = rundir.claim("", "pretrain")
    assert a != b and a.is_dir() and b.is_dir()
    assert (a.name, b.name) == ("pretrain-20260101-120000", "pretrain-20260101-120000-2")
    assert rundir.run_id(a) != rundir.run_id(b)
    assert sum("run directory: runs/pretrain-20260101-120000" in r.getMessage() for r in caplog.records) == 2


def test_resume_without_output_and_resume_with_overwrite_are_one_line_errors(capsys, monkeypatch):
    """Both mistakes stop before any work, in one line. Dropping either check in ``config.check_common`` fails."""
    for name, (cls, _, help_) in cli.COMMANDS.items():
        monkeypatch.setitem(cli.COMMANDS, name, (cls, lambda cfg: pytest.fail(f"work started ({cfg})"), help_))
    for argv, pattern in ((["pretrain", "--resume"], "--resume needs --output"),
                          (["pretrain", "--resume", "--overwrite", "--output", "r"], "choose one")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err


@pytest.mark.parametrize("cls,extra", [(LinprobeConfig, {"random_init": True, "model": "vit_micro_patch4_32"}),
                                       (FinetuneConfig, {"random_init": True, "model": "vit_micro_patch4_32"}),
                                       (TokenizerConfig, {}), (PretrainConfig, {"model": "vit_micro_patch4_32"})])
def test_every_training_command_refuses_a_folder_holding_another_run(tmp_path, cls, extra):
    """Each training command claims its folder first: a folder with another run's metrics is refused before any
    work. Removing the ``rundir.prepare`` call from a command fails its case."""
    out = tmp_path / "used"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cfg = load_config(cls, overrides={"output": str(out), "threads": 1, "num_workers": 0, **extra})
    from mimkit.eval import finetune, linprobe
    from mimkit.pretrain import pretrain
    from mimkit.tokenizer import train_tokenizer
    command = {LinprobeConfig: linprobe, FinetuneConfig: finetune, TokenizerConfig: train_tokenizer,
               PretrainConfig: pretrain}[cls]
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics\.jsonl\).*--resume.*--overwrite"):
        command(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_knn_on_a_run_directory_names_the_checkpoint_it_uses(tmp_path, capsys, caplog, monkeypatch):
    """``knn --checkpoint RUN_DIR`` logs the checkpoint file it evaluates, and its default output is a new folder.
    Removing the log line in ``load_latest`` fails this."""
    monkeypatch.chdir(tmp_path)
    assert pretrain_cli(capsys, "--output", "x", "--max-steps", "4", "--save-every", "2")[0] == 0
    with caplog.at_level(logging.INFO, logger="mimkit"):
        assert cli.main(["knn", "--checkpoint", "x", "--threads", "1", "--num-workers", "0", "--train-images", "100",
                         "--feature-cache", ""]) == 0
    assert any(re.search(r"using checkpoint x/checkpoints/checkpoint-00000004\.pt", r.getMessage())
               for r in caplog.records)
    assert len(list((tmp_path / "runs").glob("knn-*/results.json"))) == 1
