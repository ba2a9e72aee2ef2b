"""The run object: one start for every command, and options that are never rewritten downstream.

Breaking it: ``pretrain`` writing the resolved mask ratio or pixel spec back into its options (as before issue 20),
or ``rundir.prepare`` setting ``cfg.output``, fails ``test_pretrain_leaves_its_options_as_given``; a
``Run.record`` that forgets a resolved value fails the config.yaml / run.json checks.
"""
import copy
import dataclasses
import json

import pytest
import yaml

from mimkit.config import KnnConfig, LinprobeConfig, PretrainConfig, load_config
from mimkit.eval import knn, linprobe
from mimkit.pretrain import pretrain
from mimkit.run import start


def tiny(tmp_path, **kw):
    return load_config(PretrainConfig, None, dict(model="vit_micro_patch4_32", data="builtin", device="cpu",
                                                  precision="fp32", max_steps=1, batch_size=8, epochs=1, num_workers=0,
                                                  figure_every=0, threads=1, **kw))


def test_pretrain_leaves_its_options_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output: a new runs/pretrain-TIME
    cfg = tiny(tmp_path, in_chans=1)
    given = copy.deepcopy(cfg)
    pretrain(cfg)
    assert cfg == given and cfg.mask_ratio is None and cfg.pixels == {} and cfg.output == ""
    (run,) = (tmp_path / "runs").iterdir()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    facts = json.loads((run / "run.json").read_text())
    assert recorded["output"] == str(run.relative_to(tmp_path)) and recorded["mask_ratio"] == 0.75
    assert recorded["pixels"]["in_chans"] == 1 and facts["pixels"] == recorded["pixels"]
    assert facts["mask_ratio"] == 0.75 and facts["command"] == "pretrain" and facts["run_id"]
    # the recorded config reruns the same run: it loads, and names what was resolved
    again = load_config(PretrainConfig, str(run / "config.yaml"), {})
    assert (again.mask_ratio, again.pixels) == (0.75, recorded["pixels"])


def test_the_run_is_immutable_and_derives_new_ones(tmp_path):
    cfg = tiny(tmp_path, output=str(tmp_path / "r"))
    run = start(cfg, "pretrain")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.mask_ratio = 0.5
    other = run.derive(mask_ratio=0.5)
    assert run.mask_ratio is None and other.mask_ratio == 0.5 and other.output == run.output == tmp_path / "r"
    assert other.config(cfg).mask_ratio == 0.5 and cfg.mask_ratio is None


def test_an_evaluation_records_its_input_spec(tmp_path):
    """linprobe claims a run (run.json gets the spec); knn only writes its results (no run.json to add to)."""
    common = dict(random_init=True, model="vit_micro_patch4_32", data="builtin", device="cpu", precision="fp32",
                  num_workers=0, feature_cache="", threads=1)
    linprobe(load_config(LinprobeConfig, None, dict(common, epochs=1, output=str(tmp_path / "probe"))))
    facts = json.loads((tmp_path / "probe" / "run.json").read_text())
    assert facts["command"] == "linprobe" and facts["pixels"]["in_chans"] == 3
    assert yaml.safe_load((tmp_path / "probe" / "config.yaml").read_text())["output"] == str(tmp_path / "probe")
    knn(load_config(KnnConfig, None, dict(common, output=str(tmp_path / "knn"))))
    assert sorted(p.name for p in (tmp_path / "knn").iterdir()) == ["config.yaml", "results.json"]
