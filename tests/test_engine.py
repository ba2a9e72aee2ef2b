"""The training engine: a run lowers the loss; resume ends like an uninterrupted run, parameters and optimizer state."""
import pytest
import torch

from mimkit.checkpoint_files import list_checkpoints, load_checkpoint
from mimkit.config import PretrainConfig, load_config
from mimkit.pretrain import pretrain

torch.set_num_threads(1)
TINY = dict(data="builtin", model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            batch_size=16, epochs=2, max_steps=6, warmup_epochs=0.1, threads=1, num_workers=0, log_every=1,
            figure_every=0, deterministic=True, base_lr=1e-3)


def test_pretrain_lowers_loss_and_writes_run_dir(tmp_path):
    cfg = load_config(PretrainConfig, overrides={**TINY, "max_steps": 0, "epochs": 3, "val_fraction": 0.5,
                                                 "output": str(tmp_path / "run")})
    result = pretrain(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert list((run / "tensorboard").iterdir())
    assert (run / "figures" / "reconstruction.png").is_file()
    import json
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert result.step == len(losses) and losses[-1] < losses[0]


def test_resume_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupted after step 3 and resumed from step 2: parameters and optimizer state equal an uninterrupted
    run's, bit for bit. Not restoring the optimizer state on resume (engine.fit) fails this."""
    full = tmp_path / "full"
    pretrain(load_config(PretrainConfig, overrides={**TINY, "output": str(full)}))

    # the same run, interrupted after step 3 (a checkpoint was written at step 2), then resumed
    import mimkit.engine as engine
    part = tmp_path / "part"
    original = engine.Progress.update

    def crash(self, step, *a, **k):
        original(self, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Progress, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(load_config(PretrainConfig, overrides={**TINY, "save_every": 2, "output": str(part)}))
    monkeypatch.setattr(engine.Progress, "update", original)
    assert load_checkpoint(list_checkpoints(part)[-1])["step"] == 2
    pretrain(load_config(PretrainConfig, overrides={**TINY, "save_every": 2, "resume": True, "output": str(part)}))

    a, b = (load_checkpoint(list_checkpoints(r)[-1]) for r in (full, part))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # AdamW's moments and step counts too: a resume that restarted the optimizer (or skipped restoring it) would
    # still move the weights similarly, but not bit-identically, and its moments would differ
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)


# DDP on 2 processes against one: tests/test_ddp.py


def test_a_time_limited_run_logs_its_sizing_only_when_it_changes(tmp_path, monkeypatch, caplog):
    """The schedule is re-sized at steps 5, 10, 20, 50, each 100 and each epoch's end; only the first sizing and
    one that moves the total by more than 5% are logged at INFO, the rest at DEBUG. The engine's clock is faked:
    0.1 s a step, then (a busier machine) 0.2 s a step, so the run is re-sized once meaningfully. Logging every
    sizing at INFO (the old behaviour) fails this, and so does logging only the first one."""
    import logging
    import time as real_time
    from types import SimpleNamespace

    import mimkit.engine as engine
    calls = [0]

    def fake_time():  # the engine reads the clock twice a step (is time up? now): 0.05 s a read, then 0.1 s
        calls[0] += 1
        return 1000.0 + 0.05 * min(calls[0], 120) + 0.1 * max(calls[0] - 120, 0)

    monkeypatch.setattr(engine, "time", SimpleNamespace(time=fake_time, strftime=real_time.strftime,
                                                        gmtime=real_time.gmtime))
    caplog.set_level(logging.DEBUG, logger="mimkit")
    cfg = load_config(PretrainConfig, overrides={**TINY, "max_steps": 0, "epochs": 10, "val_fraction": 0.5,
                                                 "deterministic": False, "time_limit": 0.2,
                                                 "output": str(tmp_path / "run")})
    result = pretrain(cfg)
    sizing = [r for r in caplog.records if "the run is sized to" in r.getMessage()]
    told = [r.getMessage() for r in sizing if r.levelno == logging.INFO]
    assert len(sizing) >= 5, [r.getMessage() for r in sizing]
    assert len(told) == 2, told
    assert result.step < 10 * 31  # the time limit, not the epochs, ended the run
