"""Images of any channel count and bit depth: reading at full precision, value ranges, statistics, bad input,
and 1, 4 and 13 channels through pretraining, the evaluations, embed and reconstruct (data generated here)."""
import json
import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mimkit.config import FinetuneConfig, KnnConfig, LinprobeConfig, PretrainConfig, ReconstructConfig, load_config
from mimkit.data import decode_array, make_loader, open_images, resolve_pixels, split_train_val
from mimkit.data.pixels import channel_stats, to_input
from mimkit.errors import ConfigError, DataError

torch.set_num_threads(1)
MICRO = "vit_micro_patch4_32"


def png16(path, a):
    """A 16-bit PNG (grey or RGB) written byte by byte: PIL cannot write 16-bit RGB."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row, big-endian
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def folder(root, channels, n=12, size=32, kind="tif", seed=0, classes="ab"):
    """``n`` images in class folders: uint16 TIFFs (12-bit values), 16-bit grey PNGs or float32 .npy."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 4096, (size, size, channels)).astype(np.uint16)
        a[:, :, 0] += 1000 * (i % 2)  # the classes differ in their first channel
        if kind == "tif":
            tifffile.imwrite(d / f"{i:02d}.tif", a)
        elif kind == "png":
            Image.fromarray(a[:, :, 0]).save(d / f"{i:02d}.png")
        else:
            np.save(d / f"{i:02d}.npy", a.astype(np.float32) / 8192)
    return root


# reading at full precision -------------------------------------------------------------------------------------
def test_16bit_png_and_tiff_read_back_bit_exact(tmp_path):
    """Every 16-bit value comes back unchanged: grey and RGB PNG, contiguous and planar multi-band TIFF, a
    multi-page TIFF (a band per page), int16 13-band TIFF, .npy and .npz. Scaling 16-bit to 8-bit as PIL does for
    RGB PNGs (or /257 as the RGB path does for grey) fails this."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 65536, (17, 19, 1)).astype(np.uint16)
    rgb = rng.integers(0, 65536, (17, 19, 3)).astype(np.uint16)
    bands = rng.integers(0, 65536, (17, 19, 4)).astype(np.uint16)
    s2 = rng.integers(-32768, 32768, (17, 19, 13)).astype(np.int16)
    Image.fromarray(grey[:, :, 0]).save(tmp_path / "grey.png")
    png16(tmp_path / "rgb.png", rgb)
    tifffile.imwrite(tmp_path / "contig.tif", bands)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(bands, 2, 0), planarconfig="separate")
    with tifffile.TiffWriter(tmp_path / "pages.tif") as w:
        for c in range(4):
            w.write(bands[:, :, c])
    tifffile.imwrite(tmp_path / "s2.tif", np.moveaxis(s2, 2, 0))
    np.save(tmp_path / "a.npy", s2)
    np.savez(tmp_path / "a.npz", image=bands)
    for name, want in [("grey.png", grey), ("rgb.png", rgb), ("contig.tif", bands), ("planar.tif", bands),
                       ("pages.tif", bands), ("s2.tif", s2), ("a.npy", s2), ("a.npz", bands)]:
        got = decode_array((tmp_path / name).read_bytes(), name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name


def test_values_map_by_dtype_range_explicit_range_and_percentiles(tmp_path):
    """uint16 maps by /65535 (not /65536, not /257); an explicit LOW,HIGH maps and clips; pA,pB are numpy's
    per-channel percentiles of the sampled training images. Dividing by 65536, or percentiles over all channels
    together, fails this."""
    src = open_images(folder(tmp_path / "d", 4, n=6))
    spec = resolve_pixels(src, range(len(src)), mean="0,0,0,0", std="1,1,1,1")
    a = decode_array(src.read_bytes(0), src.names[0])
    x = to_input(a, spec, "x")
    assert spec.dtype == "float" and torch.equal(x, torch.from_numpy(a.astype(np.float32) / 65535).permute(2, 0, 1))
    spec = resolve_pixels(src, range(len(src)), value_range="100,3000", mean="0,0,0,0", std="1,1,1,1")
    x = to_input(a, spec, "x")
    want = np.clip((a.astype(np.float32) - 100) / 2900, 0, 1)
    assert torch.allclose(x, torch.from_numpy(want).permute(2, 0, 1)) and x.min() == 0 and x.max() == 1
    spec = resolve_pixels(src, range(len(src)), value_range="p2,p98", mean="0,0,0,0", std="1,1,1,1")
    every = np.concatenate([decode_array(src.read_bytes(i), "").reshape(-1, 4) for i in range(len(src))])
    lo, hi = np.percentile(every.astype(np.float64), [2, 98], axis=0)
    assert np.allclose(spec.low, lo) and np.allclose(spec.high, hi)


def test_auto_statistics_equal_numpy_over_the_same_sample(tmp_path):
    """``--mean auto --std auto`` is numpy's mean and (population) std over every pixel of the sampled training
    images, per channel, images of different sizes included. A mean of per-image means, or ddof=1, fails this."""
    root = folder(tmp_path / "d", 3, n=5)
    tifffile.imwrite(root / "a" / "big.tif", np.random.default_rng(5).integers(0, 65536, (48, 40, 3)).astype(np.uint16))
    src = open_images(root)
    spec = resolve_pixels(src, range(len(src)), mean="auto", std="auto")
    pixels = np.concatenate([decode_array(src.read_bytes(i), "").reshape(-1, 3) / 65535.0 for i in range(len(src))])
    assert np.allclose(spec.mean, pixels.mean(0), atol=1e-9) and np.allclose(spec.std, pixels.std(0), atol=1e-9)
    m, s = channel_stats(src, [0, 2], spec)  # a sample: those images only
    part = np.concatenate([decode_array(src.read_bytes(i), "").reshape(-1, 3) / 65535.0 for i in (0, 2)])
    assert np.allclose(m, part.mean(0)) and np.allclose(s, part.std(0))


def test_channel_count_from_data_and_conversion_on_read(tmp_path):
    """Grey files give one channel, RGB and grey photos together three (as always); --in-chans 1 turns RGB into
    PIL's convert('L') exactly. Taking the first channel instead of the luma fails this."""
    src = open_images(folder(tmp_path / "grey", 1, n=4, kind="png"))
    assert resolve_pixels(src, range(len(src))).in_chans == 1
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(mixed / "a.png")
    Image.fromarray(rgb[:, :, 0]).save(mixed / "b.png")
    src = open_images(mixed)
    spec = resolve_pixels(src, range(2))
    assert spec.in_chans == 3 and spec.is_rgb8
    spec = resolve_pixels(src, range(2), in_chans=1)
    x = to_input(decode_array(src.read_bytes(0), "a.png"), spec, "a.png")
    assert x.dtype == torch.uint8 and np.array_equal(x[0].numpy(), np.asarray(Image.fromarray(rgb).convert("L")))


def test_cached_and_per_image_paths_give_the_same_eval_batches(tmp_path):
    """The eval recipe is deterministic, so a 4-channel batch is the same from the in-memory cache (batched
    augmentation) and decoded per image (the tensor transform): a per-image path that skipped the value
    mapping or the normalisation fails this."""
    src = open_images(folder(tmp_path / "d", 4, n=6))
    spec = resolve_pixels(src, range(len(src)))
    kw = dict(batch_size=6, recipe="eval", img_size=32, shuffle=False, num_workers=0, pixels=spec)
    a, _ = next(iter(make_loader(src, cache="on", **kw)))
    b, _ = next(iter(make_loader(src, cache="off", **kw)))
    assert a.shape == (6, 4, 32, 32) and torch.allclose(a, b, atol=1e-5)
    assert abs(a.mean().item()) < 0.5 and 0.5 < a.std().item() < 2  # normalised by the auto statistics


# bad input: one line, naming the file or option, before training ----------------------------------------------
def test_bad_inputs_are_one_line_errors_naming_the_file_or_option(tmp_path):
    """Each bad input is refused up front with the file or option named; letting any through (e.g. no probe of
    the channel counts) fails this."""
    mixed = folder(tmp_path / "mixed", 4, n=4)
    tifffile.imwrite(mixed / "a" / "odd.tif", np.zeros((13, 32, 32), np.uint16))  # 13 planes
    src = open_images(mixed)
    with pytest.raises(DataError, match=r"odd\.tif: has 13 channel\(s\) but .*00\.tif has 4; one run takes one"):
        resolve_pixels(src, range(len(src)))
    with pytest.raises(DataError, match=r"odd\.tif.*13 channel\(s\), the run takes 4"):
        resolve_pixels(src, range(len(src)), in_chans=4)
    nan = tmp_path / "nan"
    nan.mkdir()
    np.save(nan / "ok.npy", np.zeros((8, 8, 2), np.float32))
    np.save(nan / "bad.npy", np.full((8, 8, 2), np.nan, np.float32))
    src = open_images(nan)
    with pytest.raises(DataError, match=r"bad\.npy: holds 128 NaN or infinite"):
        resolve_pixels(src, range(len(src)))
    dtypes = folder(tmp_path / "dtypes", 1, n=2, kind="png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(dtypes / "a" / "eight.png")
    src = open_images(dtypes)
    with pytest.raises(DataError, match=r"is uint8 but .* is uint16|is uint16 but .* is uint8"):
        resolve_pixels(src, range(len(src)))
    big = tmp_path / "big"
    big.mkdir()
    np.save(big / "x.npy", np.full((8, 8, 2), 3.0, np.float32))
    with pytest.raises(DataError, match=r"x\.npy: float values span .*--value-range"):
        resolve_pixels(open_images(big), [0])
    with pytest.raises(ConfigError, match=r"--mean has 2 value\(s\) but --in-chans is 4"):
        load_config(PretrainConfig, overrides=dict(in_chans=4, mean="0.1,0.2", std="auto"))
    with pytest.raises(ConfigError, match=r"--mean has 2 value\(s\) but the data has 4"):
        resolve_pixels(open_images(folder(tmp_path / "four", 4, n=2)), [0, 1], mean="0.1,0.2", std="0.1,0.2")
    with pytest.raises(ConfigError, match="--value-range"):
        load_config(PretrainConfig, overrides=dict(value_range="5,1"))
    with pytest.raises(ConfigError, match="--bands"):
        load_config(ReconstructConfig, overrides=dict(checkpoint=str(mixed), bands="4,3"))


def test_rgb_only_augmentations_and_objectives_refuse_other_channel_counts(tmp_path):
    """Colour jitter, RandAugment and the RGB-only objectives (BEiT's tokenizer, iGPT's palette) say so in one
    line instead of running on 4 channels; removing a check fails this."""
    from mimkit.pretrain import pretrain
    data = str(folder(tmp_path / "d", 4, n=8))
    src = open_images(data)
    spec = resolve_pixels(src, range(len(src)))
    with pytest.raises(ConfigError, match="rrc_jitter is a colour augmentation"):
        make_loader(src, batch_size=2, img_size=32, aug="rrc_jitter", pixels=spec, num_workers=0)
    with pytest.raises(ConfigError, match="RandAugment.*4 channel"):
        make_loader(src, batch_size=2, img_size=32, recipe="finetune", pixels=spec, num_workers=0,
                    auto_augment="rand-m9-mstd0.5-inc1")
    for objective in ("beit", "igpt"):
        cfg = load_config(PretrainConfig, overrides=dict(data=data, model=MICRO, objective=objective, max_steps=1,
                                                         output=str(tmp_path / objective), threads=1, num_workers=0))
        with pytest.raises(ConfigError, match=f"--objective {objective} works on RGB images only"):
            pretrain(cfg)


# end to end --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,kind", [(1, "png"), (4, "tif"), (13, "npy")])
def test_any_channel_count_through_pretrain_evaluations_embed_and_reconstruct(tmp_path, channels, kind):
    """1, 4 and 13 channels: pretrain (2 steps, with --eval-every), k-NN, linear probe, fine-tuning, embed and
    reconstruct, each reading the spec the checkpoint records (its mean/std are the auto statistics, not
    ImageNet's); a model that ignored in_chans, or a command that normalised with ImageNet's numbers, fails this."""
    from mimkit.checkpoints import load_encoder
    from mimkit.eval.finetune import finetune
    from mimkit.eval.knn import knn
    from mimkit.eval.linprobe import linprobe
    from mimkit.features import embed
    from mimkit.pretrain import pretrain
    from mimkit.viz import reconstruct
    data = str(folder(tmp_path / "d", channels, kind=kind))
    common = dict(data=data, threads=1, num_workers=0)
    run = tmp_path / "pre"
    pretrain(load_config(PretrainConfig, overrides=dict(common, model=MICRO, max_steps=2, batch_size=4,
                                                        output=str(run), decoder_depth=1, eval_every=1)))
    knn_lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "knn_top1" in line]
    assert [line["step"] for line in knn_lines] == [0, 2]  # --eval-every reads held-out images with the run's spec
    enc = load_encoder(str(run))
    assert enc.in_chans == channels and enc.arch["pixels"]["in_chans"] == channels
    src = open_images(data)
    train_idx = split_train_val(src, 0.1)[0]
    pixels = np.concatenate([decode_array(src.read_bytes(i), "").reshape(-1, channels).astype(np.float64)
                             for i in train_idx]) / (1 if kind == "npy" else 65535)  # floats in 0..1 stay as they are
    assert np.allclose(enc.arch["pixels"]["mean"], pixels.mean(0), atol=1e-6)
    for fn, cls, extra in [(knn, KnnConfig, {}), (linprobe, LinprobeConfig, dict(epochs=1, batch_size=4)),
                           (finetune, FinetuneConfig, dict(epochs=1, batch_size=4, randaug=""))]:
        out = tmp_path / cls.__name__
        res = fn(load_config(cls, overrides=dict(common, checkpoint=str(run), output=str(out), feature_cache="")
                             | extra))
        assert res["num_val"] == 2 and 0 <= res["top1"] <= 100
    info = embed(str(run), data, str(tmp_path / "emb.npy"), device="cpu", num_workers=0)
    assert info["shape"] == (12, enc.embed_dim)
    paths = reconstruct(load_config(ReconstructConfig, overrides=dict(
        checkpoint=str(run), images=data, output=str(tmp_path / "rec"), num_images=2, threads=1,
        **({"bands": "4,3,2"} if channels > 3 else {}))))
    fig = np.asarray(Image.open(paths[0]))
    assert fig.ndim == 3 and fig.shape[2] == 3
    if channels == 1:  # grey: the original panel has equal R, G and B
        panel = fig[2:fig.shape[0] // 2 - 2, 2:fig.shape[1] // 4 - 2]
        assert np.array_equal(panel[..., 0], panel[..., 1]) and panel.std() > 0
    assert json.loads((tmp_path / "rec" / "results.json").read_text())["images"] == 2


def test_separate_validation_set_and_file_lists(tmp_path):
    """--val-data: all of --data trains and the other set validates (classes matched by name); a CSV list with
    labels works wherever a folder does; a list naming a missing file, or a validation class unknown to the
    training set, is a one-line DataError. Ignoring --val-data (the fixed split instead) fails the counts."""
    from mimkit.eval.knn import knn
    from mimkit.pretrain import pretrain
    train = folder(tmp_path / "train", 4, n=8)
    val = folder(tmp_path / "val", 4, n=6, seed=3)
    rows = ["path,label"] + [f"train/{c}/{f.name},{c}" for c in "ab" for f in sorted((train / c).iterdir())]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "pre"
    common = dict(threads=1, num_workers=0)
    pretrain(load_config(PretrainConfig, overrides=dict(common, data=str(tmp_path / "train.csv"), model=MICRO,
                                                        max_steps=1, batch_size=4, output=str(run), decoder_depth=1)))
    res = knn(load_config(KnnConfig, overrides=dict(common, checkpoint=str(run), data=str(tmp_path / "train.csv"),
                                                    val_data=str(val), output=str(tmp_path / "knn"), feature_cache="")))
    assert res["num_train"] == 8 and res["num_val"] == 6
    (tmp_path / "bad.csv").write_text("train/a/00.tif,a\ntrain/a/missing.tif,a\n")
    with pytest.raises(DataError, match=r"missing\.tif, which does not exist"):
        open_images(tmp_path / "bad.csv")
    folder(tmp_path / "val2", 4, n=2, classes="c")
    with pytest.raises(DataError, match="class 'c' is not among the classes"):
        knn(load_config(KnnConfig, overrides=dict(common, checkpoint=str(run), data=str(train),
                                                  val_data=str(tmp_path / "val2"), output=str(tmp_path / "k2"))))


# exports and RGB weights ------------------------------------------------------------------------------------------
def randomized_mae(channels, seed=0):
    from mimkit.models import create_mae
    torch.manual_seed(seed)
    pixels = dict(in_chans=channels, dtype="float", low=None, high=None, mean=[0.3] * channels,
                  std=[0.2 + 0.01 * c for c in range(channels)])
    mae = create_mae(MICRO, depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4, in_chans=channels,
                     pixels=pixels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mae.named_parameters():
            if not name.endswith("pos_embed"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return mae.eval()


@pytest.mark.parametrize("channels", [1, 4, 13])
def test_exports_of_any_channel_count_load_back_equal(tmp_path, channels):
    """Hugging Face (num_channels, the data's image_mean/std) and timm (in_chans, pretrained_cfg mean/std) exports
    compute what the mimkit model computes (to 1e-5, as the RGB equivalence tests), and read back into mimkit with
    the same arch, pixel spec included. Writing num_channels 3, or ImageNet's statistics, fails this."""
    transformers = pytest.importorskip("transformers")
    import timm
    from mimkit.checkpoints import export, load_encoder, load_mae
    mae = randomized_mae(channels)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, channels, 32, 32, generator=g), torch.rand(2, 64, generator=g)
    out = export(mae, "hf", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert cfg["num_channels"] == channels and pre["image_mean"] == mae.encoder.arch["pixels"]["mean"]
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        a, b = mae(x, noise=noise), hf(pixel_values=x, noise=noise)
    assert (a.pred - b.logits).abs().max().item() <= 1e-5 and abs(a.loss.item() - b.loss.item()) <= 1e-5
    back, _ = load_mae(out)
    assert back.arch == mae.arch
    with torch.no_grad():
        assert (back(x, noise=noise).pred - a.pred).abs().max().item() <= 1e-5
    folder = export(mae, "timm", tmp_path / "timm")
    tcfg = json.loads((folder / "config.json").read_text())
    assert tcfg["model_args"]["in_chans"] == channels and tcfg["pretrained_cfg"]["input_size"][0] == channels
    assert tcfg["pretrained_cfg"]["std"] == mae.encoder.arch["pixels"]["std"]
    t = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert (t.forward_features(x) - mae.encoder.forward_features(x)).abs().max().item() <= 1e-5
    enc = load_encoder(folder)
    assert enc.arch == mae.encoder.arch


def test_rgb_weights_start_a_4_channel_model(tmp_path, caplog):
    """RGB weights (an official-layout MAE file) start a 4-channel MAE: the patch projection is timm's
    adapt_input_conv of the RGB one (R, G, B, R scaled by 3/4), every other encoder tensor is copied, the RGB
    decoder pixel head stays fresh, and the log says so; for one channel the projection is the sum over R, G, B.
    Loading the RGB projection truncated or unscaled fails this; so does refusing the load."""
    import logging
    from mimkit.checkpoints import export, load_encoder, load_mae
    from mimkit.models import MaskedViT, create_mae
    rgb = randomized_mae(3)
    path = export(rgb, "mae", tmp_path / "rgb.pth")
    four = create_mae(MICRO, depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4, in_chans=4)
    fresh_pred = four.decoder_pred.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="mimkit"):
        load_mae(path, model=four)
    w = rgb.encoder.patch_embed.proj.weight.detach()
    assert torch.allclose(four.encoder.patch_embed.proj.weight, torch.cat([w, w[:, :1]], 1) * 0.75)
    assert torch.equal(four.encoder.blocks[1].attn.qkv.weight, rgb.encoder.blocks[1].attn.qkv.weight)
    assert torch.equal(four.decoder_pred.weight, fresh_pred)
    assert "adapted to 4 channel(s)" in caplog.text and "freshly initialised" in caplog.text
    one = MaskedViT(**{k: v for k, v in dict(rgb.encoder.arch, in_chans=1).items() if k != "pixels"})
    load_encoder(path, model=one)
    assert torch.allclose(one.patch_embed.proj.weight, w.sum(1, keepdim=True))
    from mimkit.eval.knn import knn  # an evaluation with --in-chans 4 from the same RGB file: adapted, the data's stats
    data = folder(tmp_path / "d", 4, n=12)
    res = knn(load_config(KnnConfig, overrides=dict(checkpoint=str(path), data=str(data), in_chans=4, threads=1,
                                                    num_workers=0, output=str(tmp_path / "knn"), feature_cache="")))
    assert res["adapted_in_chans"] == 4 and res["num_val"] == 2
    two = randomized_mae(2)  # 2-channel weights adapt to nothing
    with pytest.raises(Exception, match="only RGB \\(3-channel\\) weights adapt"):
        load_mae(export(two, "mae", tmp_path / "two.pth"), model=create_mae(MICRO, depth=2, decoder_dim=64,
                                                                           decoder_depth=1, decoder_heads=4, in_chans=4))


def test_simmim_and_vit_mpp_pixels_take_any_channel_count():
    """SimMIM's and ViT-MPP's pixel heads predict p*p*C values for C channels and train on them; the head sized
    for 3 channels (p*p*3) fails this with a shape error."""
    from mimkit.models import create_encoder
    from mimkit.objectives.simmim import SimMIMObjective
    from mimkit.objectives.vit_mpp import ViTMPPObjective
    for objective in (SimMIMObjective(create_encoder(MICRO, depth=1, in_chans=4)),
                      ViTMPPObjective(create_encoder(MICRO, depth=1, in_chans=4), target="pixels")):
        assert objective.head.out_features == 4 * 4 * 4
        loss = objective(torch.randn(2, 4, 32, 32))
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        assert torch.isfinite(loss) and objective.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
