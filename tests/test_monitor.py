"""--eval-every (mimkit.monitor): k-NN top-1 of held-out images during pretraining, to metrics.jsonl, TensorBoard
(with reconstructions as images), the progress line and an optional tracker (mimkit.trackers)."""
import json
import logging

import pytest

from helpers_faults import noise_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 12 noise images, the classes alike: held-out k-NN is near chance, while images scored against
    a bank that holds them score 100%."""
    return noise_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=12)


class FakeTracker:
    def __init__(self):
        self.logged, self.closed = [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def close(self):
        self.closed = True


def test_eval_every_logs_the_real_knn_everywhere(folder, tmp_path, monkeypatch, caplog):
    """Every half epoch's k-NN top-1 is in metrics.jsonl, TensorBoard (with a reconstruction image), the tracker and the
    progress line, and the last one equals `mimkit knn` on the final checkpoint (same split, k, temperature).
    Scoring the training images instead of the held-out ones, or dropping the engine's write of the callback's
    values, fails this."""
    import mimkit.engine
    from mimkit.cli import main
    tracker = FakeTracker()
    monkeypatch.setattr(mimkit.engine, "open_tracker", lambda name, run_dir, config: tracker)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mimkit"):
        assert main(["pretrain", "--data", str(folder), "--model", "vit_micro_patch4_32", "--epochs", "2",
                     "--batch-size", "8", "--val-fraction", "0.25", "--eval-every", "0.5", "--figure-every", "0",
                     "--num-workers", "0", "--log-every", "1", "--output", str(run)]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [line for line in lines if "knn_top1" in line]
    # 27 training images in batches of 8: 3 steps an epoch; every half epoch rounds to every 2 steps; step 0 is the
    # untrained encoder
    assert [(line["step"], line["epoch"]) for line in knn] == [(0, 0.0), (2, 0.6667), (4, 1.3333), (6, 2.0)]
    assert main(["knn", "--checkpoint", str(run), "--data", str(folder), "--val-fraction", "0.25",
                 "--feature-cache", "", "--num-workers", "0", "--output", str(tmp_path / "knn")]) == 0
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert results["num_val"] == 9 and knn[-1]["knn_top1"] == pytest.approx(results["top1"]) and results["top1"] < 100
    # TensorBoard: the scalar and the images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.value for e in events.Scalars("knn_top1")] == pytest.approx([k["knn_top1"] for k in knn])
    assert len(events.Images("reconstructions")) == 4
    # the tracker saw the loss and the k-NN, and was closed
    assert any("loss" in v for _, v in tracker.logged) and any("knn_top1" in v for _, v in tracker.logged)
    assert tracker.closed
    # the progress line shows the latest k-NN once there is one
    assert any("knn_top1" in r.getMessage() and r.getMessage().startswith("step") for r in caplog.records)


def test_eval_every_needs_labeled_held_out_images(tmp_path):
    """No held-out images (--val-fraction 0): a one-line error before training starts."""
    from mimkit.cli import main
    run = tmp_path / "run"
    assert main(["pretrain", "--data", "builtin", "--model", "vit_micro_patch4_32", "--val-fraction", "0",
                 "--eval-every", "1", "--output", str(run), "--num-workers", "0"]) == 2
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_trackers_in_offline_mode(name, tmp_path, monkeypatch):
    """The real packages, offline: W&B writes an offline run under the run directory, MLflow a local file store
    with the metric's history. Logging without the step, or never closing the run, fails this."""
    pytest.importorskip(name)
    from mimkit.trackers import open_tracker
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store; the sqlite one needs the full mlflow
    tracker = open_tracker(name, tmp_path, {"epochs": 2, "data": "builtin"})
    tracker.log({"loss": 1.5, "knn_top1": 40.0}, 1)
    tracker.log({"loss": 1.2, "knn_top1": 55.0}, 2)
    tracker.close()
    if name == "wandb":
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert runs and list(runs[0].glob("*.wandb"))
    else:
        import mlflow
        client = mlflow.tracking.MlflowClient()
        run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
        history = client.get_metric_history(run.info.run_id, "knn_top1")
        assert [(m.step, m.value) for m in history] == [(1, 40.0), (2, 55.0)]
        assert run.info.status == "FINISHED"


def test_eval_every_is_due_on_whole_epochs_fractions_of_one_and_the_last_step():
    """Whole epochs land on each epoch's last step, fractions on rounded step intervals, and the last step is always
    scored, so a curve ends at the final weights."""
    from mimkit.monitor import OnlineEval
    watch = object.__new__(OnlineEval)

    def due(every, steps_per_epoch, total):
        watch.every = every
        return [s for s in range(1, total + 1) if watch.due(s, steps_per_epoch, s == total)]
    assert due(1, 3, 6) == [3, 6]
    assert due(2, 3, 7) == [6, 7]
    assert due(0.25, 100, 240) == [25, 50, 75, 100, 125, 150, 175, 200, 225, 240]
    assert due(0.01, 10, 3) == [1, 2, 3]
    assert due(0, 10, 30) == []
    watch.every = 0.5
    assert watch.due(0, 10, False)  # before the first step
