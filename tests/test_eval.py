"""Evaluations: k-NN vote, linear probe (frozen encoder), fine-tuning (partial, layer decay), CLI."""
import json
import math

import pytest
import torch

from mimkit.checkpoint_files import load_latest, save_checkpoint
from mimkit.config import FinetuneConfig, KnnConfig, LinprobeConfig, load_config
from mimkit.eval import common as F
from mimkit.eval.finetune import build_classifier, finetune, finetune_optimizer
from mimkit.eval.knn import knn_scores
from mimkit.eval.linprobe import LinearProbe, linprobe
from mimkit.models import create_encoder
from mimkit.objectives import OBJECTIVES

torch.set_num_threads(1)
MICRO = "vit_micro_patch4_32"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A mimkit MAE checkpoint as ``engine.fit`` writes it, in a run directory; returns (run dir, file, objective)."""
    torch.manual_seed(0)
    objective = OBJECTIVES["mae"].build(dict(encoder=create_encoder(MICRO).arch, decoder_dim=32, decoder_depth=1,
                                             decoder_heads=2, mask_ratio=0.75, norm_pix_loss=True))
    with torch.no_grad():  # not the fresh initialisation, so random-init can be told apart
        for p in objective.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = tmp_path_factory.mktemp("pretrain")
    path = save_checkpoint({"format": "mimkit", "version": 1, "kind": "mae", "arch": objective.arch,
                            "model": objective.state_dict(), "step": 3}, run / "checkpoints" / "checkpoint-00000003.pt")
    return run, path, objective


def common(tmp_path, **kw):
    return dict(output=str(tmp_path / "run"), threads=1, num_workers=0, data="builtin", **kw)


# k-NN ------------------------------------------------------------------------------------------------------
def test_knn_weighted_vote_math():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_scores(bank, labels, torch.tensor([[2.0, 0.0]]), num_classes=3, k=2, temperature=0.5)
    # the two nearest: sim 1.0 (class 0) and 0.8 (class 1); the third (sim 0) is not among the top 2
    assert torch.allclose(scores, torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.8 / 0.5), 0.0]]))
    # k larger than the bank: every neighbour votes
    scores = knn_scores(bank, labels, torch.tensor([[1.0, 0.0]]), num_classes=2, k=20, temperature=1.0)
    assert torch.allclose(scores, torch.tensor([[math.e, math.exp(0.8) + 1.0]]))


def test_knn_separable_features_are_all_right():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 5
    train_y = torch.arange(6).repeat_interleave(30)
    val_y = torch.arange(6).repeat_interleave(10)
    train = centres[train_y] + torch.randn(len(train_y), 16, generator=g)
    val = centres[val_y] + torch.randn(len(val_y), 16, generator=g)
    acc = F.topk_accuracy(knn_scores(train, train_y, val, 6, k=20, temperature=0.07, chunk=7), val_y)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    acc = F.topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == 100.0  # capped at the number of classes


# loading --------------------------------------------------------------------------------------------------------
def test_checkpoint_file_and_run_dir_and_random_init(tmp_path, pretrained):
    run, path, objective = pretrained
    want = objective.encoder.state_dict()
    for ckpt in (str(path), str(run)):
        enc, info = F.load_eval_encoder(load_config(KnnConfig, overrides=common(tmp_path, checkpoint=ckpt)))
        assert enc.arch == objective.encoder.arch and info["kind"] == "mae"
        assert all(torch.equal(v, want[k]) for k, v in enc.state_dict().items())
    # random init with the checkpoint's shape: same shapes, other weights
    enc, info = F.load_eval_encoder(load_config(KnnConfig, overrides=common(tmp_path, checkpoint=str(run),
                                                                              random_init=True)))
    assert info["random_init"] and enc.arch == objective.encoder.arch
    assert not torch.equal(enc.blocks[0].attn.qkv.weight, want["blocks.0.attn.qkv.weight"])
    # random init from a preset
    enc, _ = F.load_eval_encoder(load_config(KnnConfig, overrides=common(tmp_path, random_init=True, model=MICRO)))
    assert enc.arch == create_encoder(MICRO).arch


# linear probe ---------------------------------------------------------------------------------------------------
def test_linprobe_head_and_frozen_encoder(tmp_path, pretrained, monkeypatch):
    run, _, _ = pretrained
    probe = LinearProbe(96, 10)
    bn = probe.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert [n for n, _ in probe.named_parameters()] == ["head.1.weight", "head.1.bias"]
    assert probe.head[1].weight.std().item() == pytest.approx(0.01, rel=0.2)

    seen = {}

    load = F.load_eval_encoder

    def capture(cfg, *data):
        enc, info = load(cfg, *data)
        seen["encoder"], seen["before"] = enc, {k: v.clone() for k, v in enc.state_dict().items()}
        return enc, info

    monkeypatch.setattr(F, "load_eval_encoder", capture)  # what open_evaluation calls
    cfg = load_config(LinprobeConfig, overrides=common(tmp_path, checkpoint=str(run), epochs=2, warmup_epochs=1,
                                                       batch_size=128, lr=0.5))
    res = linprobe(cfg)
    enc = seen["encoder"]
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(torch.equal(v, seen["before"][k]) for k, v in enc.state_dict().items())
    assert res["steps"] == 2 * (900 // 128)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["top1"] == res["top1"] and 0 <= res["top1"] <= res["top5"] <= 100
    assert (tmp_path / "run" / "config.yaml").is_file()
    state = load_latest(tmp_path / "run")
    assert state["kind"] == "linprobe"
    assert sorted(state["model"]) == ["head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
                                      "head.1.bias", "head.1.weight"]


def test_feature_loader_batches_and_shards():
    feats, labels = torch.arange(10.0).view(10, 1), torch.arange(10)
    one = F.FeatureLoader(feats, labels, 3, seed=1)
    assert len(one) == 3 and one.num_images == 10
    one.set_epoch(2)
    seen = torch.cat([y for _, y in one])
    assert len(seen) == 9 and len(set(seen.tolist())) == 9
    shards = [F.FeatureLoader(feats, labels, 2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2, start_batch=1)
    got = [torch.cat([y for _, y in s]) for s in shards]
    assert len(got[0]) == len(got[1]) == 2 and not set(got[0].tolist()) & set(got[1].tolist())
    assert len(F.FeatureLoader(feats, labels, 64)) == 1  # a set smaller than a batch is one batch


def test_long_frozen_passes_log_their_progress(tmp_path, pretrained, monkeypatch, caplog):
    """k-NN's feature extraction and fine-tuning's held-out evaluation say how far they are and what is left."""
    run, path, _ = pretrained
    monkeypatch.setattr(F, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    caplog.set_level("INFO", logger="mimkit")
    from mimkit.eval.knn import knn
    knn(load_config(KnnConfig, overrides=common(tmp_path, checkpoint=str(path), pool="mean", feature_cache="",
                                                batch_size=16)))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features: ")]
    assert lines and all(" left" in m for m in lines), lines
    counts = [tuple(map(int, m.split()[1].split("/"))) for m in lines]  # (done, total) per line
    assert counts[0][0] == 16 and sum(d == t for d, t in counts) == 2  # the bank's pass and the queries', each whole
    caplog.clear()
    finetune(load_config(FinetuneConfig, overrides=common(tmp_path / "ft", checkpoint=str(path), blocks=1, epochs=1,
                                                          max_steps=1, batch_size=16, warmup_epochs=0)))
    assert any(r.getMessage().startswith("held-out evaluation: 16/") for r in caplog.records)


# fine-tuning -----------------------------------------------------------------------------------------------------
def test_layer_decay_groups():
    model = build_classifier(create_encoder(MICRO), 10, global_pool=True)
    opt = finetune_optimizer(model, 1e-3, 0.05, 0.75)
    assert opt.defaults["fused"]  # one kernel over all parameters, as pretraining's (3-4x the per-tensor loop)
    scale = {n: g["lr_scale"] for g in opt.param_groups for p in g["params"]
             for n, q in model.named_parameters() if q is p}
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.75 ** 4)
    assert scale["blocks.3.attn.qkv.weight"] == pytest.approx(0.75)
    assert scale["head.weight"] == 1.0 and scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** 5)
    wd = {n: g["weight_decay"] for g in opt.param_groups for p in g["params"]
          for n, q in model.named_parameters() if q is p}
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["blocks.0.norm1.weight"] == 0 and wd["cls_token"] == 0


def test_classifier_heads():
    enc = create_encoder(MICRO)
    avg = build_classifier(enc, 7, global_pool=True)
    assert isinstance(avg.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)
    assert avg.head.weight.shape == (7, 96) and avg.head.weight.abs().max() < 1e-3 and not avg.head.bias.any()
    tok = build_classifier(enc, 7, global_pool=False)
    assert isinstance(tok.fc_norm, torch.nn.Identity) and torch.equal(tok.norm.weight, enc.norm.weight)
    assert torch.equal(avg.blocks[2].mlp.fc1.weight, enc.blocks[2].mlp.fc1.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = enc.eval().forward_features(x)
        # class-token head: the encoder's normed class token through the new head
        torch.testing.assert_close(tok.eval().forward_head(tok.forward_features(x)), tok.head(feats[:, 0]))


def test_finetune_last_block_only(tmp_path, pretrained):
    run, path, objective = pretrained
    cfg = load_config(FinetuneConfig, overrides=common(tmp_path, checkpoint=str(path), blocks=1, epochs=1,
                                                       max_steps=3, batch_size=32, warmup_epochs=0, lr=1e-2))
    res = finetune(cfg)
    assert res["steps"] == 3 and (tmp_path / "run" / "results.json").is_file()
    state = load_latest(tmp_path / "run")
    assert state["kind"] == "finetune"
    after = {k[len("model."):]: v for k, v in state["model"].items()}
    before = objective.encoder.state_dict()
    changed = {k for k, v in after.items() if k not in before or not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(("blocks.3.", "head.", "fc_norm.")) for k in changed), sorted(changed)
    assert any(k.startswith("blocks.3.") for k in changed)
    # layer decay reaches the optimizer's groups through the engine's schedule
    lrs = {g["lr_scale"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs[1.0] == pytest.approx(lrs[0.75] / 0.75)


def test_finetune_rejects_odd_batch_with_mixup(tmp_path):
    """When the options are read, before any work (the check sits in FinetuneConfig.validate)."""
    from mimkit.errors import ConfigError
    with pytest.raises(ConfigError, match="even"):
        load_config(FinetuneConfig, overrides=common(tmp_path, random_init=True, model=MICRO, batch_size=33))


# command line -----------------------------------------------------------------------------------------------------
def test_cli_knn_random_init(tmp_path, capsys):
    from mimkit.cli import main
    out = tmp_path / "knn"
    assert main(["knn", "--random-init", "--model", MICRO, "--data", "builtin", "--output", str(out),
                 "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("knn: top1 ")
    res = json.loads((out / "results.json").read_text())
    assert res["num_val"] == 100 and res["num_train"] == 900 and res["random_init"] and res["k"] == 20
    assert 0 <= res["top1"] <= res["top5"] <= 100


def test_cli_needs_a_checkpoint(capsys):
    from mimkit.cli import main
    assert main(["linprobe", "--data", "builtin"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
