"""mimkit segment: masks paired and checked, joint augmentation, training on 1-channel 16-bit and 4-band TIFF data
end to end, prediction at other sizes, bad input; the attentive probe."""
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mimkit.config import LinprobeConfig, SegmentConfig, load_config
from mimkit.data import PixelSpec
from mimkit.data.masks import JointAugment, open_pairs, scan_masks, split_pairs
from mimkit.errors import ConfigError, DataError
from mimkit.eval.linprobe import linprobe
from mimkit.models import create_encoder
from mimkit.models.segmenter import Segmenter, feature_blocks
from mimkit.segment import load_segmenter, miou_from_counts, scores, segment

torch.set_num_threads(1)
MICRO = "vit_micro_patch4_32"


def scene(rng, h=32, w=32):
    """A mask of three classes (a vertical cut, a top band) at random positions."""
    m = np.zeros((h, w), np.uint8)
    m[:, rng.integers(4, w - 4):] = 1
    m[:rng.integers(3, h // 2), :] = 2
    return m


def write_dataset(root, kind: str, n: int = 16, seed: int = 0):
    """``n`` image/mask pairs: kind 'grey16' (1-channel 16-bit PNGs) or 'tiff4' (4-band uint16 TIFFs); classes are
    told apart by their values, so a model can learn them."""
    rng = np.random.default_rng(seed)
    (root / "images" / "sub").mkdir(parents=True)
    (root / "masks" / "sub").mkdir(parents=True)
    for i in range(n):
        m = scene(rng)
        name = f"sub/s{i:02d}" if i % 2 else f"s{i:02d}"  # nested folders pair by relative path
        if kind == "grey16":
            x = rng.normal(8000, 300, m.shape) + 20000.0 * m
            Image.fromarray(x.astype(np.uint16)).save(root / "images" / f"{name}.png")
        else:
            x = rng.normal(1000, 50, m.shape + (4,)) + np.array([[0, 0, 0, 0], [3000, 0, 0, 900], [0, 2500, 600, 0]])[m]
            tifffile.imwrite(root / "images" / f"{name}.tif", x.astype(np.uint16))
        Image.fromarray(m).save(root / "masks" / f"{name}.png")
    return root / "images", root / "masks"


def seg_options(tmp_path, images, masks, **kw):
    return dict(data=str(images), masks=str(masks), output=str(tmp_path / "run"), random_init=True, model=MICRO,
                device="cpu", precision="fp32", threads=1, num_workers=0, batch_size=4, head_channels=16,
                val_fraction=0.25, **kw)


@pytest.mark.parametrize("kind,in_chans", [("grey16", 1), ("tiff4", 4)])
def test_trains_evaluates_and_predicts_end_to_end(tmp_path, kind, in_chans):
    images, masks = write_dataset(tmp_path / "data", kind)
    results = segment(load_config(SegmentConfig, overrides=seg_options(
        tmp_path, images, masks, in_chans=in_chans, epochs=4, lr=3e-3, eval_every=2)))
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved["num_classes"] == 3 and saved["num_val"] == 4 and len(saved["per_class_iou"]) == 3
    # learned something: the held-out pixels are mostly right (3 classes by value; the majority class is ~50%)
    assert saved["pixel_accuracy"] > 70, saved
    assert (run / "figures" / "segmentation.png").is_file() and (run / "model.pt").is_file()
    counts = np.load(run / "per_image.npz")["counts"]
    assert counts.shape == (4, 3, 3)
    assert miou_from_counts(counts.sum(0)) == pytest.approx(results["miou"])
    assert any("val_miou" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())

    # predict: images of another size than the training crop (32), through the command and the Python API
    rng = np.random.default_rng(5)
    new = tmp_path / "new"
    new.mkdir()
    big = scene(rng, 40, 72)
    if kind == "grey16":
        x = (rng.normal(8000, 300, big.shape) + 20000.0 * big).astype(np.uint16)
        Image.fromarray(x).save(new / "big.png")
    else:
        x = (rng.normal(1000, 50, big.shape + (4,)) + np.array([[0] * 4, [3000, 0, 0, 900], [0, 2500, 600, 0]])[big])
        x = x.astype(np.uint16)
        tifffile.imwrite(new / "big.tif", x)
    out = segment(load_config(SegmentConfig, overrides=dict(action="predict", checkpoint=str(run), data=str(new),
                                                            output=str(tmp_path / "pred"), device="cpu",
                                                            precision="fp32", threads=1)))
    written = Image.open(tmp_path / "pred" / "masks" / "big.png")
    assert written.mode == "P" and written.size == (72, 40) and out["num_images"] == 1
    assert (tmp_path / "pred" / "overlays" / "big.png").is_file()
    seg = load_segmenter(run)
    pred = seg.predict(x)
    assert pred.shape == (40, 72)
    assert np.array_equal(pred, np.asarray(written))
    assert (pred == big).mean() > 0.7


def test_predict_scores_against_masks_and_refuses_another_class_count(tmp_path):
    images, masks = write_dataset(tmp_path / "data", "grey16", n=8)
    segment(load_config(SegmentConfig, overrides=seg_options(tmp_path, images, masks, in_chans=1, epochs=1,
                                                             head="linear")))
    res = segment(load_config(SegmentConfig, overrides=dict(
        action="predict", checkpoint=str(tmp_path / "run"), data=str(images), masks=str(masks),
        output=str(tmp_path / "pred"), device="cpu", precision="fp32", threads=1)))
    assert res["num_val"] == 8 and 0 <= res["miou"] <= 100
    assert (tmp_path / "pred" / "per_image.npz").is_file()
    with pytest.raises(ConfigError, match="predicts 3 classes but --classes is 5"):
        segment(load_config(SegmentConfig, overrides=dict(
            action="predict", checkpoint=str(tmp_path / "run"), data=str(images), classes=5,
            output=str(tmp_path / "pred2"), device="cpu", threads=1)))


def test_sliding_windows_place_each_window_where_it_belongs():
    torch.manual_seed(0)
    model = Segmenter(create_encoder(MICRO), 4, "linear").eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        whole = model.slide(x, overlap=0.0)
        halves = torch.cat([model(x[..., :32]), model(x[..., 32:])], -1)
        assert torch.allclose(whole, halves, atol=1e-5)
        assert torch.allclose(model.slide(x[..., :32]), model(x[..., :32]), atol=1e-5)  # one window: the model
        small = model.slide(x[:, :, :20, :24])  # padded up to one window, cut back
        assert small.shape == (2, 4, 20, 24)


def test_feature_blocks_are_the_papers():
    assert feature_blocks(12) == [3, 5, 7, 11] and feature_blocks(24) == [7, 11, 15, 23]


def test_joint_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    m = np.kron(rng.integers(0, 5, (6, 5)), np.ones((8, 8), np.int64))  # 48 x 40 of 8-px blocks of classes 0..4
    x = torch.from_numpy(m.astype(np.float32) / 10)[None]  # one channel: the class / 10
    spec = PixelSpec(in_chans=1, dtype="float", mean=(0.0,), std=(1.0,))
    aug = JointAugment(32, spec, 255, (0.5, 2.0))
    flipped = agree = padded = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        xi, mi = aug(x, torch.from_numpy(m), g)
        flipped += bool(aug.sample(m.shape, torch.Generator().manual_seed(seed))[1])
        value = xi[0] * 10
        # block interiors (4 px from any class edge, >= 2 source px at any scale): bicubic is exact there
        pool = lambda t: torch.nn.functional.max_pool2d(t.float()[None, None], 9, 1, 4)[0, 0]  # noqa: E731
        inside = (mi != 255) & (pool(mi) == -pool(-mi))
        inside[:4], inside[-4:], inside[:, :4], inside[:, -4:] = False, False, False, False  # edges beyond the crop
        assert torch.allclose(value[inside], mi[inside].float(), atol=1e-4)
        # padding: the ignore index and a zero pixel together (away from the edge, which bicubic blends)
        near = torch.nn.functional.max_pool2d((mi != 255).float()[None, None], 5, 1, 2)[0, 0] > 0
        assert torch.all(xi[0][~near] == 0)
        padded += int((~near).sum())
        agree += int(inside.sum())
    assert agree > 2000 and padded > 1000 and 5 < flipped < 35  # many pixels checked; both flips


def test_fixed_split_is_the_last_fraction_by_name(tmp_path):
    images, masks = write_dataset(tmp_path / "data", "grey16", n=10)
    pairs = open_pairs(str(images), str(masks))
    train, val = split_pairs(pairs, 0.2)
    names = [pairs.name(k) for k in range(len(pairs))]
    assert names == sorted(names, key=lambda n: n.split("/")) and [names[k] for k in val] == names[-2:]
    assert all(pairs.mask_path(k).endswith(pairs.name(k)[:-4] + ".png") for k in range(len(pairs)))


def test_csv_pairs(tmp_path):
    images, masks = write_dataset(tmp_path / "data", "grey16", n=4)
    rows = ["image,mask"] + [f"images/{p.name},masks/{p.name}" for p in sorted(images.glob("*.png"))]
    (tmp_path / "data" / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = open_pairs(str(tmp_path / "data" / "pairs.csv"))
    assert len(pairs) == 2 and pairs.read_mask(0).shape == (32, 32)


# bad input -----------------------------------------------------------------------------------------------------
def spec1():
    return PixelSpec(in_chans=1, dtype="float", mean=(0.5,), std=(0.5,))


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
    images, masks = write_dataset(tmp_path / "data", "grey16", n=4)
    (masks / "s02.png").rename(tmp_path / "s02.png")
    with pytest.raises(DataError, match=r"s02.png: no mask s02\.\*"):
        open_pairs(str(images), str(masks))
    (tmp_path / "s02.png").rename(masks / "s02.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "extra.png")
    with pytest.raises(DataError, match="extra.png: a mask with no image"):
        open_pairs(str(images), str(masks))
    (masks / "extra.png").unlink()

    def scan(**kw):
        pairs = open_pairs(str(images), str(masks))
        return scan_masks(pairs, range(len(pairs)), spec1(), **kw)

    assert scan().num_classes == 3
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(masks / "s00.png")
    with pytest.raises(DataError, match=r"s00.png: mask is 32x30 \(WxH\) but its image .*s00.png is 32x32"):
        scan()
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(masks / "s00.png")
    with pytest.raises(DataError, match="s00.png: holds the value 7, outside the 3 classes 0..2"):
        scan(classes=3)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(masks / "s00.png")
    with pytest.raises(DataError, match="s00.png: is a RGB image, not a mask of class ids"):
        scan()
    palette = Image.fromarray(np.full((32, 32), 2, np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(masks / "s00.png")
    assert scan().num_classes == 3  # a palette PNG is read by index


def test_binary_masks_keep_their_foreground(tmp_path, caplog):
    images, masks = write_dataset(tmp_path / "data", "grey16", n=4)
    for p in masks.rglob("*.png"):
        Image.fromarray(np.where(np.asarray(Image.open(p)) > 0, 255, 0).astype(np.uint8)).save(p)
    pairs = open_pairs(str(images), str(masks))
    info = scan_masks(pairs, range(4), spec1())
    assert info.binary and info.num_classes == 2 and "255 is read as class 1" in caplog.text
    assert int(info.convert(pairs.read_mask(0)).max()) == 1  # the foreground is class 1, not ignored
    with pytest.raises(DataError, match="hold only 0 and 255.*leave --classes out"):  # never silently lost
        scan_masks(pairs, range(4), spec1(), classes=3)


def test_segment_options_are_checked():
    with pytest.raises(ConfigError, match="--resize-range"):
        load_config(SegmentConfig, overrides=dict(random_init=True, model=MICRO, resize_range="2,1"))
    with pytest.raises(ConfigError, match="--checkpoint is required"):
        load_config(SegmentConfig, overrides=dict(action="predict"))


def test_scores_math():
    conf = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])  # class 2 absent from truth and prediction: left out
    s = scores(conf)
    assert s["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2 * 100) and s["pixel_accuracy"] == pytest.approx(7 / 8 * 100)
    assert s["per_class_iou"][2] is None


# attentive probe ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["memory", "recompute"])
def test_attentive_probe_trains_and_scores(tmp_path, cache, caplog):
    caplog.set_level("INFO")
    res = linprobe(load_config(LinprobeConfig, overrides=dict(
        head="attentive", token_cache=cache, random_init=True, model=MICRO, data="builtin", epochs=3,
        batch_size=64, device="cpu", precision="fp32", threads=1, num_workers=0, output=str(tmp_path / "run"))))
    assert res["head"] == "attentive" and res["tokens_cached"] == (cache == "memory")
    assert ("cached in memory" if cache == "memory" else "recomputed by the frozen encoder") in caplog.text
    assert res["lr"] == pytest.approx(1e-3 * 64 / 256)  # the attentive head's own default, AdamW
    assert res["top1"] > 15  # 10 classes: above chance after 3 epochs on the untrained encoder's tokens
    assert json.loads((tmp_path / "run" / "results.json").read_text())["top5"] == res["top5"]


def test_attentive_probe_keeps_an_explicit_lr():
    cfg = load_config(LinprobeConfig, overrides=dict(head="attentive", random_init=True, model=MICRO, base_lr=0.1))
    assert cfg.base_lr == 0.1
    assert load_config(LinprobeConfig, overrides=dict(random_init=True, model=MICRO)).base_lr == 0.1


# the collage benchmark ---------------------------------------------------------------------------------------------
def fake_cifar(path, per_class=10, classes=3):
    """A .tar.gz of class folders of 8x8 PNGs, each image one flat colour that encodes (class, index)."""
    import tarfile
    root = path.parent / "fake"
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), (c * 80, i * 20, 7), np.uint8)).save(root / f"c{c}" / f"{i:02d}.png")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname="fake")
    return path


def script(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collages_are_deterministic_and_respect_the_split(tmp_path):
    make = script("collages").make
    archive = fake_cifar(tmp_path / "fake.tar.gz")
    make(str(archive), str(tmp_path / "a"), n_train=12, n_val=6, size=8, seed=3)
    make(str(archive), str(tmp_path / "b"), n_train=12, n_val=6, size=8, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 36
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "classes.txt").read_text() == "c0\nc1\nc2\n"
    for split, allowed in (("train", range(0, 9)), ("val", range(9, 10))):  # --val-fraction 0.1: the last of 10
        for p in sorted((tmp_path / "a" / split / "images").glob("*.png")):
            x = np.asarray(Image.open(p)).reshape(-1, 3)
            m = np.asarray(Image.open(tmp_path / "a" / split / "masks" / p.name)).reshape(-1)
            assert 2 <= len(np.unique(m)) <= 3  # 2-4 images of distinct classes (only 3 classes here)
            assert np.array_equal(x[:, 0] // 80, m)  # each pixel's class is its source image's
            assert set((x[:, 1] // 20).tolist()) <= set(allowed)  # source images from this split only


def test_paired_bootstrap_of_a_miou_difference():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (200, 64))
    good = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 4, truth.shape))
    bad = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 4, truth.shape))

    def counts(pred):
        out = np.zeros((len(truth), 4, 3), np.int64)
        for n, (t, p) in enumerate(zip(truth, pred)):
            for c in range(4):
                out[n, c] = [((t == c) & (p == c)).sum(), ((t != c) & (p == c)).sum(), ((t == c) & (p != c)).sum()]
        return out

    r = script("bootstrap").paired_bootstrap(counts(good), counts(bad), resamples=300)
    assert r["difference"] == pytest.approx(r["miou_a"] - r["miou_b"]) and r["difference"] > 10
    assert 0 < r["standard_error"] < 3 and r["ci95"][0] < r["difference"] < r["ci95"][1]
    same = script("bootstrap").paired_bootstrap(counts(good), counts(good), resamples=50)
    assert same["difference"] == 0 and same["standard_error"] == 0  # paired: identical runs never differ


def test_masks_follow_their_own_exif_orientation_as_images_do(tmp_path):
    """An image and its mask stored with the same EXIF orientation are both turned upright, so they stay aligned."""
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    m = np.kron(np.array([[0, 1], [2, 1]], np.uint8), np.ones((4, 6), np.uint8))  # 8 x 12, not symmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(m * 100).save(tmp_path / "i" / "a.png", exif=exif)
    Image.fromarray(m).save(tmp_path / "m" / "a.png", exif=exif)
    pairs = open_pairs(str(tmp_path / "i"), str(tmp_path / "m"))
    image, mask = pairs.read_image(0)[:, :, 0], pairs.read_mask(0)
    assert mask.shape == (12, 8) and np.array_equal(image, mask * 100)
    assert np.array_equal(mask, np.rot90(m, -1))


def test_hugging_face_dataset_with_a_mask_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    rows = {"image": [], "mask": []}
    for _ in range(6):
        m = scene(rng)
        rows["image"].append(Image.fromarray((m * 80).astype(np.uint8)))
        rows["mask"].append(Image.fromarray(m))
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(),
                                                                      "mask": datasets.Image()}))
    datasets.DatasetDict({"train": ds.select(range(4)), "validation": ds.select(range(4, 6))}).save_to_disk(
        str(tmp_path / "hf"))
    pairs = open_pairs(f"hfds:{tmp_path / 'hf'}")
    assert split_pairs(pairs, 0.5) == ([0, 1, 2, 3], [4, 5])  # the dataset's own splits
    assert np.array_equal(pairs.read_image(5)[:, :, 0], pairs.read_mask(5) * 80)
    assert scan_masks(pairs, range(6), spec1()).num_classes == 3


def test_pair_loader_resumes_mid_epoch_and_shards_the_global_batch(tmp_path):
    from mimkit.data.masks import PairLoader
    images, masks = write_dataset(tmp_path / "data", "grey16", n=12)
    pairs = open_pairs(str(images), str(masks))
    info = scan_masks(pairs, range(12), spec1())
    aug = JointAugment(16, spec1(), 255)

    def batches(start=0, rank=0, world=1, batch=2):
        loader = PairLoader(pairs, range(12), spec1(), info, aug, batch_size=batch, seed=1, rank=rank,
                            world_size=world, num_workers=0)
        loader.set_epoch(3, start)
        return list(loader)

    whole = batches()
    assert len(whole) == 6
    for (x, m), (x2, m2) in zip(whole[2:], batches(start=2)):  # a resumed epoch: the same crops, the same order
        assert torch.equal(x, x2) and torch.equal(m, m2)
    shards = [batches(rank=r, world=2, batch=1) for r in range(2)]  # two processes share each global batch of 2
    for b, (x, m) in enumerate(whole[:3]):
        assert torch.equal(torch.cat([shards[0][b][0], shards[1][b][0]]), x)


def test_more_than_256_classes_are_written_as_tiff(tmp_path):
    from mimkit.segment import class_colours, write_mask
    mask = np.arange(300 * 4).reshape(30, 40) % 300
    path = write_mask(mask, tmp_path / "m", class_colours(300))
    assert path.suffix == ".tif" and np.array_equal(tifffile.imread(path), mask)
    path = write_mask(mask % 7, tmp_path / "p.v2", class_colours(7))  # a dot in the stem stays
    assert path.name == "p.v2.png" and np.array_equal(np.asarray(Image.open(path)), mask % 7)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_encoder_stays_as_pretrained(tmp_path, frozen):
    from mimkit.checkpoints.io import save_checkpoint
    from mimkit.objectives import OBJECTIVES
    torch.manual_seed(0)
    mae = OBJECTIVES["mae"].build(dict(encoder=create_encoder(MICRO, in_chans=1).arch, decoder_dim=32,
                                       decoder_depth=1, decoder_heads=2, mask_ratio=0.75, norm_pix_loss=True))
    ckpt = save_checkpoint({"format": "mimkit", "version": 1, "kind": "mae", "arch": mae.arch,
                            "model": mae.state_dict(), "step": 1}, tmp_path / "enc.pt")
    images, masks = write_dataset(tmp_path / "data", "grey16", n=8)
    opts = seg_options(tmp_path, images, masks, epochs=1, head="linear", lr=1e-2, frozen_encoder=frozen)
    del opts["random_init"], opts["model"]
    segment(load_config(SegmentConfig, overrides=dict(opts, checkpoint=str(ckpt), mean="0.5", std="0.5")))
    trained = load_segmenter(tmp_path / "run").model.encoder.state_dict()
    same = all(torch.equal(v, trained[k]) for k, v in mae.encoder.state_dict().items() if k in trained)
    assert same == frozen  # frozen: untouched; tuned: moved
