"""The lineage objectives: their masks, their targets on hand-made images, learning, checkpoints, the CLI path."""
import json

import pytest
import torch
import torch.nn.functional as F

from mimkit.checkpoint_files import load_latest
from mimkit.cli import main as cli
from mimkit.config import PretrainConfig, load_config
from mimkit.errors import ConfigError
from mimkit.masking import num_visible
from mimkit.models import MaskedAutoencoder, MaskedViT, patchify
from mimkit.objectives import OBJECTIVES, build_objective
from mimkit.objectives.beit import BEiTObjective
from mimkit.models.igpt import Palette, PixelTransformer
from mimkit.pixels import PixelSpec
from mimkit.objectives.igpt import IGPTObjective
from mimkit.objectives.mae import MAEObjective
from mimkit.objectives.simmim import SimMIMObjective
from mimkit.masking import draw_mask
from mimkit.objectives.targets import PCATarget, mean_colour_classes, mosaic_classes, pixel_target
from mimkit.objectives.vit_mpp import KEEP, MASK, RANDOM, ViTMPPObjective, corrupt
from mimkit.models.vq import VQTokenizer, load_tokenizer, save_tokenizer

torch.set_num_threads(1)


class FixedRandom:
    """Stands in for the engine's StepRandom: the same noise for the same shape, every step."""

    def __init__(self, seed=0):
        self.seed = seed

    def rand(self, batch, *shape):
        return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(self.seed))


def tiny_vit(img=16, patch=4):
    torch.manual_seed(0)
    return MaskedViT(img_size=img, patch_size=patch, embed_dim=32, depth=1, num_heads=2)


def tiny_tokenizer(img=16, patch=4, codes=8):
    torch.manual_seed(0)
    return VQTokenizer(img_size=img, patch_size=patch, codebook_size=codes, code_dim=8, hidden=16)


def tiny_images(n=8, size=16):
    from mimkit.data import make_loader
    loader = make_loader("builtin", list(range(0, 1000, 1000 // n))[:n], batch_size=n, recipe="eval", img_size=size,
                         shuffle=False, num_workers=0, cache="off")
    return next(iter(loader))[0]


def neighbours(mask, g):
    """Mean number of hidden 4-neighbours of a hidden patch."""
    m = mask.view(-1, 1, g, g).float()
    k = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    return float((F.conv2d(m, k, padding=1) * m).sum() / m.sum())


# masks -----------------------------------------------------------------------------------------------------
def test_random_and_block_masks_hide_the_ratio_and_blocks_are_blocks():
    torch.manual_seed(0)
    hidden = 196 - num_visible(196, 0.4)
    rand = draw_mask("random", 100, (14, 14), 0.4)
    block = draw_mask("block", 100, (14, 14), 0.4)
    assert rand.sum(1).tolist() == [hidden] * 100 and block.sum(1).tolist() == [hidden] * 100
    assert abs(hidden / 196 - 0.4) < 0.01  # BEiT hides about 40% (75 of 196 there)
    # block-wise masks are contiguous rectangles: far more hidden neighbours than uniform sampling gives
    assert neighbours(block, 14) > neighbours(rand, 14) + 1.0
    assert len({tuple(m.tolist()) for m in block}) > 90  # and every image gets its own


def test_masks_come_from_the_step_noise():
    a = draw_mask("block", 4, (8, 8), 0.5, FixedRandom(1))
    b = draw_mask("block", 4, (8, 8), 0.5, FixedRandom(1))
    c = draw_mask("block", 4, (8, 8), 0.5, FixedRandom(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    r = draw_mask("random", 2, (8, 8), 0.75, FixedRandom(3))
    noise = FixedRandom(3).rand(2, 64)
    # MAE's rule: the patches with the largest noise are hidden
    assert torch.equal(r, noise >= noise.sort(1).values[:, 16:17])


def test_grid_mask_keeps_one_patch_per_2x2_cell():
    g = draw_mask("grid", 2, (8, 8), 0.75)
    assert g.sum(1).tolist() == [48, 48]
    kept = (~g[0]).view(8, 8).nonzero().tolist()
    assert all(r % 2 == 0 and c % 2 == 0 for r, c in kept)


def test_vit_mpp_corrupts_half_with_80_10_10():
    g = torch.Generator().manual_seed(0)
    u1, u2 = torch.rand(400, 64, generator=g), torch.rand(400, 64, generator=g)
    corrupted, kind = corrupt(u1, u2, 0.5, 0.8, 0.1)
    assert corrupted.sum(1).tolist() == [32] * 400
    assert bool((kind[~corrupted] == KEEP).all())
    k = kind[corrupted]
    share = [float((k == v).float().mean()) for v in (MASK, RANDOM, KEEP)]
    assert share[0] == pytest.approx(0.8, abs=0.01) and share[1] == pytest.approx(0.1, abs=0.01)
    assert share[2] == pytest.approx(0.1, abs=0.01)


def test_vit_mpp_token_corruption_uses_mask_embedding_other_patches_or_none():
    obj = ViTMPPObjective(tiny_vit())
    tokens = torch.randn(3, 16, 32)
    out, corrupted, kind = obj.corrupt_tokens(tokens, FixedRandom(0))
    assert torch.equal(out[kind == KEEP], tokens[kind == KEEP])
    assert torch.allclose(out[kind == MASK], obj.mask_token[0].expand(int((kind == MASK).sum()), -1))
    flat = tokens.reshape(-1, 32)
    for b, i in (kind == RANDOM).nonzero().tolist():  # another patch's embedding, never its own
        matches = (flat == out[b, i]).all(1).nonzero().flatten().tolist()
        assert matches and b * 16 + i not in matches


def test_igpt_bert_masks_15_percent():
    net = PixelTransformer(img_size=16, resolution=8, palette_size=4, embed_dim=16, depth=2, num_heads=2, causal=False)
    obj = IGPTObjective(net, mask_ratio=0.15)
    seen = {}
    orig = net.run

    def spy(inputs, upto=None):
        seen["inputs"] = inputs
        return orig(inputs, upto)
    net.run = spy
    obj(torch.randn(2, 3, 16, 16), None, FixedRandom(0))
    assert (seen["inputs"] == net.special).sum(1).tolist() == [64 - num_visible(64, 0.15)] * 2  # 10 of 64


# targets on hand-made images -------------------------------------------------------------------------------
from_unit, to_unit = PixelSpec().normalize, PixelSpec().denormalize  # the default spec: ImageNet's statistics


def colour_image(colours, patch):
    """A 2x2-patch image, patch k filled with colours[k] (RGB in [0, 1]), normalised as the data pipeline does."""
    img = torch.zeros(1, 3, 2 * patch, 2 * patch)
    for k, c in enumerate(colours):
        r, col = divmod(k, 2)
        img[0, :, r * patch:(r + 1) * patch, col * patch:(col + 1) * patch] = torch.tensor(c).view(3, 1, 1)
    return from_unit(img)


def test_mean_colour_classes_are_3_bit_rgb():
    img = colour_image([(1, 0, 0), (0, 1, 0), (0, 0, 0), (1, 1, 1)], 4)
    assert mean_colour_classes(to_unit(img), 4).tolist() == [[7 * 64, 7 * 8, 0, 511]]
    half = torch.full((1, 3, 4, 4), 0.2)
    half[..., :2] = 0.9  # half dark, half light: mean 0.55, level 4 (of 0..7) in every channel
    assert mean_colour_classes(half, 4).tolist() == [[4 * 64 + 4 * 8 + 4]]
    assert to_unit(img).min() >= 0 and to_unit(img).max() <= 1


def test_mosaic_is_a_downsized_3_bit_patch():
    unit = torch.zeros(1, 3, 8, 8)
    unit[0, 0, :4, :4] = 1.0  # red top-left quarter
    unit[0, 2, 4:, 4:] = 0.3  # dim blue bottom-right quarter
    m = mosaic_classes(unit, 8, size=2)  # one 8 px patch -> 2x2 mosaic, (row, col, channel)
    assert m.shape == (1, 1, 12)
    assert m[0, 0].view(2, 2, 3).tolist() == [[[7, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 2]]]


def test_pixel_targets_match_mae():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(tiny_vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(pixel_target(x, 4, normalize=True), mae.target(x))
    assert torch.equal(pixel_target(x, 4, normalize=False), patchify(x, 4))


def test_palette_indices_and_kmeans():
    colours = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]])
    pal = Palette(4)
    pal.centers.copy_(colours)
    img = colour_image(colours.tolist(), 4)  # 8x8: four 4x4 patches
    # downsampled to 4x4, each pixel is one colour block; raster order
    assert pal.encode(img, 4, PixelSpec()).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert torch.allclose(pal.decode(pal.encode(img, 2, PixelSpec()), 2), colours.view(2, 2, 3).permute(2, 0, 1)[None])
    # k-means recovers four clusters of noisy pixels
    g = torch.Generator().manual_seed(0)
    pixels = (colours.repeat(500, 1) + 0.02 * torch.randn(2000, 3, generator=g)).clamp(0, 1)
    fitted = Palette(4).fit(pixels, iters=10)
    err = torch.cdist(colours, fitted.centers).min(1).values
    assert float(err.max()) < 0.05


def test_pca_target_finds_and_whitens_the_main_directions():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(12, 12, generator=g))[0][:, :2].T  # two orthonormal directions
    coef = torch.randn(5000, 2, generator=g) * torch.tensor([3.0, 1.0])
    x = coef @ u + 0.01 * torch.randn(5000, 12, generator=g) + 0.5
    pca = PCATarget(12, 2).fit(x.view(50, 100, 12))
    assert abs(float(pca.components[0] @ u[0])) > 0.99 and abs(float(pca.components[1] @ u[1])) > 0.99
    z = pca(x)
    assert torch.allclose(z.std(0), torch.ones(2), atol=0.05) and torch.allclose(z.mean(0), torch.zeros(2), atol=0.05)


def test_tokenizer_ids_one_per_patch():
    tok = tiny_tokenizer().eval()
    flat = from_unit(torch.full((1, 3, 16, 16), 0.5))
    ids = tok.encode(flat)
    assert ids.shape == (1, 16) and ids.dtype == torch.long and int(ids.max()) < 8
    # a uniform image: every interior patch sees the same pixels, so gets the same token
    grid = ids.view(4, 4)
    assert grid[1, 1] == grid[1, 2] == grid[2, 1] == grid[2, 2]
    # ids are the nearest codes of the encoder's outputs, and decode back to an image
    z = tok.enc(flat).permute(0, 2, 3, 1).reshape(-1, 8)
    d = torch.cdist(z, tok.quantize.codebook)
    assert torch.equal(ids.flatten(), d.argmin(1))
    assert tok.decode(ids, (4, 4)).shape == (1, 3, 16, 16)


# learning --------------------------------------------------------------------------------------------------
def trained_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    x = tiny_images(8, 16)
    for _ in range(5):
        loss = tok(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = save_tokenizer(tok, tmp_path / "tok" / "tokenizer.pt")
    return load_tokenizer(path)


def objectives_for_learning(tok):
    enc = tiny_vit
    mae = lambda **kw: MAEObjective(MaskedAutoencoder(enc(), decoder_dim=16, decoder_depth=1, decoder_heads=2,  # noqa
                                                      pred_dim=kw.pop("pred_dim", None)), **kw)
    pca = mae(target="pca", pca_components=6, pred_dim=6)
    pca.pca.fit(patchify(tiny_images(8, 16), 4))
    net = lambda causal: PixelTransformer(img_size=16, resolution=8, palette_size=8, embed_dim=32, depth=1,  # noqa
                                          num_heads=2, causal=causal)
    igpt_ar, igpt_bert = IGPTObjective(net(True)), IGPTObjective(net(False), mask_ratio=0.3)
    for o in (igpt_ar, igpt_bert):
        o.encoder.palette.fit(to_unit(tiny_images(8, 16)).permute(0, 2, 3, 1).reshape(-1, 3), iters=5)
    return {
        "mae-block-encoder-mask-token": mae(masking="block", mask_token_in_encoder=True),
        "mae-grid": mae(masking="grid"),
        "mae-pca": pca,
        "mae-tokens": mae(target="tokens", tokenizer_arch=tok.arch, tokenizer=tok, pred_dim=8),
        "simmim": SimMIMObjective(enc(), mask_ratio=0.6),
        "vit_mpp-mean_colour": ViTMPPObjective(enc()),
        "vit_mpp-mosaic": ViTMPPObjective(enc(), target="mosaic", mosaic_size=2),
        "vit_mpp-pixels": ViTMPPObjective(enc(), target="pixels"),
        "beit": BEiTObjective(enc(), tok.arch, tokenizer=tok, min_block=2),
        "igpt-ar": igpt_ar,
        "igpt-bert": igpt_bert,
    }


def test_every_objective_learns_a_tiny_set_and_rebuilds_from_its_arch(tmp_path):
    tok = trained_tokenizer(tmp_path)
    x = tiny_images(8, 16)
    for name, obj in objectives_for_learning(tok).items():
        torch.manual_seed(0)
        opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for _ in range(12):
            loss = obj(x, None, FixedRandom(0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert sum(losses[-3:]) < sum(losses[:3]), (name, losses)
        # a checkpoint's kind + arch rebuild the same objective; the encoder feeds the evaluations
        again = OBJECTIVES[obj.name].build(obj.arch)
        again.load_state_dict(obj.state_dict())
        obj.eval(), again.eval()
        with torch.no_grad():
            assert torch.allclose(obj.encoder.extract(x, "cls"), again.encoder.extract(x, "cls"), atol=1e-5), name
            assert again.encoder.extract(x, "mean").shape == (8, 32)
        if getattr(obj, "tokenizer", None) is not None:  # the frozen tokenizer is not trained
            obj.train()
            assert all(not p.requires_grad for p in obj.tokenizer.parameters()) and not obj.tokenizer.training


def test_mae_with_default_options_is_the_plain_model():
    torch.manual_seed(0)
    obj = MAEObjective(MaskedAutoencoder(tiny_vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2))
    x = torch.randn(2, 3, 16, 16)
    assert not obj.ablation and obj.arch == obj.model.arch
    # the ablation path with MAE's own choices computes exactly MAE's loss from the same noise
    plain = obj(x, None, FixedRandom(5))
    assert torch.allclose(plain, obj.forward_ablation(x, FixedRandom(5)), atol=1e-6)


def test_igpt_features_from_any_layer():
    net = PixelTransformer(img_size=16, resolution=8, palette_size=8, embed_dim=16, depth=4, num_heads=2)
    assert net.feature_layer == 2  # the middle, where iGPT's best features are
    obj = IGPTObjective(net)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        f1, f4 = obj.features(x, layer=1), obj.features(x, layer=4)
        assert f1.shape == f4.shape == (3, 16) and not torch.allclose(f1, f4)
        assert torch.allclose(net.extract(x, "cls"), obj.features(x, 2))
    # causal: the features of the first pixels do not depend on later ones
    a = torch.randn(1, 3, 16, 16)
    b = a.clone()
    b[..., 8:, :] = -a[..., 8:, :]
    with torch.no_grad():
        fa, fb = net.forward_features(a, 3), net.forward_features(b, 3)
    assert torch.allclose(fa[:, :20], fb[:, :20], atol=1e-5)


# options ---------------------------------------------------------------------------------------------------
def cfg(**kw):
    return load_config(PretrainConfig, None, {"model": "vit_micro_patch4_32", **kw})


@pytest.mark.parametrize("objective,args,message", [
    ("vit_mpp", {"tgt": "mosaic"}, "--objective-args: unknown option tgt; did you mean target? (objective vit_mpp)"),
    ("vit_mpp", {"target": "colour"}, "--objective-args: target must be one of mean_colour, mosaic, pixels; got 'colour' "
                                      "(objective vit_mpp)"),
    ("vit_mpp", {"mask_prob": 0.5, "random_prob": 0.6}, "mask_prob + random_prob must be <= 1 (objective vit_mpp)"),
    ("beit", {"mask_ratio": 1.5}, "--objective-args: mask_ratio must be in (0, 1), got 1.5 (objective beit)"),
    ("vit_mpp", {"target": "mosaic", "mosaic_size": 3}, "mosaic_size 3 must divide the patch size 4"),
    ("beit", {}, "objective beit needs tokenizer: PATH"),
    ("beit", {"tokenizer": "/nonexistent/tok.pt"}, "tokenizer: no such checkpoint"),
    ("mae", {"masking": "blocks"}, "masking must be one of random, block, grid; got 'blocks' (objective mae)"),
    ("mae", {"mask_token_in_encoder": "maybe"}, "mask_token_in_encoder must be true or false, got 'maybe' (objective mae)"),
    ("mae", {"pca_images": 2.5}, "pca_images must be an integer, got 2.5 (objective mae)"),
    ("mae", {"target": "tokens"}, "objective mae needs tokenizer: PATH"),
    ("simmim", {"loss": "l3"}, "loss must be one of l1, l2; got 'l3' (objective simmim)"),
    ("igpt", {"mode": "gpt"}, "mode must be one of ar, bert; got 'gpt' (objective igpt)"),
    ("maee", {}, "got 'maee' (did you mean mae?)"),
    ("igpt", {"resolution": 5}, "resolution 5 for objective igpt must divide the image size 32"),
])
def test_bad_objective_args_are_one_line_errors(objective, args, message):
    with pytest.raises(ConfigError) as e:
        build_objective(cfg(objective=objective, objective_args=args))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_must_give_one_token_per_patch(tmp_path):
    tok = VQTokenizer(img_size=32, patch_size=8, codebook_size=4, code_dim=4, hidden=8)
    save_tokenizer(tok, tmp_path / "tokenizer.pt")
    with pytest.raises(ConfigError, match="patch size 8 differs from the encoder's 4"):
        build_objective(cfg(objective="beit", objective_args={"tokenizer": str(tmp_path)}))


def test_paper_mask_ratios_unless_asked_otherwise(tmp_path):
    save_tokenizer(VQTokenizer(img_size=32, patch_size=4, codebook_size=4, code_dim=4, hidden=8),
                   tmp_path / "tokenizer.pt")
    tok = {"tokenizer": str(tmp_path / "tokenizer.pt")}
    assert build_objective(cfg(objective="beit", objective_args=tok)).mask_ratio == 0.4
    assert build_objective(cfg(objective="beit", mask_ratio=0.6, objective_args=tok)).mask_ratio == 0.6
    assert build_objective(cfg(objective="vit_mpp")).mask_ratio == 0.5
    assert build_objective(cfg(objective="vit_mpp", objective_args={"mask_ratio": 0.75})).mask_ratio == 0.75
    assert build_objective(cfg(objective="simmim")).mask_ratio == 0.75  # SimMIM follows --mask-ratio


# the command line ------------------------------------------------------------------------------------------
COMMON = ["--data", "builtin", "--model", "vit_micro_patch4_32", "--max-steps", "2", "--batch-size", "16",
          "--threads", "1", "--num-workers", "0", "--figure-every", "0", "--log-every", "1"]


def test_cli_tokenizer_then_every_objective_pretrains_and_evaluates(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    assert cli(["tokenizer", "train", "--data", "builtin", "--output", str(tok_dir), "--codebook-size", "16",
                "--max-steps", "3", "--batch-size", "16", "--threads", "1", "--num-workers", "0"]) == 0
    info = json.loads((tok_dir / "tokenizer.json").read_text())
    assert info["codebook_size"] == 16 and 0 < info["val_codes_used"] <= 16
    runs = {
        "mae": "{masking: block, mask_token_in_encoder: true}",
        "simmim": "{target: norm_pixels}",
        "vit_mpp": "{target: mosaic}",
        "beit": f"{{tokenizer: {tok_dir}}}",
        "igpt": "{palette_size: 16, palette_images: 64, resolution: 8}",
    }
    for name, args in runs.items():
        out = tmp_path / name
        assert cli(["pretrain", "--objective", name, "--objective-args", args, "--output", str(out)] + COMMON) == 0
        state = load_latest(out)
        assert state["kind"] == name and state["step"] == 2
    # the evaluations read any of them the same way, iGPT's pixel Transformer included
    for name in ("igpt", "beit"):
        assert cli(["knn", "--checkpoint", str(tmp_path / name), "--data", "builtin", "--threads", "1",
                    "--num-workers", "0", "--output", str(tmp_path / f"knn-{name}")]) == 0
        res = json.loads((tmp_path / f"knn-{name}" / "results.json").read_text())
        assert 0 <= res["top1"] <= 100
    assert cli(["pretrain", "--objective", "vit_mpp", "--objective-args", "{tgt: mosaic}",
                "--output", str(tmp_path / "bad")] + COMMON) == 2
    assert "unknown option tgt; did you mean target? (objective vit_mpp)" in capsys.readouterr().err
