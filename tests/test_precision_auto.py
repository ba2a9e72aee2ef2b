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
    monkeypatch.setattr(P.torch.cpu, "get_capabilities", lambda: {"cpu_name": "Test CPU", **caps})


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
