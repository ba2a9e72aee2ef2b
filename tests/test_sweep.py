"""``mimkit sweep``: expanding runs, one budget for all, resuming, the table and the plots."""
import json

import pytest
import torch
import yaml

import mimkit.sweep as S
from mimkit.cli import main as cli
from mimkit.config import PretrainConfig, SweepConfig, load_config
from mimkit.errors import ConfigError
from mimkit.objectives import build_objective

torch.set_num_threads(1)

BASE = {"model": "vit_micro_patch4_32", "data": "builtin", "batch_size": 16, "epochs": 1, "log_every": 1,
        "figure_every": 0, "decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1}


def sweep_cfg(tmp_path, **kw):
    values = {"output": str(tmp_path / "sweep"), "threads": 1, "num_workers": 0, "base": dict(BASE),
              "budget": {"max_steps": 1}, "eval": ["knn"], **kw}
    return load_config(SweepConfig, None, values)


def test_runs_cross_the_grid_and_options_take_precedence_in_order(tmp_path):
    cfg = sweep_cfg(tmp_path, runs=[{"name": "mae", "objective": "mae"},
                                    {"name": "mpp", "objective": "vit_mpp", "objective_args": {"target": "mosaic"}}],
                    grid={"mask_ratio": [0.25, 0.5], "objective_args.bits": [3]}, budget={"max_steps": 1, "epochs": 5})
    runs = S.expand_runs(cfg)
    assert [r["name"] for r in runs] == ["mae-mask_ratio0.25-bits3", "mae-mask_ratio0.5-bits3",
                                         "mpp-mask_ratio0.25-bits3", "mpp-mask_ratio0.5-bits3"]
    v = S.run_values(cfg, runs[3])
    # sweep run options < base < budget < run < grid
    assert v["threads"] == 1 and v["model"] == BASE["model"] and v["epochs"] == 5 and v["max_steps"] == 1
    assert v["objective"] == "vit_mpp" and v["mask_ratio"] == 0.5
    # the grid's dotted key joins the run's own objective options; the ratio stays --mask-ratio, which every
    # objective trains at when given (no patch needed: --mask-ratio defaults to None, the objective's paper value)
    assert v["objective_args"] == {"target": "mosaic", "bits": 3}
    assert build_objective(load_config(PretrainConfig, None, {**v, "output": str(tmp_path / "x")})).mask_ratio == 0.5
    assert S.settings(runs[3]) == "target=mosaic, mask_ratio=0.5, bits=3"
    grid_only = sweep_cfg(tmp_path, grid={"decoder_depth": [1, 2]})
    assert [r["name"] for r in S.expand_runs(grid_only)] == ["decoder_depth1", "decoder_depth2"]


@pytest.mark.parametrize("over,message", [
    ({"eval": ["knn", "probe"]}, "--eval must be one of finetune, knn, linprobe; got 'probe'"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "run names must be unique; repeated: a"),
    ({"runs": [{"objective": "mae"}]}, "run 1 needs a name"),
    ({"budget": {"minutes": 3}}, "--budget: unknown key 'minutes'"),
    ({"grid": {"mask_ratio": 0.5}}, "--grid: mask_ratio needs a non-empty list"),
    ({}, "a sweep needs runs: or grid:"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep_cfg(tmp_path, **over)


def test_every_run_is_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "run_command", lambda *a: pytest.fail("nothing may run"))
    cfg = sweep_cfg(tmp_path, runs=[{"name": "ok", "objective": "mae"},
                                    {"name": "typo", "objective": "vit_mpp", "objective_args": {"tgt": "mosaic"}}])
    with pytest.raises(ConfigError, match=r"run typo: --objective-args: unknown option tgt; did you mean target\? \(objective vit_mpp\)"):
        S.sweep(cfg)
    with pytest.raises(ConfigError, match="run bad: --mask-ratio must be in"):
        S.sweep(sweep_cfg(tmp_path, runs=[{"name": "bad", "mask_ratio": 1.5}]))


def test_a_tiny_sweep_end_to_end_resumes_and_extends(tmp_path, monkeypatch):
    cfg = sweep_cfg(tmp_path, grid={"decoder_depth": [1, 2]}, random_init=True)
    summary = S.sweep(cfg)
    out = tmp_path / "sweep"
    names = [r["name"] for r in summary["runs"]]
    assert names == ["random-init", "decoder_depth1", "decoder_depth2"]
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    for name in ("decoder_depth1", "decoder_depth2"):
        r = rows[name]
        assert r["steps"] == 1 and r["objective"] == "mae" and 0 <= r["knn_top1"] <= 100
        assert r["train_flops_per_image"] > 0 and r["pretrain_flops"] == r["train_flops_per_image"] * 16
    # a deeper decoder costs more per image
    assert rows["decoder_depth2"]["train_flops_per_image"] > rows["decoder_depth1"]["train_flops_per_image"]
    assert rows["decoder_depth2"]["decoder_depth"] == 2
    table = (out / "results.md").read_text()
    assert "| decoder_depth2 | mae | decoder_depth=2 | 1 |" in table and "| random-init |" in table
    assert "machine:" in table and "budget per run: max_steps=1" in table
    assert (out / "accuracy_vs_decoder_depth.png").stat().st_size > 0
    assert (out / "accuracy_vs_compute.png").stat().st_size > 0
    assert "(accuracy_vs_decoder_depth.png)" in table

    # again: nothing is redone; with one more grid value only that run works
    called = []
    real_call = S.run_command
    monkeypatch.setattr(S, "run_command", lambda name, c: called.append((name, c.output)) or real_call(name, c))
    S.sweep(cfg)
    assert called == []
    S.sweep(sweep_cfg(tmp_path, grid={"decoder_depth": [1, 2, 3]}, random_init=True))
    assert {t for t, _ in called} == {"pretrain", "knn"}
    assert all("decoder_depth3" in o for _, o in called)

    # the command line takes the file as its argument
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"output": str(out), "threads": 1, "num_workers": 0, "base": BASE,
                                          "budget": {"max_steps": 1}, "eval": ["knn"],
                                          "grid": {"decoder_depth": [1, 2, 3]}, "random_init": True}))
    called.clear()
    assert cli(["sweep", str(sweep_file), "--no-plots"]) == 0
    assert called == []


def test_a_failing_run_is_reported_and_the_others_kept(tmp_path):
    cfg = sweep_cfg(tmp_path, runs=[{"name": "good", "objective": "mae"},
                                    {"name": "beit", "objective": "beit",
                                     "objective_args": {"tokenizer": str(tmp_path / "missing.pt")}}], plots=False)
    with pytest.raises(S.SweepError, match=r"1 of 2 runs failed: beit: .*no such checkpoint"):
        S.sweep(cfg)
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| good | mae |" in table and "| beit | failed:" in table
    assert not (tmp_path / "sweep" / "beit" / "result.json").exists()  # retried next time


def test_shipped_sweeps_are_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("lineage.yaml", "mae-ablations.yaml"):
        cfg = load_config(SweepConfig, str(root / name))
        runs = S.expand_runs(cfg)
        assert len(runs) >= 5
        for run in runs:  # checked on the embedded sample: CI need not have CIFAR-10 extracted
            values = {**S.run_values(cfg, run), "data": "builtin"}
            S.check_run_options(run, values, Path("/tmp/unused"))
