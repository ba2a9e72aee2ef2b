"""benchmarks/time_to_accuracy.py: the README's time-to-accuracy table, read from run folders as the library
writes them (a real tiny pretraining run; its evaluations' results files)."""
import importlib.util
import json
from pathlib import Path

from mimkit.config import PretrainConfig, load_config
from mimkit.files import write_json
from mimkit.precision import resolve
from mimkit.pretrain import pretrain

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "time_to_accuracy.py"
TINY = dict(data="builtin", model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            batch_size=16, epochs=1, max_steps=3, warmup_epochs=0.1, threads=1, num_workers=0, log_every=1,
            figure_every=0, precision="auto")


def _script():
    spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_points_pair_each_run_with_its_own_evaluations(tmp_path):
    """Minutes from the engine's epoch times (time since the loop started: the last, not their sum, over a run of
    several epochs), images = steps x batch, the chosen precision from run.json, and each
    run's k-NN / probe found by checkpoint (the untrained encoder at 0 minutes). Pairing a score with another
    run's checkpoint, or counting steps instead of images, fails this."""
    tta = _script()
    run = tmp_path / "runs" / "short"
    pretrain(load_config(PretrainConfig, overrides={**TINY, "output": str(run)}))
    other = tmp_path / "runs" / "other"
    other.mkdir()
    for name, command, checkpoint, random_init, top1 in (("knn-short", "knn", run, False, 31.0),
                                                         ("probe-short", "linprobe", run, False, 41.0),
                                                         ("knn-other", "knn", other, False, 99.0),
                                                         ("knn-random", "knn", run, True, 24.0)):
        write_json(tmp_path / "evals" / name / "results.json",
                   {"command": command, "top1": top1, "checkpoint": str(checkpoint), "random_init": random_init})
    metrics = run / "metrics.jsonl"
    (last,) = [m["epoch_time_s"] for m in map(json.loads, metrics.read_text().splitlines()) if "epoch_time_s" in m]
    point = tta.pretraining(run)
    assert point["steps"] == 3 and point["images"] == 48 and abs(point["minutes"] - last / 60) < 1e-9
    with metrics.open("a") as f:  # a second epoch, as the engine writes it: the time since the loop started
        f.write(json.dumps({"step": 6, "epoch_time_s": last + 60.0, "epoch": 1}) + "\n")
    point = tta.pretraining(run)
    assert point["steps"] == 6 and point["images"] == 96 and abs(point["minutes"] - (last / 60 + 1)) < 1e-9
    chosen = resolve("auto", "cpu")[0]  # fp32 or bf16, as this machine's CPU has native bf16 or not
    assert point["asked"] == "auto" and point["precision"] == f"auto -> {chosen}"
    rows = tta.table([point], tta.evaluations([tmp_path / "evals"]))
    assert rows[0][0] == "untrained" and rows[0][-2:] == (24.0, None)
    assert rows[1][0] == "short" and rows[1][-2:] == (31.0, 41.0)
