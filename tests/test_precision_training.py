"""Mixed precision in real training: bf16 on the CPU trains as fp32 does; fp16 on the CPU is refused."""
import json

import pytest
import torch

from mimkit import cli
from mimkit.config import PretrainConfig, load_config
from mimkit.pretrain import pretrain

torch.set_num_threads(1)
TINY = dict(data="builtin", model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            batch_size=16, epochs=1, max_steps=30, warmup_epochs=0.05, threads=1, num_workers=0, log_every=1,
            figure_every=0, lr=2e-3, seed=0)


def losses(run) -> list:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_bf16_training_lowers_the_loss_as_fp32_does(tmp_path, monkeypatch):
    """30 steps of the micro MAE in bf16 (autocast on the CPU) and in fp32 from the same seed: the decoder really
    runs in bf16, the bf16 loss falls by over 10%, and its last 5 steps average within 5% of fp32's. A bf16 path
    that autocasts nothing (dtype check), or one that does not update the weights (loss), fails this."""
    from mimkit.models.mae import MaskedAutoencoder
    dtypes = []
    original = MaskedAutoencoder.forward_decoder

    def record(self, *a, **k):
        out = original(self, *a, **k)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(MaskedAutoencoder, "forward_decoder", record)
    curves = {}
    for precision in ("fp32", "bf16"):
        dtypes.clear()
        run = tmp_path / precision
        pretrain(load_config(PretrainConfig, overrides={**TINY, "precision": precision, "output": str(run)}))
        if precision == "bf16":  # every training step's decoder (the final figure is drawn in fp32)
            assert dtypes.count(torch.bfloat16) >= 30, dtypes
        else:
            assert torch.bfloat16 not in dtypes
        curves[precision] = losses(run)
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(bf16) == len(fp32) == 30
    first, last = sum(bf16[:5]) / 5, sum(bf16[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert abs(last - sum(fp32[-5:]) / 5) < 0.05 * sum(fp32[-5:]) / 5, (bf16[-5:], fp32[-5:])


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path, capsys):
    """fp16 needs a GPU's loss scaling and kernels: on the CPU the command stops in one line before creating its
    run directory. Dropping the check in ``engine.setup`` fails this (the run starts)."""
    out = tmp_path / "run"
    code = cli.main(["pretrain", "--precision", "fp16", "--device", "cpu", "--output", str(out), "--threads", "1",
                     "--model", "vit_micro_patch4_32", "--max-steps", "1", "--num-workers", "0", "--figure-every", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--precision fp16 needs a GPU" in err, err
    assert not out.exists()
