"""``--precision auto`` (the default): bf16 where the device runs it natively, fp32 elsewhere, logged, and what the
engine trains in."""
import json
import logging

import pytest
import torch

import mimkit.precision as P
from mimkit.config import PretrainConfig, load_config
from mimkit.pretrain import pretrain

TINY = dict(data="builtin", model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            batch_size=16, epochs=1, max_steps=2, warmup_epochs=0.1, threads=1, num_workers=0, log_every=1,
            figure_every=0)


def _cpu(monkeypatch, **caps):
    """Pretend to run on a CPU with ``caps``, and let the device decide 'auto' (no MIMKIT_AUTO_PRECISION pin)."""
    monkeypatch.setattr(P.torch.cpu, "get_capabilities", lambda: {"cpu_name": "Test CPU", **caps})
    monkeypatch.delenv(P.AUTO_ENV, raising=False)


@pytest.mark.parametrize("caps, want", [({}, "fp32"), ({"avx2": True}, "fp32"), ({"avx512_bf16": True}, "bf16"),
                                        ({"amx_bf16": True}, "bf16")])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, caps, want):
    """AVX2 alone is not enough (torch's bf16 matmuls there run in slow generic kernels): choosing bf16 on any x86
    CPU fails this, and so does ignoring AMX or AVX512-BF16."""
    _cpu(monkeypatch, **caps)
    chosen, why = P.resolve("auto", torch.device("cpu"))
    assert chosen == want and "Test CPU" in why


def test_an_explicit_precision_is_kept(monkeypatch):
    """A user's explicit choice is never replaced, whatever the device supports."""
    _cpu(monkeypatch, avx512_bf16=True)
    assert [P.resolve(p, "cpu")[0] for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_auto_is_the_default_and_the_engine_trains_in_what_it_resolved_to(tmp_path, monkeypatch, caplog):
    """The default config says auto; with a (pretended) native-bf16 CPU the engine's autocast gets bf16 and the
    choice is logged with its reason and kept in run.json, and without one fp32. An engine that passed the raw
    option on (``auto``) or ignored the choice fails this."""
    import mimkit.engine as engine
    assert PretrainConfig().precision == "auto"
    seen = []
    real = engine.autocast
    monkeypatch.setattr(engine, "autocast", lambda device, precision: seen.append(precision) or real(device, precision))
    caplog.set_level(logging.INFO, logger="mimkit")
    for caps, want in (({"avx512_bf16": True}, "bf16"), ({}, "fp32")):
        _cpu(monkeypatch, **caps)
        seen.clear()
        pretrain(load_config(PretrainConfig, overrides={**TINY, "output": str(tmp_path / want)}))
        assert seen and set(seen) == {want}
        assert any(f"--precision auto: {want} (Test CPU" in r.getMessage() for r in caplog.records)
        assert json.loads((tmp_path / want / "run.json").read_text())["precision"] == want


@pytest.mark.parametrize("pinned", ["fp32", "bf16"])
@pytest.mark.parametrize("caps", [{}, {"amx_bf16": True}])
def test_the_environment_pins_what_auto_means(monkeypatch, pinned, caps):
    """MIMKIT_AUTO_PRECISION decides 'auto' whatever the CPU has (so the suite and subprocess runs can be had under
    either choice on any machine), says so, and leaves an explicit choice alone. Ignoring it fails on one CPU."""
    _cpu(monkeypatch, **caps)
    monkeypatch.setenv(P.AUTO_ENV, pinned)
    chosen, why = P.resolve("auto", torch.device("cpu"))
    assert chosen == pinned and P.AUTO_ENV in why
    assert P.resolve("fp32", "cpu")[0] == "fp32" and P.resolve("bf16", "cpu")[0] == "bf16"


def test_a_bad_pin_is_one_line(monkeypatch):
    from mimkit.errors import ConfigError
    monkeypatch.setenv(P.AUTO_ENV, "fp8")
    with pytest.raises(ConfigError, match=r"MIMKIT_AUTO_PRECISION='fp8'.*fp32 or bf16"):
        P.resolve("auto", "cpu")


def test_a_pinned_bf16_on_a_cpu_without_it_is_logged_as_slow(tmp_path, monkeypatch, caplog):
    """The engine runs what the pin says and still names the device's missing native bf16 (the note the user reads
    to know why the run is slow)."""
    from mimkit.engine import setup
    _cpu(monkeypatch)
    monkeypatch.setenv(P.AUTO_ENV, "bf16")
    env = setup(load_config(PretrainConfig, overrides={**TINY, "device": "cpu"}))
    assert env.precision == "bf16"
    assert P.AUTO_ENV in env.precision_note and "neither AVX512-BF16 nor AMX" in env.precision_note
