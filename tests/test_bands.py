"""Bands by name and colour on the true pixels (issue 21): RGB weights by role, checkpoints meeting data by band
name, colour targets and iGPT's palette on the run's statistics, the band names in exports, figures by role.
Data are generated here: 4-band uint16 GeoTIFFs whose band descriptions name them, and dark 8-bit RGB PNGs."""
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mimkit.config import KnnConfig, PretrainConfig, load_config
from mimkit.errors import ConfigError, DataError
from mimkit.pixels import PixelSpec, parse_pixel_options

torch.set_num_threads(1)
MICRO = "vit_micro_patch4_32"
S2 = ("B02", "B03", "B04", "B08")  # Sentinel-2's blue, green, red, near infrared, as its files store them


def geotiff(path, a, names=None):
    """A uint16 TIFF with GDAL's band descriptions (what rasterio's ``descriptions`` writes) when ``names``."""
    tags = []
    if names:
        xml = "<GDALMetadata>" + "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>'
                                          for i, n in enumerate(names)) + "</GDALMetadata>"
        tags = [(42112, "s", 0, xml, True)]
    tifffile.imwrite(path, a, photometric="minisblack", planarconfig="contig", extratags=tags)


def band_folder(root, names=S2, order=(0, 1, 2, 3), n=8, described=True):
    """``n`` images of 4 bands in class folders; ``order`` picks which of the same underlying bands each file
    channel holds (the same scenes stored in another band order), named ``names`` in the files."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 4096, (32, 32, 4)).astype(np.uint16)
        a[:, :, 0] += 1500 * (i % 2)
        geotiff(d / f"{i:02d}.tif", a[:, :, list(order)], names if described else None)
    return root


def micro_mae(channels=3, pixels=None, seed=0, depth=2):
    from mimkit.models import create_mae
    torch.manual_seed(seed)
    mae = create_mae(MICRO, depth=depth, decoder_dim=64, decoder_depth=1, decoder_heads=4, in_chans=channels,
                     pixels=pixels)
    with torch.no_grad():
        for name, p in mae.named_parameters():
            if not name.endswith("pos_embed"):
                p.add_(torch.randn(p.shape) * 0.05)
    return mae.eval()


# RGB weights by role ------------------------------------------------------------------------------------------------
def test_rgb_weights_go_to_bands_by_role_and_the_mapping_is_logged(tmp_path, caplog):
    """A B02,B03,B04,B08 model with roles red=B04, green=B03, blue=B02 starts from RGB weights: each band's kernel
    is its colour's kernel x 3/4, near infrared the mean of the three x 3/4 (the kernels sum as RGB's did), and the
    log names each band's source. timm's position rule (B02 <- red, B04 <- blue) fails this. Without roles the
    position rule stays, with a warning naming --bands; a 3-band BGR model gets the kernels swapped."""
    from mimkit.checkpoints import export, load_mae
    from mimkit.models import create_mae
    rgb = micro_mae(3)
    path = export(rgb, "mae", tmp_path / "rgb.pth")
    w = rgb.encoder.patch_embed.proj.weight.detach()
    spec = PixelSpec(in_chans=4, dtype="float", mean=(0.3,) * 4, std=(0.2,) * 4, band_names=S2, rgb=(2, 1, 0))
    shape = dict(depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    four = create_mae(MICRO, in_chans=4, pixels=spec, **shape)
    with caplog.at_level(logging.INFO, logger="mimkit"):
        load_mae(path, model=four)
    got = four.encoder.patch_embed.proj.weight.detach()
    for band, source in ((0, w[:, 2]), (1, w[:, 1]), (2, w[:, 0]), (3, w.mean(1))):
        assert torch.allclose(got[:, band], source * 0.75, atol=1e-7), band
    assert torch.allclose(got.sum(1), w.sum(1), atol=1e-6)
    assert "B02 <- blue kernel" in caplog.text and "B04 <- red kernel" in caplog.text
    assert "B08 <- mean of the red, green, blue kernels" in caplog.text

    caplog.clear()
    plain = create_mae(MICRO, in_chans=4, pixels=replace(spec, rgb=None), **shape)
    with caplog.at_level(logging.INFO, logger="mimkit"):
        load_mae(path, model=plain)
    assert torch.allclose(plain.encoder.patch_embed.proj.weight, torch.cat([w, w[:, :1]], 1) * 0.75)
    assert "by position" in caplog.text and "--bands" in caplog.text

    bgr = create_mae(MICRO, in_chans=3, pixels=PixelSpec(rgb=(2, 1, 0)), **shape)
    load_mae(path, model=bgr)
    assert torch.equal(bgr.encoder.patch_embed.proj.weight, w[:, [2, 1, 0]])


def test_init_from_a_named_checkpoint_matches_bands_by_name(tmp_path):
    """--init from a B02,B03,B04,B08 checkpoint into a model of the same bands in another order takes each band's
    kernel by name; a model with another band set is refused naming both lists. Loading by position fails the
    first check."""
    from mimkit.checkpoints import export, load_mae
    from mimkit.errors import CheckpointError
    from mimkit.models import create_mae
    spec = PixelSpec(in_chans=4, dtype="float", mean=(0.3,) * 4, std=(0.2,) * 4, band_names=S2)
    path = export(micro_mae(4, pixels=spec), "mae", tmp_path / "s2.pth")
    w = load_mae(path)[0].encoder.patch_embed.proj.weight.detach()
    shape = dict(depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4, in_chans=4)
    moved = create_mae(MICRO, pixels=replace(spec, band_names=("B04", "B03", "B02", "B08")), **shape)
    load_mae(path, model=moved)
    assert torch.equal(moved.encoder.patch_embed.proj.weight, w[:, [2, 1, 0, 3]])
    other = create_mae(MICRO, pixels=replace(spec, band_names=("B02", "B03", "B04", "B05")), **shape)
    with pytest.raises(CheckpointError, match="the model's bands B02,B03,B04,B05 do not match the checkpoint's B02,B03,B04,B08"):
        load_mae(path, model=other)


def test_pretrain_init_and_evaluations_take_roles_by_name_from_tiff_descriptions(tmp_path, caplog):
    """pretrain --init RGB weights on 4-band GeoTIFFs: the band names come from the files' descriptions, --bands
    B04,B03,B02 maps the kernels (lr 0, so the checkpoint holds the start), and the checkpoint stores names and
    roles; knn --in-chans 4 --bands 3,2,1 adapts the same RGB file by role too."""
    from mimkit.checkpoints import export, load_encoder
    from mimkit.eval.common import eval_data, load_eval_encoder
    from mimkit.pretrain import pretrain
    from mimkit.models import ENCODERS
    rgb = micro_mae(3, depth=ENCODERS[MICRO]["depth"])
    path = export(rgb, "mae", tmp_path / "rgb.pth")
    w = rgb.encoder.patch_embed.proj.weight.detach()
    data = band_folder(tmp_path / "d")
    run = tmp_path / "run"
    pretrain(load_config(PretrainConfig, overrides=dict(
        data=str(data), model=MICRO, init=str(path), bands="B04,B03,B02", max_steps=1, batch_size=4, base_lr=0.0,
        decoder_depth=1, decoder_dim=64, decoder_heads=4, output=str(run), threads=1, num_workers=0,
        precision="fp32", device="cpu", figure_every=0)))
    enc = load_encoder(str(run))
    assert enc.pixels.band_names == S2 and enc.pixels.rgb == (2, 1, 0)
    got = enc.patch_embed.proj.weight.detach()
    expect = torch.stack([w[:, 2], w[:, 1], w[:, 0], w.mean(1)], 1) * 0.75
    assert torch.allclose(got, expect, atol=1e-6)

    cfg = load_config(KnnConfig, overrides=dict(checkpoint=str(path), data=str(data), in_chans=4, bands="3,2,1",
                                                val_fraction=0.25, output=str(tmp_path / "knn"), threads=1, num_workers=0))
    source, train_idx, val_idx, _ = eval_data(cfg)
    adapted, info = load_eval_encoder(cfg, source, train_idx + val_idx)
    assert info["adapted_in_chans"] == 4 and adapted.pixels.rgb == (2, 1, 0)
    assert torch.allclose(adapted.patch_embed.proj.weight, expect, atol=1e-6)


# checkpoints meet data by name ------------------------------------------------------------------------------------
def test_a_checkpoint_reads_data_of_another_band_order_by_name_and_refuses_another_band_set(tmp_path, caplog):
    """A checkpoint trained on B02,B03,B04,B08 embeds the same scenes stored B04,B03,B02,B08 (named by the TIFF
    descriptions, or by --band-names) to the same features; data with B05 in place of B08 is refused in one
    line naming both lists; unnamed data is read in file order with a warning. Reading by position fails the
    first check."""
    from mimkit.features import embed
    from mimkit.pretrain import pretrain
    run = tmp_path / "run"
    pretrain(load_config(PretrainConfig, overrides=dict(
        data=str(band_folder(tmp_path / "d")), model=MICRO, max_steps=1, batch_size=4, decoder_depth=1,
        output=str(run), threads=1, num_workers=0, precision="fp32", device="cpu", figure_every=0)))
    emb = lambda data, **kw: np.load(embed(str(run), str(data), str(tmp_path / "e.npy"), device="cpu",  # noqa: E731
                                           num_workers=0, **kw)["features"])
    base = emb(tmp_path / "d")
    swapped = band_folder(tmp_path / "s", names=("B04", "B03", "B02", "B08"), order=(2, 1, 0, 3))
    with caplog.at_level(logging.INFO, logger="mimkit"):
        assert np.allclose(emb(swapped), base, atol=1e-5)
    assert "bands by name" in caplog.text
    unnamed = band_folder(tmp_path / "u", order=(2, 1, 0, 3), described=False)
    assert np.allclose(emb(unnamed, band_names="B04,B03,B02,B08"), base, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        assert not np.allclose(emb(unnamed), base, atol=1e-5)  # by position: another input
    assert "the data names none" in caplog.text
    other = band_folder(tmp_path / "o", names=("B02", "B03", "B04", "B05"))
    with pytest.raises(DataError, match="bands B02,B03,B04,B08 do not match the data's B02,B03,B04,B05"):
        emb(other)


def test_an_rgb_encoder_reads_bgr_files_by_role(tmp_path):
    """--bands 3,2,1 on BGR files for an RGB encoder: the files' blue, green, red are read into the encoder's blue,
    green, red channels, so the input equals that of the same images stored RGB. Roles for the figures only
    (the old --bands) fail this."""
    from mimkit.data import make_loader, open_images, reuse_pixels
    rgb = dark_rgb_folder(tmp_path / "rgb")
    for f in sorted(rgb.rglob("*.png")):  # the same scenes stored blue, green, red
        out = tmp_path / "bgr" / f.relative_to(rgb)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(f))[:, :, ::-1].copy()).save(out)
    batch = lambda src, spec: next(iter(make_loader(src, range(len(src)), batch_size=len(src), recipe="eval",  # noqa
                                                    img_size=32, shuffle=False, num_workers=0, cache="off",
                                                    device="cpu", pixels=spec)))[0]
    bgr = open_images(str(tmp_path / "bgr"))
    spec = reuse_pixels(PixelSpec(), bgr, range(len(bgr)), bands="3,2,1")
    assert spec.order == (2, 1, 0)
    src = open_images(str(rgb))
    assert torch.allclose(batch(bgr, spec), batch(src, PixelSpec()), atol=1e-6)


def test_band_options_are_checked_before_work():
    with pytest.raises(ConfigError, match="--bands must be three different bands"):
        parse_pixel_options(bands="B04,B03")
    with pytest.raises(ConfigError, match="band name.*B02.*repeat"):
        parse_pixel_options(band_names="B02,B02,B03")
    with pytest.raises(ConfigError, match="--band-names names 2 band"):
        load_config(PretrainConfig, overrides=dict(in_chans=3, band_names="a,b"))
    assert parse_pixel_options(band_names="B02,B03").band_names == ("B02", "B03")


def test_band_names_from_a_file(tmp_path):
    (tmp_path / "bands.txt").write_text("B02\nB03\nB04\nB08\n")
    assert parse_pixel_options(band_names=f"@{tmp_path / 'bands.txt'}").band_names == S2
    with pytest.raises(ConfigError, match="cannot read"):
        parse_pixel_options(band_names=f"@{tmp_path / 'missing.txt'}")


# colour on the true pixels ----------------------------------------------------------------------------------------
LEVELS = (16, 48, 80)  # 8-bit values at the centres of 3-bit bins 0, 1, 2: dark images, far from ImageNet's mean


def dark_rgb_folder(root, n=12):
    """32 px RGB PNGs of 4x4 blocks of one colour each, every channel one of LEVELS."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        blocks = rng.choice(LEVELS, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)).save(d / f"{i:02d}.png")
    return root


def true_and_input(data, spec):
    """The training images as [0, 1] file values and as the run's loader gives them (eval recipe: no resize)."""
    from mimkit.data import make_loader, open_images, split_train_val
    src = open_images(str(data))
    idx = split_train_val(src, 0.1)[0]
    unit = torch.stack([torch.from_numpy(np.asarray(Image.open(Path(src.root) / src.names[i]))).permute(2, 0, 1)
                        for i in idx]).float() / 255
    loader = make_loader(src, idx, batch_size=len(idx), recipe="eval", img_size=32, shuffle=False, num_workers=0,
                         cache="off", device="cpu", pixels=spec)
    return unit, next(iter(loader))[0]


def auto_run(tmp_path, objective, **args):
    from mimkit.data import open_images, resolve_pixels, split_train_val
    from mimkit.objectives import get_objective, parse_options
    data = dark_rgb_folder(tmp_path / "d")
    src = open_images(str(data))
    spec = resolve_pixels(src, split_train_val(src, 0.1)[0], mean="auto", std="auto")
    assert spec.mean[0] < 0.25  # far from ImageNet's 0.485
    cfg = load_config(PretrainConfig, overrides=dict(data=str(data), model=MICRO, objective=objective,
                                                     objective_args=args, mean="auto", std="auto",
                                                     pixels=spec.to_dict()))
    cls = get_objective(objective)
    obj = cls.from_config(cfg, parse_options(objective, cfg.objective_args))
    return obj, spec, data


def test_vit_mpp_colour_targets_use_the_runs_statistics(tmp_path):
    """ViT-MPP with --mean/--std auto on RGB data: the loader normalises with those statistics and the mean-colour
    and mosaic targets undo them, so the classes are those of the files' own colours. ImageNet's numbers on
    either side (the loader's or the targets') give other classes."""
    from mimkit.objectives.targets import mean_colour_classes, mosaic_classes
    obj, spec, data = auto_run(tmp_path, "vit_mpp")
    assert obj.encoder.pixels == spec
    unit, images = true_and_input(data, spec)
    assert torch.allclose(spec.denormalize(images), unit, atol=1e-6)
    assert torch.equal(obj.targets(images), mean_colour_classes(unit, 4))
    obj.target = "mosaic"
    assert torch.equal(obj.targets(images), mosaic_classes(unit, 4, 4))
    assert not torch.equal(mean_colour_classes(PixelSpec().denormalize(images), 4), mean_colour_classes(unit, 4))


def test_igpt_palette_and_targets_use_the_runs_statistics(tmp_path):
    """iGPT with --mean/--std auto on RGB data: the palette is fitted on the files' own colours (every centre
    inside their range) and each batch's palette ids are those of its true colours; ImageNet's numbers on the
    input side would push the colours out of that range."""
    import torch.nn.functional as F
    obj, spec, data = auto_run(tmp_path, "igpt", palette_size=8, palette_images=16, kmeans_iters=3)
    net = obj.encoder
    assert net.pixels == spec and net.arch["pixels"] == spec.to_dict()
    lo, hi = min(LEVELS) / 255, max(LEVELS) / 255
    assert net.palette.centers.min() >= lo - 1e-6 and net.palette.centers.max() <= hi + 1e-6
    unit, images = true_and_input(data, spec)
    small = F.interpolate(unit, size=(net.resolution,) * 2, mode="area")
    assert torch.equal(net.tokens(images), net.palette.assign(small.permute(0, 2, 3, 1)).flatten(1))
    shifted = PixelSpec().denormalize(images)  # what ImageNet's statistics make of these inputs
    assert shifted.max() > hi + 0.1


# exports and figures ----------------------------------------------------------------------------------------------
def test_exports_carry_band_names_and_load_in_timm_and_transformers(tmp_path):
    """The Hugging Face export's config has band_names (and the whole spec in mimkit_pixels), the timm folder's
    config.json has them at its top level (pretrained_cfg stays timm's own: create_model refuses unknown keys
    there); both load with timm.create_model (local-dir and pretrained_cfg_overlay file=) and from_pretrained,
    and read back into mimkit with names and roles."""
    transformers = pytest.importorskip("transformers")
    import timm
    from mimkit.checkpoints import export, load_encoder, load_mae
    spec = PixelSpec(in_chans=4, dtype="float", mean=(0.3,) * 4, std=(0.2, 0.21, 0.22, 0.23), band_names=S2,
                     rgb=(2, 1, 0))
    mae = micro_mae(4, pixels=spec)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    out = export(mae, "hf", tmp_path / "hf")
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out)
    assert list(hf.config.band_names) == list(S2) and hf.config.mimkit_pixels["rgb"] == [2, 1, 0]
    assert load_mae(out)[0].encoder.pixels == spec
    folder = export(mae, "timm", tmp_path / "timm")
    tcfg = json.loads((folder / "config.json").read_text())
    assert tcfg["band_names"] == list(S2) and "band_names" not in tcfg["pretrained_cfg"]
    with torch.no_grad():
        ours = mae.encoder.forward_features(x)
        t = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert (t.forward_features(x) - ours).abs().max().item() <= 1e-5
        t = timm.create_model(tcfg["architecture"], pretrained=True, **tcfg["model_args"],
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"))).eval()
        assert (t.forward_features(x) - ours).abs().max().item() <= 1e-5
    assert load_encoder(folder).pixels == spec


def test_figures_show_the_red_green_blue_roles():
    """Reconstruction figures (pretraining's, --eval-every's and reconstruct's all draw them) show the bands
    with the red, green and blue roles of the encoder's spec: roles B08,B04,B03 on B02,B03,B04,B08 images draw
    what the first three bands of the same images reordered B08,B04,B03,B02 draw. The first three bands
    regardless of roles fails this."""
    from mimkit.viz import reconstruction_panels
    spec = PixelSpec(in_chans=4, dtype="float", mean=(0.3,) * 4, std=(0.2,) * 4, band_names=S2, rgb=(3, 2, 1))
    images = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    panels = reconstruction_panels(micro_mae(4, pixels=spec), images)
    plain = replace(spec, rgb=None)
    moved = reconstruction_panels(micro_mae(4, pixels=plain), images[:, [3, 2, 1, 0]])
    assert torch.allclose(panels[:, :2], moved[:, :2])  # original and masked panels
    assert not torch.allclose(panels[:, 0], reconstruction_panels(micro_mae(4, pixels=plain), images)[:, 0])


def test_specs_and_names_from_before_still_read():
    """The stored spec of runs and checkpoints written before band names (config.yaml's ``pixels``, an encoder's
    ``arch["pixels"]``, an export's ``mimkit_pixels``) reads and writes back unchanged; an RGB encoder still
    records none; the old module names import, and the ImageNet-only ``to_unit`` says where it went."""
    from mimkit.models import MaskedViT
    old = {"in_chans": 4, "dtype": "float", "low": [100.0] * 4, "high": [4000.0] * 4, "mean": [0.3, 0.31, 0.32, 0.4],
           "std": [0.1, 0.11, 0.12, 0.2]}
    spec = PixelSpec.from_dict(old)
    assert spec.to_dict() == old and spec.band_names is None and spec.rgb is None
    enc = MaskedViT(img_size=32, patch_size=4, embed_dim=96, depth=1, num_heads=3, in_chans=4, pixels=old)
    assert enc.arch["pixels"] == old and enc.pixels == spec
    assert "pixels" not in MaskedViT(img_size=32, patch_size=4, embed_dim=96, depth=1, num_heads=3).arch
    from mimkit.data.pixels import PixelSpec as Old, resolve_pixels, to_input  # noqa: F401
    from mimkit.data.stats import IMAGENET_MEAN
    from mimkit.models.pixels import IMAGE_MEAN
    assert Old is PixelSpec and IMAGENET_MEAN == IMAGE_MEAN == PixelSpec().mean
    with pytest.raises(ImportError, match="PixelSpec.denormalize"):
        from mimkit.models.pixels import to_unit  # noqa: F401
