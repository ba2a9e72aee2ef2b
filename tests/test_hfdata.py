"""Hugging Face datasets as --data hfds:DIR (mimkit.data.hfdata): save_to_disk and imagefolder, columns by flag,
named splits for the evaluation protocol, one-line errors."""
import numpy as np
import pytest
from PIL import Image

from mimkit.data import make_loader, open_images, split_train_val
from mimkit.errors import DataError

datasets = pytest.importorskip("datasets")


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """train/ (2 classes x 8) and validation/ (2 classes x 3), the layout `load_dataset('imagefolder')` reads."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, n in (("train", 8), ("validation", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                _png(root / split / c / f"{i}.png", hash((split, c, i)) % 2 ** 32)
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory, imagefolder):
    """A DatasetDict saved with save_to_disk, with its own column names ('img', 'fine')."""
    out = tmp_path_factory.mktemp("saved") / "ds"
    parts = {}
    for split in ("train", "validation"):
        files = sorted((imagefolder / split).rglob("*.png"))
        parts[split] = datasets.Dataset.from_dict(
            {"img": [str(f) for f in files], "fine": [int(f.parent.name == "dog") for f in files]},
            features=datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["cat", "dog"])}))
    datasets.DatasetDict(parts).save_to_disk(str(out))
    return out


def test_save_to_disk_columns_and_named_splits(saved):
    """Columns come from the flags and the held-out split is the dataset's 'validation' split, not the last
    --val-fraction of each class (dropping the fixed_split branch of split_train_val fails this)."""
    src = open_images(f"hfds:{saved}", image_column="img", label_column="fine")
    assert len(src) == 22 and src.classes == ["cat", "dog"]
    train, val = split_train_val(src, 0.5)
    assert (len(train), len(val)) == (16, 6)
    assert sorted(src.labels[i] for i in val) == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(make_loader(src, train, batch_size=4, recipe="eval", img_size=32, shuffle=False,
                                 num_workers=0)))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [src.labels[i] for i in train[:4]]


def test_imagefolder_and_val_fraction_fallback(imagefolder, saved):
    """A local imagefolder has train/validation splits by folder; --val-split '' holds out --val-fraction of
    train instead."""
    src = open_images(f"hfds:{imagefolder}")
    assert split_train_val(src, 0.1)[1] == list(range(16, 22))
    src = open_images(f"hfds:{saved}", image_column="img", label_column="fine", val_split="")
    train, val = split_train_val(src, 0.25)
    assert len(src) == 16 and (len(train), len(val)) == (12, 4)


def test_missing_column_and_split_one_line(saved):
    """A column or split that does not exist names itself and the ones there are, in one line."""
    with pytest.raises(DataError, match=r"no column 'image' \(--image-column; columns: img, fine\)") as e:
        open_images(f"hfds:{saved}")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"no split 'val' \(--val-split; splits: train, validation"):
        open_images(f"hfds:{saved}", image_column="img", label_column="fine", val_split="val")


def test_knn_cli_scores_the_validation_split(saved, tmp_path, capsys):
    """`mimkit knn --data hfds:DIR` scores exactly the validation split's 6 images."""
    import json
    from mimkit.cli import main
    assert main(["knn", "--data", f"hfds:{saved}", "--image-column", "img", "--label-column", "fine",
                 "--random-init", "--model", "vit_micro_patch4_32", "--output", str(tmp_path / "knn"),
                 "--feature-cache", "", "--num-workers", "0", "--k", "3"]) == 0
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert results["num_val"] == 6 and results["num_train"] == 16


def test_objectives_and_the_tokenizer_fit_on_what_pretrain_reads(saved):
    """The samples iGPT's palette and MAE's PCA basis are fitted on, and the tokenizer's training images, come from
    the dataset opened with pretrain's column options (its own 'img' column: opened without them, as before issue
    20, the default 'image' column is missing and the run fails)."""
    from mimkit.config import PretrainConfig, TokenizerConfig, load_config
    from mimkit.objectives import build_objective
    from mimkit.tokenizer import train_tokenizer
    common = dict(data=f"hfds:{saved}", image_column="img", label_column="fine", model="vit_micro_patch4_32",
                  device="cpu", threads=1, num_workers=0)
    igpt = build_objective(load_config(PretrainConfig, None, dict(
        common, objective="igpt", objective_args={"palette_size": 8, "palette_images": 16, "kmeans_iters": 2})))
    assert igpt.encoder.palette.centers.shape[0] == 8
    mae = build_objective(load_config(PretrainConfig, None, dict(
        common, objective_args={"target": "pca", "pca_images": 16})))
    assert mae.pca is not None
    summary = train_tokenizer(load_config(TokenizerConfig, None, dict(
        {k: v for k, v in common.items() if k != "model"}, codebook_size=8, max_steps=1, batch_size=4,
        output=str(saved.parent / "tok"))))
    assert summary["steps"] == 1
