"""The device the engine picks, simulated on the CPU: one local process per visible GPU, and the batches and the
model on that device during training."""
import pytest
import torch

import mimkit.engine as engine
from mimkit.config import PretrainConfig, load_config
from mimkit.errors import ConfigError

torch.set_num_threads(1)


def fake_gpus(monkeypatch, count: int, local_rank: int):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(str(d)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # for --precision auto
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "1")  # no process group: only the device choice is under test
    monkeypatch.delenv("MIMKIT_AUTO_PRECISION", raising=False)  # the device, not the environment, decides 'auto'
    return chosen


@pytest.mark.parametrize("count,local_rank", [(1, 0), (2, 1), (4, 3)])
def test_each_local_process_takes_its_own_gpu(monkeypatch, count, local_rank):
    """LOCAL_RANK r picks cuda:r and makes it current. Picking cuda:0 for every process fails this."""
    chosen = fake_gpus(monkeypatch, count, local_rank)
    env = engine.setup(load_config(PretrainConfig, overrides={"device": "auto", "threads": 1}))
    assert str(env.device) == f"cuda:{local_rank}" and chosen == [f"cuda:{local_rank}"]
    assert env.precision == "bf16" and "Fake GPU" in env.precision_note  # --precision auto on a bf16 GPU


def test_more_local_processes_than_gpus_is_a_one_line_error(monkeypatch):
    """Two processes on a one-GPU machine would ask for cuda:1, which does not exist; setup refuses in one line
    naming the fix. Without the check, setup returns cuda:1 and this fails."""
    chosen = fake_gpus(monkeypatch, 1, 1)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 1 but only 1 GPU\(s\) visible.*--nproc-per-node 1") as e:
        engine.setup(load_config(PretrainConfig, overrides={"device": "auto", "threads": 1}))
    assert len(str(e.value).splitlines()) == 1 and chosen == []


def test_batches_and_model_are_on_the_engines_device(tmp_path, monkeypatch):
    """A short pretrain whose objective checks, at every step, that the images and every parameter sit on
    ``env.device`` (the GPU on a GPU machine). A loader that ignores its ``device`` or a fit that does not move
    the task fails this there; on the CPU it checks the same path with the CPU as the device."""
    from mimkit.objectives.mae import MAEObjective
    import mimkit.pretrain as pretrain_module
    import mimkit.run as run_module
    seen, envs = [], []

    def setup(cfg):
        envs.append(engine.setup(cfg))
        return envs[-1]

    monkeypatch.setattr(run_module, "setup", setup)  # run.start: every command's one opening
    original = MAEObjective.forward

    def checked(self, images, labels=None, rng=None):
        want = envs[0].device
        assert images.device == want, (images.device, want)
        assert all(p.device == want for p in self.parameters())
        seen.append(str(images.device))
        return original(self, images, labels, rng)

    cfg = load_config(PretrainConfig, overrides=dict(
        data="builtin", model="vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2, batch_size=8,
        max_steps=2, threads=1, num_workers=0, figure_every=0, output=str(tmp_path / "run")))
    monkeypatch.setattr(MAEObjective, "forward", checked)
    pretrain_module.pretrain(cfg)
    assert len(seen) == 2
