"""benchmarks/machine.py, the one command for a machine's numbers: its steps, that a finished step is skipped and a
stopped pretraining run resumes, and that the README's figures are shown only beside figures of the same CPU model."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402


def test_dry_run_lists_every_part_and_the_gpu_case_runs_by_steps(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/machine.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "bench tiny32 --precision auto --compile both" in out
    assert out.count(" pretrain ") == 4 and "--time-limit 20" in out and "--max-steps 492" in out
    assert "--random-init" in out and out.count(" finetune ") == 2
    gpu = subprocess.run([sys.executable, "benchmarks/machine.py", "--dry-run", "--device", "cuda", "--parts",
                          "bench,curve", "--curve-steps", "42,240", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "bench tiny32,base224" in gpu and "--max-steps 42" in gpu and "--time-limit 5" not in gpu


def test_finished_steps_are_skipped_and_a_stopped_pretraining_resumes(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(machine.subprocess, "run", lambda cmd, check: ran.append(cmd))
    steps = machine.Steps(tmp_path, dry=False)
    steps.data = "builtin"
    (tmp_path / "a.done").write_text("x")
    steps.pretrain("a")  # finished: skipped
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text("{}")
    steps.pretrain("b")  # started, not finished: resumed
    out = tmp_path / "evals" / "knn-x"
    out.mkdir(parents=True)
    (out / "run.json").write_text("{}")
    (out / "results.json").write_text(json.dumps({"top1": 1.0}))
    steps.evaluate("knn", tmp_path / "b", "knn-x")  # its results are there: skipped
    assert len(ran) == 1 and "--resume" in ran[0] and str(tmp_path / "b") in ran[0]
    assert (tmp_path / "b.done").is_file()


def test_readme_figures_are_compared_only_on_the_same_cpu_model():
    figures = {"finetune top-1": 60.0, "something new": 1.0}
    same = machine.compare(figures, {"cpu": "AMD EPYC", "auto_precision": "fp32 (why)"})
    other = machine.compare(figures, {"cpu": "Intel(R) Xeon(R) Processor", "auto_precision": "fp32 (why)"})
    assert same[0][2] == 56.48 and same[1][2] == ""
    assert other[0][2] == "" and other[1][2] == ""
