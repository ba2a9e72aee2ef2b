"""Checkpoints in and out: official MAE .pth, timm, mimkit (files and runs), exports, features, CLI.

Every model here is small and random; the official layouts are written out by hand from their published
tensor names, so the importers are checked against the format, not against our own exporter.
(Hugging Face ViTMAE: tests/test_hf_equivalence.py.)
"""
import argparse
import logging

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mimkit
from mimkit.checkpoints import export, load, load_encoder, load_mae, save_checkpoint
from mimkit.errors import CheckpointError
from mimkit.features import extract_features
from mimkit.models import MaskedAutoencoder, MaskedViT, create_mae
from mimkit.models.pos_embed import sincos_2d

torch.set_num_threads(1)


def randomize(module, seed=0):
    """Every parameter random (MAE's init leaves biases 0 and norms 1, which would hide mapping mistakes);
    fixed sin-cos position tables stay as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name and "weight" in name else 0))
    return module.eval()


def micro(**kw):
    torch.manual_seed(0)
    return randomize(create_mae("vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw))


def official_state_dict(width=96, depth=2, patch=4, img=32, decoder=(32, 1), mlp=4, encoder_norm=True, seed=0):
    """A random state dict with the official MaskedAutoencoderViT / models_vit tensor names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    grid = img // patch
    sd = {"cls_token": r(1, 1, width), "pos_embed": sincos_2d(width, grid, grid),
          "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width)}

    def blocks(prefix, d, n):
        for i in range(n):
            b = f"{prefix}{i}."
            sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                       b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                       b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(mlp * d, d),
                       b + "mlp.fc1.bias": r(mlp * d), b + "mlp.fc2.weight": r(d, mlp * d), b + "mlp.fc2.bias": r(d)})

    blocks("blocks.", width, depth)
    if encoder_norm:
        sd.update({"norm.weight": 1 + r(width), "norm.bias": r(width)})
    if decoder:
        dd, ddepth = decoder
        sd.update({"mask_token": r(1, 1, dd), "decoder_embed.weight": r(dd, width), "decoder_embed.bias": r(dd),
                   "decoder_pos_embed": sincos_2d(dd, grid, grid), "decoder_norm.weight": 1 + r(dd),
                   "decoder_norm.bias": r(dd), "decoder_pred.weight": r(patch * patch * 3, dd),
                   "decoder_pred.bias": r(patch * patch * 3)})
        blocks("decoder_blocks.", dd, ddepth)
    return sd


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad


def logits(enc, x):
    return enc.eval().forward_head(enc.forward_features(x))


# official MAE --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,patch,heads,name", [(768, 16, 12, "B/16"), (1024, 16, 16, "L/16"),
                                                      (1280, 14, 16, "H/14")])
def test_official_pretrain_checkpoint_shapes(tmp_path, width, patch, heads, name):
    # the released shapes, with one block each to stay small; the decoder as released (512 wide, 16 heads)
    sd = official_state_dict(width=width, depth=1, patch=patch, img=224, decoder=(512, 1), seed=1)
    path = tmp_path / "mae.pth"
    torch.save({"model": sd}, path)
    model, info = load_mae(path)
    assert info["format"] == "mae" and not info["decoder_initialised"] and info["unused"] == []
    enc = model.encoder.arch
    assert (enc["img_size"], enc["patch_size"], enc["embed_dim"], enc["depth"], enc["num_heads"]) == \
        (224, patch, width, 1, heads), name
    assert (model.arch["decoder_dim"], model.arch["decoder_depth"], model.arch["decoder_heads"]) == (512, 1, 16)
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k if k.startswith(("decoder_", "mask_token")) else "encoder." + k], v), k


def test_official_encoder_release_gets_fresh_decoder(tmp_path, caplog):
    sd = official_state_dict(decoder=None)
    torch.save({"model": sd}, tmp_path / "enc.pth")
    with caplog.at_level(logging.INFO, logger="mimkit"):
        model, info = load_mae(tmp_path / "enc.pth")
    assert info["decoder_initialised"] and any("decoder" in m for m in info["missing"])
    assert "freshly initialised" in caplog.text
    assert model.arch["decoder_dim"] == 128  # the 32 px preset decoder
    with pytest.raises(CheckpointError, match="no MAE decoder"):
        load_mae(tmp_path / "enc.pth", allow_missing_decoder=False)
    assert isinstance(mimkit.load(tmp_path / "enc.pth"), MaskedViT)
    model, _ = load_mae(tmp_path / "enc.pth", decoder=dict(decoder_dim=64, decoder_depth=2, decoder_heads=4))
    assert (model.arch["decoder_dim"], model.arch["decoder_depth"]) == (64, 2)


def test_official_training_checkpoint_with_args(tmp_path):
    # main_pretrain.py saves its argparse options too; they load (a Namespace holds plain values only)
    args = argparse.Namespace(model="mae_vit_micro", norm_pix_loss=False, mask_ratio=0.6, lr=None)
    torch.save({"model": official_state_dict(), "epoch": 3, "args": args}, tmp_path / "checkpoint-3.pth")
    model, info = load_mae(tmp_path / "checkpoint-3.pth")
    assert model.norm_pix_loss is False and model.mask_ratio == 0.6
    assert load_mae(tmp_path / "checkpoint-3.pth", norm_pix_loss=True)[0].norm_pix_loss


def test_official_finetuned_and_linprobe_heads(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    # fine-tuned with global pooling: fc_norm + head, no final norm; as timm's global_pool='avg' ViT
    sd = official_state_dict(decoder=None, encoder_norm=False)
    sd.update({"fc_norm.weight": 1 + 0.1 * torch.randn(96), "fc_norm.bias": 0.1 * torch.randn(96),
               "head.weight": 0.1 * torch.randn(10, 96), "head.bias": 0.1 * torch.randn(10)})
    torch.save({"model": sd}, tmp_path / "ft.pth")
    enc = load_encoder(tmp_path / "ft.pth")
    assert enc.num_classes == 10 and enc.global_pool == "avg" and enc.checkpoint_info["unused"] == []
    ref = timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=10,
                                        global_pool="avg").eval()
    ref.load_state_dict(sd)
    assert torch.allclose(logits(enc, x), ref(x), atol=1e-5)

    # linear probe: BatchNorm1d(affine=False, eps=1e-6) then Linear, on the class token
    sd = official_state_dict(decoder=None)
    mean, var = torch.randn(96), torch.rand(96) + 0.5
    w, b = torch.randn(10, 96), torch.randn(10)
    sd.update({"head.0.running_mean": mean, "head.0.running_var": var, "head.0.num_batches_tracked": torch.tensor(7),
               "head.1.weight": w, "head.1.bias": b})
    torch.save({"model": sd}, tmp_path / "lp.pth")
    enc = load_encoder(tmp_path / "lp.pth").eval()
    assert any("BatchNorm" in n for n in enc.checkpoint_info["notes"])
    cls = enc.forward_features(x)[:, 0]
    want = ((cls - mean) / (var + 1e-6).sqrt()) @ w.T + b
    assert torch.allclose(logits(enc, x), want, atol=1e-4)


def test_unused_keys_reported(tmp_path, caplog):
    sd = official_state_dict()
    sd["dist_token"] = torch.zeros(1, 1, 96)
    torch.save({"model": sd}, tmp_path / "x.pth")
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        _, info = load_mae(tmp_path / "x.pth")
    assert info["unused"] == ["dist_token"]
    assert "dist_token" in caplog.text


def test_mismatches_name_the_tensor_and_both_shapes(tmp_path):
    torch.save({"model": official_state_dict(depth=4)}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight.*\(96, 3, 4, 4\).*\(96, 3, 2, 2\)"):
        load_mae(tmp_path / "m.pth", model=create_mae("vit_micro_patch4_32", patch_size=2, decoder_dim=32,
                                                      decoder_depth=1, decoder_heads=2))
    with pytest.raises(CheckpointError, match=r"cls_token.*\(1, 1, 96\).*\(1, 1, 192\)"):
        load_mae(tmp_path / "m.pth", model=create_mae("vit_micro_patch4_32", embed_dim=192, decoder_dim=32,
                                                      decoder_depth=1, decoder_heads=2))
    with pytest.raises(CheckpointError, match=r"4 blocks \('blocks\.3\.norm1\.weight' is the last\).*has 2"):
        load_mae(tmp_path / "m.pth", model=create_mae("vit_micro_patch4_32", depth=2, decoder_dim=32,
                                                      decoder_depth=1, decoder_heads=2))
    sd = official_state_dict()
    sd["pos_embed"] = torch.zeros(1, 51, 96)  # not 1 + a square
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"'pos_embed' has shape \(1, 51, 96\)"):
        load(tmp_path / "bad.pth")
    sd["pos_embed"] = torch.zeros(1, 50, 96)  # 7x7 patches, while the decoder's table has 8x8
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"'decoder_pos_embed' has shape \(1, 65, 32\).*\(1, 50, 32\)"):
        load(tmp_path / "bad.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="no ViT encoder"):
        load(tmp_path / "none.pth")


def test_init_into_another_resolution_rebuilds_sincos(tmp_path):
    torch.save({"model": official_state_dict(img=32)}, tmp_path / "m.pth")
    target = create_mae("vit_micro_patch4_32", img_size=64, depth=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    model, info = load_mae(tmp_path / "m.pth", model=target)
    assert model is target and torch.equal(model.encoder.pos_embed, sincos_2d(96, 16, 16))
    assert any("rebuilt" in n for n in info["notes"])


# mimkit checkpoints and runs ----------------------------------------------------------------------------
def fit_style_checkpoint(model: MaskedAutoencoder, path):
    # the layout engine.fit writes: the objective's state dict (MAE under 'model.') and its arch
    state = {"format": "mimkit", "version": 1, "kind": "mae", "arch": model.arch,
             "model": {"model." + k: v for k, v in model.state_dict().items()}, "step": 10}
    return save_checkpoint(state, path)


def test_mimkit_checkpoint_and_run_directory(tmp_path):
    m = micro()
    run = tmp_path / "run"
    fit_style_checkpoint(m, run / "checkpoints" / "checkpoint-00000010.pt")
    for path in (run, run / "checkpoints" / "checkpoint-00000010.pt"):
        model = load(path)
        assert isinstance(model, MaskedAutoencoder) and model.arch == m.arch
        assert model.checkpoint_info["format"] == "mimkit" and model.checkpoint_info["unused"] == []
        assert_same(model.state_dict(), m.state_dict())
    enc = load_encoder(run)
    assert_same(enc.state_dict(), m.encoder.state_dict())
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load(tmp_path / "empty")


def test_mimkit_checkpoints_of_other_objectives(tmp_path):
    from mimkit.objectives.mae import MAEObjective
    from mimkit.objectives.simmim import SimMIMObjective
    torch.manual_seed(0)
    simmim = randomize(SimMIMObjective(create_mae("vit_micro_patch4_32", depth=2).encoder))
    save_checkpoint({"format": "mimkit", "kind": "simmim", "arch": simmim.arch, "model": simmim.state_dict()},
                    tmp_path / "simmim.pt")
    enc = load_encoder(tmp_path / "simmim.pt")
    assert_same(enc.state_dict(), simmim.encoder.state_dict())
    mae, info = load_mae(tmp_path / "simmim.pt")  # an encoder to continue with MAE: a fresh decoder
    assert info["decoder_initialised"] and "mask_token" in info["unused"]
    assert_same({k[8:]: v for k, v in mae.state_dict().items() if k.startswith("encoder.")},
                simmim.encoder.state_dict())
    # an MAE ablation (mask tokens in the encoder): rebuilt exactly, the extra tensor is the objective's
    obj = randomize(MAEObjective(micro(), mask_token_in_encoder=True))
    save_checkpoint({"format": "mimkit", "kind": "mae", "arch": obj.arch, "model": obj.state_dict()}, tmp_path / "a.pt")
    mae, info = load_mae(tmp_path / "a.pt")
    assert_same(mae.state_dict(), obj.model.state_dict())
    assert info["unused"] == ["enc_mask_token"]


# exports and round trips -----------------------------------------------------------------------------------
def test_round_trip_mimkit_mae_mimkit(tmp_path):
    m = micro(norm_pix_loss=False, mask_ratio=0.6)
    for out in ("m.pth", "m.safetensors"):
        path = export(m, "mae", tmp_path / out)
        back = load(path)
        assert isinstance(back, MaskedAutoencoder) and back.arch == m.arch
        assert_same(back.state_dict(), m.state_dict())
    raw = torch.load(tmp_path / "m.pth", weights_only=True)["model"]  # the release layout, official names
    assert "blocks.0.attn.qkv.weight" in raw and "decoder_blocks.0.mlp.fc1.weight" in raw and "mask_token" in raw
    enc_only = export(m, "mae", tmp_path / "enc.pth", encoder_only=True)
    assert not any(k.startswith("decoder") for k in torch.load(enc_only, weights_only=True)["model"])
    with pytest.raises(CheckpointError, match="exists"):
        export(m, "mae", tmp_path / "m.pth")


def test_export_timm_loads_in_timm_with_same_features(tmp_path):
    m = micro()
    x = torch.randn(2, 3, 32, 32)
    want = m.encoder.forward_features(x)
    shape = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    for out in ("enc.safetensors", "enc.pth"):
        path = export(m, "timm", tmp_path / out)
        t = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=0, **shape).eval()
        assert torch.allclose(t.forward_features(x), want, atol=1e-5)
        plain = timm.models.VisionTransformer(num_classes=0, **shape)
        plain.load_state_dict(timm.models.load_state_dict(str(path)))  # strict: the keys are timm's, as is
        back = load_encoder(path)
        assert back.arch == m.encoder.arch
        assert_same(back.state_dict(), m.encoder.state_dict())
    folder = export(m, "timm", tmp_path / "timm-folder")
    t = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert torch.allclose(t.forward_features(x), want, atol=1e-5)
    assert_same(load_encoder(folder).state_dict(), m.encoder.state_dict())


def test_export_timm_vit_base_mae_name(tmp_path):
    # the form, with timm's own MAE entry: a ViT-B/16 shape, two blocks
    torch.manual_seed(0)
    m = randomize(create_mae("vit_base_patch16_224", depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=2))
    path = export(m, "timm", tmp_path / "vitb.safetensors")
    t = timm.create_model("vit_base_patch16_224.mae", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(t.forward_features(x), m.encoder.forward_features(x), atol=1e-5)


def test_timm_state_dict_imports(tmp_path):
    torch.manual_seed(0)
    t = randomize(timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3,
                                               num_classes=0))
    torch.save(t.state_dict(), tmp_path / "t.pth")
    enc = load_encoder(tmp_path / "t.pth")
    assert enc.arch["num_heads"] == 3 and enc.checkpoint_info["format"] == "timm"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(enc.forward_features(x), t.forward_features(x), atol=1e-5)
    model, info = load_mae(tmp_path / "t.pth")
    assert info["decoder_initialised"]


# features ------------------------------------------------------------------------------------------------
def test_extract_features_pools_and_resolution():
    m = micro()
    x = torch.randn(3, 3, 32, 32)
    assert extract_features(m, x, "cls").shape == (3, 96)
    assert torch.equal(extract_features(m, x, "mean"), m.encoder.eval().extract(x, "mean"))
    assert extract_features(m.encoder, x, "all").shape == (3, 65, 96)
    assert extract_features(m, torch.randn(2, 3, 48, 48), "cls").shape == (2, 96)  # 12x12 patches, interpolated
    assert extract_features(m, torch.randn(2, 3, 48, 48), "all", img_size=32).shape == (2, 65, 96)
    with pytest.raises(ValueError):
        extract_features(m, x, "max")


def image_folder(root, n=3, size=32):
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_cli_export_and_embed(tmp_path):
    from mimkit.cli import main
    m = micro()
    ckpt = fit_style_checkpoint(m, tmp_path / "run" / "checkpoints" / "checkpoint-00000010.pt")
    assert main(["export", str(ckpt), "--to", "mae", str(tmp_path / "o.pth")]) == 0
    assert main(["export", "--to", "hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--to", "timm",
                 "--out", str(tmp_path / "t.pth")]) == 0
    assert_same(load(tmp_path / "o.pth").state_dict(), m.state_dict())
    assert_same(load(tmp_path / "hf").state_dict(), m.state_dict())
    assert_same(load(tmp_path / "t.pth").state_dict(), m.encoder.state_dict())
    assert main(["export", str(ckpt), "--to", "mae", str(tmp_path / "o.pth")]) == 2  # exists, no --force
    assert main(["export", str(tmp_path / "nope.pth"), "--to", "mae", str(tmp_path / "x.pth")]) == 2
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "--to", "mae", str(tmp_path / "a.pth"), str(tmp_path / "b.pth")])

    pytest.importorskip("mimkit.data")
    images = image_folder(tmp_path / "imgs")
    out = tmp_path / "feats.npy"
    assert main(["embed", str(tmp_path / "o.pth"), str(images), str(out), "--pool", "mean", "--device", "cpu",
                 "--num-workers", "0", "--batch-size", "2"]) == 0
    feats = np.load(out)
    names = (tmp_path / "feats.txt").read_text().split()
    assert feats.shape == (3, 96) and names == ["a/1.png", "b/0.png", "b/2.png"]
    from mimkit.data import make_loader, open_images
    x = next(iter(make_loader(open_images(images), [0], batch_size=1, recipe="eval", img_size=32, shuffle=False,
                              num_workers=0)))[0]
    assert np.allclose(feats[0], extract_features(m, x, "mean")[0].numpy(), atol=1e-5)
