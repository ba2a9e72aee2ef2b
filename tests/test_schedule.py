"""The learning rate: the base_lr scaling rule, the per-iteration warm-up and cosine, the --time-limit re-sizing,
each read back from what the run logs (metrics.jsonl), plus the recipe details a regression could silently change:
LARS in the linear probe and the normalised target's epsilon."""
import json
import math
import types

import pytest
import torch
import torch.nn as nn

import mimkit.engine as engine
from mimkit.config import LinprobeConfig, PretrainConfig, load_config
from mimkit.engine import Env, effective_lr, fit

from helpers_faults import SyntheticLoader

torch.set_num_threads(1)


class Quadratic(nn.Module):
    """The smallest task the engine trains: a few weights pulled towards the mean image."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, images, labels, rng):
        return ((self.w - images.mean()) ** 2).sum()


def cfg_for(tmp_path, **overrides):
    opts = dict(output=str(tmp_path / "run"), batch_size=4, epochs=2, warmup_epochs=0.5, lr=0.1, min_lr=0.001,
                log_every=1, threads=1, num_workers=0)
    opts.update(overrides)
    return load_config(PretrainConfig, overrides=opts)


def logged_lrs(run) -> dict:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def mae_lr(it: int, steps_per_epoch: int, epochs: float, warmup_epochs: float, lr: float, min_lr: float) -> float:
    """The official MAE rule (util/lr_sched.py), per iteration: linear warm-up from 0, then half-cycle cosine."""
    epoch = it / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_the_lr_scaling_rule_multiplies_batch_accumulation_and_processes():
    """lr = base_lr x batch x accum x world / 256 (MAE's rule), and --lr overrides it. Leaving out the
    accumulation steps or the world size fails this."""
    cfg = load_config(PretrainConfig, overrides={"base_lr": 0.01, "batch_size": 24, "accum_steps": 3})
    assert effective_lr(cfg, Env(torch.device("cpu"), 0, 2)) == pytest.approx(0.01 * 24 * 3 * 2 / 256, rel=1e-12)
    assert effective_lr(cfg, Env(torch.device("cpu"), 0, 1)) == pytest.approx(0.01 * 24 * 3 / 256, rel=1e-12)
    cfg.lr = 0.3
    assert effective_lr(cfg, Env(torch.device("cpu"), 0, 8)) == 0.3


def test_warm_up_and_cosine_per_iteration_as_logged(tmp_path):
    """Every logged ``lr`` (metrics.jsonl; step k logs the lr of iteration k-1) equals the official per-iteration
    rule: 4 warm-up iterations from 0, then cosine to min_lr over the remaining 12. An epoch-wise schedule
    (t_in_epochs), a warm-up starting above 0 or a cosine that ignores the warm-up fails this."""
    cfg = cfg_for(tmp_path)
    task = Quadratic()
    opt = torch.optim.SGD(task.parameters(), lr=cfg.lr)
    fit(task, opt, SyntheticLoader(n=32, batch_size=4, img_size=4), cfg, cfg.output, engine.setup(cfg))
    lrs = logged_lrs(tmp_path / "run")
    assert sorted(lrs) == list(range(1, 17))
    for step, lr in lrs.items():
        assert lr == pytest.approx(mae_lr(step - 1, 8, 2, 0.5, 0.1, 0.001), abs=1e-12), step


def test_time_limit_resizes_the_schedule_to_end_on_time_with_a_full_cosine(tmp_path, monkeypatch):
    """With --time-limit 0.5 (30 s) and a clock that advances 1 s per step, the 64-step run is re-sized to 30
    steps and the cosine is re-drawn over them: the logged lrs follow the rule for 30 steps and the last one is
    near min_lr. Not re-sizing (64 steps) or re-sizing without a new schedule (last lr mid-cosine) fails this."""
    clock = {"t": 1000.0}
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(time=lambda: clock["t"], strftime=__import__("time").strftime,
                                                              gmtime=__import__("time").gmtime))

    class Ticking(Quadratic):
        def forward(self, images, labels, rng):
            clock["t"] += 1.0
            return super().forward(images, labels, rng)

    cfg = cfg_for(tmp_path, epochs=8, time_limit=0.5)
    task = Ticking()
    opt = torch.optim.SGD(task.parameters(), lr=cfg.lr)
    result = fit(task, opt, SyntheticLoader(n=32, batch_size=4, img_size=4), cfg, cfg.output, engine.setup(cfg))
    assert result.step == 30
    lrs = logged_lrs(tmp_path / "run")
    assert max(lrs) == 30
    total_epochs = 30 / 8
    for step in range(6, 31):  # re-sized at step 5: from there on the rule for a 30-step run
        assert lrs[step] == pytest.approx(mae_lr(step - 1, 8, total_epochs, 0.5, 0.1, 0.001), abs=1e-9), step
    assert lrs[30] < 0.002


def test_the_linear_probe_trains_with_lars(tmp_path):
    """The probe's optimizer is LARS (MAE's linear probing), with the trust ratio on the weight matrix and plain
    momentum SGD on the bias: one step from a known gradient moves the weight by lr x trust ratio x grad.
    Building the probe with SGD (or adapting the bias too) fails this."""
    from timm.optim import Lars
    from mimkit.eval.linprobe import LinearProbe, lars_optimizer
    probe = LinearProbe(8, 3)
    opt = lars_optimizer(probe, lr=0.5, weight_decay=0.0)
    assert isinstance(opt, Lars)
    w, b = probe.head[1].weight, probe.head[1].bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.full_like(w, 0.02), torch.full_like(b, 0.02)
    opt.step()
    trust = 0.001 * w0.norm() / w.grad.norm()  # timm's Lars: trust_coeff 0.001 x |w| / |g|
    torch.testing.assert_close(w0 - w.detach(), 0.5 * trust * w.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(b0 - b.detach(), 0.5 * b.grad, rtol=1e-6, atol=1e-9)


def test_the_normalised_target_adds_exactly_1e_6_to_the_variance():
    """MAE's norm_pix_loss target is (x - mean) / sqrt(var + 1e-6), with the unbiased variance. A flat patch (var
    0) gives 0, not NaN (eps 0 fails); a patch with variance 1e-6 is divided by sqrt(2e-6) (eps 1e-4 fails)."""
    from mimkit.models.presets import create_mae
    mae = create_mae("vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=True)
    p = mae.encoder.patch_size if hasattr(mae, "encoder") else 4
    imgs = torch.full((1, 3, 32, 32), 0.3)  # every patch flat
    g = torch.Generator().manual_seed(0)
    imgs[0, :, :p, :p] += torch.randn(3, p, p, generator=g) * 1e-3  # patch 0: a tiny variance
    t = mae.target(imgs)
    assert torch.isfinite(t).all() and t[0, 1:].abs().max() == 0
    x = mae.patchify(imgs)[0, 0].double()
    want = (x - x.mean()) / (x.var() + 1e-6).sqrt()
    torch.testing.assert_close(t[0, 0].double(), want, rtol=1e-2, atol=1e-3)  # float32 round-off; eps 1e-4 is 7x off
