"""mimkit.data: sources, decoding, split, transforms and the deterministic loader (small, CPU only)."""
import io
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import mimkit.data as D
from mimkit.errors import BadImage, DataError
from mimkit.data.loader import mix_seed

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def _rgb(h=16, w=16, seed=None):
    rng = np.random.default_rng(seed) if seed is not None else RNG
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img, path, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _encode(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.fixture
def labeled(tmp_path):
    """cat: 10 images, dog: 15 (one nested deeper), 8x8..16x16 PNG/JPEG; a root image; junk to ignore."""
    root = tmp_path / "imgs"
    for i in range(10):
        _save(_rgb(16, 16, i), root / "cat" / f"{i:03d}.png")
    for i in range(15):
        sub = "deep/" if i == 14 else ""
        _save(_rgb(16, 16, 100 + i), root / "dog" / f"{sub}{i:03d}.JPG", "JPEG", quality=95)
    _save(_rgb(16, 16, 7), root / "loose.png")
    (root / "notes.txt").write_text("not an image")
    _save(_rgb(), root / ".hidden" / "x.png")
    _save(_rgb(), root / "cat" / "._resource.png")
    return root


@pytest.fixture
def same_size(tmp_path):
    """40 labeled 16x16 PNGs in 4 classes (losslessly decoded, so cached and per-image paths see equal pixels)."""
    root = tmp_path / "same"
    for c in range(4):
        for i in range(10):
            _save(_rgb(16, 16, 10 * c + i), root / f"c{c}" / f"{i:02d}.png")
    return root


# sources ---------------------------------------------------------------------------------------------------------
def test_folder_recursive_labels(labeled):
    src = D.open_images(labeled)
    assert len(src) == 26 and src.classes == ["cat", "dog"]
    assert src.names[:2] == ["cat/000.png", "cat/001.png"] and "dog/deep/014.JPG" in src.names
    lab = dict(zip(src.names, src.labels))
    assert lab["loose.png"] == -1 and lab["cat/003.png"] == 0 and lab["dog/deep/014.JPG"] == 1
    assert src.names == D.open_images(labeled).names  # deterministic
    assert src.read_bytes(src.names.index("cat/000.png")) == (labeled / "cat" / "000.png").read_bytes()


def test_no_subfolders_unlabeled_and_symlink_loop(tmp_path):
    for i in range(3):
        _save(_rgb(), tmp_path / f"{i}.png")
    src = D.open_images(tmp_path)
    assert src.labels == [-1] * 3 and src.classes == []
    (tmp_path / "sub").mkdir()
    _save(_rgb(), tmp_path / "sub" / "x.png")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # would recurse forever if followed blindly
    assert len(D.open_images(tmp_path)) == 4


def test_builtin_sample():
    src = D.open_images("builtin")
    assert len(src) == 1000 and len(src.classes) == 10 and src.labels.count(3) == 100
    assert D.decode_image(src.read_bytes(0), src.names[0]).size == (32, 32)


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_read_in_place(labeled, tmp_path, suffix, mode):
    arc = tmp_path / "arc" / f"imgs{suffix}"
    arc.parent.mkdir()
    with tarfile.open(arc, mode) as tf:
        tf.add(labeled, arcname="imgs")  # one top folder, as `tar -czf imgs.tgz imgs`
    before = sorted(p for p in tmp_path.rglob("*"))
    src = D.open_images(arc)
    ref = D.open_images(labeled)
    assert src.names == ref.names and src.labels == ref.labels and src.classes == ref.classes
    assert all(src.read_bytes(i) == ref.read_bytes(i) for i in range(len(src)))
    loader = D.make_loader(src, batch_size=4, img_size=16, cache="off", num_workers=0, drop_last=False)
    assert sum(len(y) for _, y in loader) == len(src)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing extracted


def test_tar_workers_match_main_process(same_size, tmp_path):
    arc = tmp_path / "same.tar"
    with tarfile.open(arc, "w") as tf:
        tf.add(same_size, arcname="same")
    kw = dict(batch_size=8, img_size=16, cache="off", seed=3)
    main, workers = D.make_loader(arc, num_workers=0, **kw), D.make_loader(arc, num_workers=2, **kw)
    assert len(_batches(main)) == 5 and _same(_batches(main), _batches(workers))  # each worker opens its own handle
    next(iter(workers))  # abandon an epoch midway; the persistent workers must not leak it into the next
    assert _same(_batches(main, 1, start=2), _batches(workers, 1, start=2))


def test_big_gz_refused(labeled, tmp_path, monkeypatch):
    arc = tmp_path / "imgs.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(labeled, arcname="imgs")
    monkeypatch.setattr(D.source, "MAX_GZ_BYTES", 100)
    with pytest.raises(DataError, match="extract"):
        D.open_images(arc)


def test_path_errors_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    (tmp_path / "file.dat").write_text("x")
    for path, what in [(tmp_path / "missing", "no such"), (tmp_path / "empty", ".jpg"),
                       (tmp_path / "file.dat", "not a folder")]:
        with pytest.raises(DataError, match=what) as e:
            D.open_images(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        assert isinstance(e.value, ValueError)


# decoding --------------------------------------------------------------------------------------------------------
def test_decode_odd_modes():
    def dec(img, fmt, **kw):
        out = D.decode_image(_encode(img, fmt, **kw), "x")
        assert out.mode == "RGB"
        return np.asarray(out).astype(int)

    grey = Image.fromarray(np.full((4, 4), 77, np.uint8))
    assert (dec(grey, "PNG") == 77).all()
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0])
    out = dec(pal, "PNG", transparency=0)  # index 0 (red) transparent -> black
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [0, 255, 0]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[0, 0, 3], rgba[1, 1, 3] = 200, 255, 0
    out = dec(Image.fromarray(rgba, "RGBA"), "PNG")
    assert out[0, 0].tolist() == [200] * 3 and out[1, 1].tolist() == [0] * 3
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    out = dec(cmyk, "JPEG", quality=100)
    assert abs(out[..., 0].mean() - 255) < 3 and out[..., 1].mean() < 3
    wide = Image.fromarray(np.array([[0, 32768], [65535, 1000]], np.uint16))
    assert wide.mode == "I;16"
    out = dec(wide, "PNG")  # scaled to 8 bits, not clipped at 255
    assert out[..., 0].tolist() == [[0, 128], [255, 4]]
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert D.decode_image(gif.getvalue()).getpixel((0, 0))[0] > 200  # first frame


def test_exif_orientation():
    img = _rgb(2, 4, seed=1)  # 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise for display
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=100)
    out = D.decode_image(data, "x")
    assert out.size == (2, 4)
    assert torch.equal(D.decode.decode_tensor(data), D.decode.pil_to_tensor(out))  # torchvision fast path agrees


def test_bad_data_raises():
    jpeg, png = _encode(_rgb(32, 32), "JPEG"), _encode(_rgb(32, 32), "PNG")
    for data in [b"", os.urandom(500), jpeg[: len(jpeg) // 2], png[: len(png) // 2]]:
        with pytest.raises(BadImage) as e:
            D.decode_image(data, "f.jpg")
        assert e.value.name == "f.jpg" and e.value.reason
        with pytest.raises(BadImage):
            D.decode.decode_tensor(data, "f.jpg")


def test_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 64):  # 1600 px: PIL's warning; 4096 px: PIL's error
        with pytest.raises(BadImage, match="DecompressionBomb"):
            D.decode_image(_encode(_rgb(side, side), "PNG"), "bomb.png")


def test_bad_files_skipped_and_named_once(tmp_path, caplog):
    root = tmp_path / "mixed"
    for i in range(12):
        _save(_rgb(16, 16, i), root / f"ok{i:02d}.png")
    jpeg, png = _encode(_rgb(16, 16), "JPEG"), _encode(_rgb(16, 16), "PNG")
    bad = {"random.jpg": os.urandom(300), "trunc.jpg": jpeg[:len(jpeg) // 2], "trunc.png": png[:len(png) // 2],
           "zero.png": b"", "tiny.png": _encode(_rgb(4, 4), "PNG")}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    src = D.open_images(root)
    D.check_sample(src, min_size=8)  # a few bad or tiny files among good ones are skipped in training, not fatal
    only_tiny = tmp_path / "tiny"
    for i in range(3):
        _save(_rgb(4, 4, i), only_tiny / f"t{i}.png")
    with pytest.raises(DataError, match="t0.png"):  # but a data set of images smaller than a patch is
        D.check_sample(D.open_images(only_tiny), min_size=8)
    for cache in ("off", "on"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mimkit.data"):
            loader = D.make_loader(src, batch_size=4, img_size=16, cache=cache, num_workers=0, min_size=8,
                                   drop_last=False)
            n = 0
            for epoch in range(2):
                loader.set_epoch(epoch)
                n += sum(len(y) for _, y in loader)
        assert n == 2 * 12 and set(loader.skipped) == set(bad)
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == len(bad) and all(any(b in m for m in warned) for b in bad)


# split -----------------------------------------------------------------------------------------------------------
def test_split_last_fraction_per_class(labeled, tmp_path):
    src = D.open_images(labeled)
    train, val = D.split_train_val(src, 0.2)
    assert (train, val) == D.split_train_val(src, 0.2)
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(src)))
    by_class = lambda idx, c: [src.names[i] for i in idx if src.labels[i] == c]  # noqa: E731
    assert by_class(val, 0) == ["cat/008.png", "cat/009.png"]
    assert len(by_class(val, 1)) == 3 and by_class(val, 1)[-1] == "dog/deep/014.JPG"
    assert by_class(val, -1) == []  # round(1 * 0.2) = 0
    for i in range(10):
        _save(_rgb(4, 4), tmp_path / "flat" / f"{i}.png")
    assert D.split_train_val(D.open_images(tmp_path / "flat"), 0.25) == (list(range(7)), [7, 8, 9])  # 2.5 -> 3


# transforms and loaders ------------------------------------------------------------------------------------------
def _batches(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


@pytest.mark.parametrize("cache", ["on", "off"])
def test_loader_determinism_resume_and_ranks(same_size, cache):
    src = D.open_images(same_size)
    kw = dict(img_size=16, cache=cache, num_workers=0, seed=5)
    one = D.make_loader(src, batch_size=8, **kw)
    assert one.batched == (cache == "on") and len(one) == 5 and one.num_images == 40
    e1 = _batches(one, 1)
    assert _same(e1, _batches(D.make_loader(src, batch_size=8, **kw), 1))  # same (seed, epoch) -> same batches
    assert not _same(e1, _batches(one, 2))
    assert _same(_batches(one, 1, start=3), e1[3:])  # resume mid-epoch
    x, y = e1[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7  # normalised
    # two ranks of 4 == one process of 8, batch by batch
    r0, r1 = (_batches(D.make_loader(src, batch_size=4, rank=r, world_size=2, **kw), 1) for r in (0, 1))
    assert _same(e1, [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(r0, r1)])


def test_loader_leaves_global_rng_alone(same_size):
    ld = D.make_loader(D.open_images(same_size), batch_size=8, img_size=16, cache="off", num_workers=0)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    _batches(ld)
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(3) == expected[1]).all()


def test_in_order_returns_everything(same_size):
    src = D.open_images(same_size)
    for cache in ("on", "off"):
        for r in (0, 1):
            ld = D.make_loader(src, list(range(0, 40, 2)), batch_size=3, world_size=2, rank=r, recipe="eval",
                               img_size=16, shuffle=False, cache=cache, num_workers=0, with_index=True)
            idx = torch.cat([i for _, _, i in ld]).tolist()
            assert idx == [i for k, i in enumerate(range(0, 40, 2)) if (k // 3) % 2 == r]
            assert len(ld) == len([b for b in ld])


def test_cached_eval_matches_per_image(same_size):
    src = D.open_images(same_size)
    kw = dict(batch_size=8, recipe="eval", img_size=16, shuffle=False, num_workers=0)
    a = torch.cat([x for x, _ in D.make_loader(src, cache="on", **kw)])
    b = torch.cat([x for x, _ in D.make_loader(src, cache="off", **kw)])
    assert torch.allclose(a, b, atol=1e-4)


def test_batched_rrc_full_box_reproduces_image():
    x = torch.from_numpy(np.array(_rgb(16, 16, 3))).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
    for size in (16, 24):
        aug = D.BatchAugment("pretrain", size, "rrc", scale=(1.0, 1.0))
        p = aug.sample(4, (16, 16), torch.Generator().manual_seed(0))
        p["flip"][:] = False
        out = aug(x, p)
        ref = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 255) / 255
        ref = (ref - torch.tensor(D.MEAN).view(1, 3, 1, 1)) / torch.tensor(D.STD).view(1, 3, 1, 1)
        assert torch.allclose(out, ref, atol=1e-4)


def test_batched_fixed_crop_and_flip():
    x = torch.from_numpy(np.array(_rgb(16, 16, 4))).permute(2, 0, 1)[None]
    aug = D.BatchAugment("pretrain", 16, "fixed_crop")
    p = dict(box=torch.tensor([[-2.0, 1.0, 16.0, 16.0]], dtype=torch.float64), flip=torch.tensor([True]))
    ref = F.pad(x.float(), (2, 2, 2, 2))[..., 0:16, 3:19].flip(-1) / 255  # pad 2, crop at (0, 3), mirror
    ref = (ref - torch.tensor(D.MEAN).view(1, 3, 1, 1)) / torch.tensor(D.STD).view(1, 3, 1, 1)
    assert torch.allclose(aug(x, p), ref, atol=1e-4)
    p = aug.sample(64, (16, 16), torch.Generator().manual_seed(1))
    assert p["box"][:, :2].min() >= -2 and p["box"][:, :2].max() <= 2 and 0 < p["flip"].sum() < 64


def test_rrc_boxes_follow_torchvision_limits():
    aug = D.BatchAugment("pretrain", 32, "rrc_jitter")
    p = aug.sample(2000, (32, 48), torch.Generator().manual_seed(0))
    top, left, h, w = p["box"].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 48).all()
    torch.manual_seed(0)  # same distribution as torchvision's sequential sampler
    tv = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, 32, 48), (0.2, 1.0), (3 / 4, 4 / 3))
                       for _ in range(2000)], dtype=torch.float64)
    for ours, theirs in [(h * w, tv[:, 2] * tv[:, 3]), (h, tv[:, 2]), (w, tv[:, 3]), (top, tv[:, 0])]:
        assert abs(ours.mean() - theirs.mean()) < 5 * theirs.std() / 2000 ** 0.5  # 5 standard errors
        assert abs(ours.std() - theirs.std()) < 0.1 * theirs.std()
    assert (h * w).min() >= (tv[:, 2] * tv[:, 3]).min() - 10
    assert 0.4 < p["flip"].float().mean() < 0.6 and p["jitter"].min() >= 0.6 and p["jitter"].max() <= 1.4
    x = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8)
    q = aug.sample(3, (32, 48), torch.Generator().manual_seed(0))
    out = aug(x, q)
    assert out.shape == (3, 3, 32, 32)
    q["jitter"][:] = 1.0  # identity jitter == no jitter
    assert torch.allclose(aug(x, q), D.BatchAugment("pretrain", 32, "rrc")(x, q), atol=1e-5)


@pytest.mark.parametrize("recipe,aug", [("pretrain", "rrc"), ("pretrain", "none"), ("pretrain", "fixed_crop"),
                                        ("pretrain", "rrc_jitter"), ("finetune", "rrc"), ("eval", "rrc")])
def test_recipes_shapes(same_size, recipe, aug):
    src = D.open_images(same_size)
    for cache in ("on", "off"):
        ld = D.make_loader(src, batch_size=4, recipe=recipe, aug=aug, img_size=16, cache=cache, num_workers=0)
        assert ld.batched == (cache == "on" and recipe != "finetune")  # MAE's fine-tuning: RandAugment, erasing
        x, y = next(iter(ld))
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (4,)
        assert x.abs().max() < 3.0


def test_geometric_finetuning_is_batched(same_size):
    """Fine-tuning without RandAugment, colour jitter and random erasing is a random resized crop (timm's 0.08-1
    unless a scale is given) and a flip: the batched path does it; with any of those on, the per-image timm path.
    A loader that batched RandAugment away, or dropped the fine-tuning scale for pretraining's 0.2, fails this."""
    src = D.open_images(same_size)
    load = lambda **kw: D.make_loader(src, batch_size=4, recipe="finetune", img_size=16, cache="on",  # noqa: E731
                                      num_workers=0, **kw)
    plain = load(auto_augment=None, re_prob=0.0)
    assert plain.batched and plain.augment.mode == "rrc" and plain.augment.scale == (0.08, 1.0)
    assert load(auto_augment=None, re_prob=0.0, scale=(0.5, 1.0)).augment.scale == (0.5, 1.0)
    x, _ = next(iter(plain))
    assert x.shape == (4, 3, 16, 16)
    for kw in (dict(re_prob=0.0), dict(auto_augment=None, re_prob=0.25), dict(auto_augment=None, re_prob=0.0,
                                                                               color_jitter=0.4)):
        assert not load(**kw).batched


def test_cache_size_and_mixed_sizes(tmp_path):
    for i in range(6):
        _save(_rgb(16 + 2 * i, 20, i), tmp_path / "m" / f"{i}.png")
    src = D.open_images(tmp_path / "m")
    assert not D.make_loader(src, batch_size=2, img_size=16, num_workers=0).batched  # auto: sizes differ
    with pytest.raises(DataError, match="cache_size"):
        D.make_loader(src, batch_size=2, img_size=16, cache="on", num_workers=0)
    ld = D.make_loader(src, batch_size=2, img_size=16, cache="on", cache_size=18, num_workers=0)
    assert ld.cache.images.shape == (6, 3, 18, 18) and next(iter(ld))[0].shape == (2, 3, 16, 16)


def test_augmentation_seed_is_per_image():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2) and len({mix_seed(0, e, i) for e in range(10) for i in range(100)}) == 1000


def test_benchmark_loader(same_size):
    ld = D.make_loader(D.open_images(same_size), batch_size=8, img_size=16, cache="on")
    assert D.benchmark_loader(ld, 3) > 0
