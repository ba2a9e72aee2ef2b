"""A segmentation benchmark made from CIFAR-10 that keeps mimkit's fixed 45k/5k split: collages of 2-4 images of
distinct classes cut by Voronoi cells, the mask being each pixel's class (10 classes, no background).

Training collages use only the 45,000 training images of the fixed split (``mimkit.data.split_train_val`` with
``--val-fraction 0.1``: the last 500 of each class are held out), evaluation collages only the 5,000 held-out ones,
so an encoder pretrained on the training split never saw an evaluation pixel. Everything is drawn from
``numpy.random.default_rng([seed, split])``: the same arguments give the same files, byte for byte.

    python benchmarks/collages.py ../shared/data/cifar10-train.tar.gz data/collages --train 20000 --val 2000
    # writes data/collages/{train,val}/{images,masks}/NNNNNN.png and data/collages/classes.txt
    mimkit segment --checkpoint runs/cifar10-mae --data data/collages/train/images \\
        --masks data/collages/train/masks --val-data data/collages/val/images --val-masks data/collages/val/masks \\
        --class-names data/collages/classes.txt
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mimkit.data import open_images, split_train_val  # noqa: E402
from mimkit.data.decode import decode_array, read_bytes  # noqa: E402
from mimkit.files import write_text, write_via  # noqa: E402

SPLITS = {"train": 0, "val": 1}


def voronoi(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, size) region ids 0..n-1: each pixel's nearest of n uniformly drawn points; every region non-empty."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    while True:
        pts = rng.uniform(0, size, (n, 2))
        d = (ys[None] - pts[:, 0, None, None]) ** 2 + (xs[None] - pts[:, 1, None, None]) ** 2
        region = d.argmin(0)
        if len(np.unique(region)) == n:
            return region


def collage(rng, by_class, read, size: int):
    """One (image (size, size, 3) uint8, mask (size, size) uint8) from 2-4 images of distinct classes."""
    n = int(rng.integers(2, min(4, len(by_class)) + 1))
    classes = rng.choice(len(by_class), n, replace=False)
    region = voronoi(rng, n, size)
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for k, c in enumerate(classes):
        src = read(by_class[c][int(rng.integers(len(by_class[c])))], size)
        image[region == k] = src[region == k]
        mask[region == k] = c
    return image, mask


def make(archive: str, out: str, n_train: int = 20000, n_val: int = 2000, size: int = 32, seed: int = 0,
         val_fraction: float = 0.1) -> dict:
    source = open_images(archive)
    train_idx, val_idx = split_train_val(source, val_fraction)  # the fixed split every mimkit command uses
    cache = {}

    def read(i, size):
        if i not in cache:
            a = decode_array(read_bytes(source, i), source.names[i])
            a = np.repeat(a, 3, 2) if a.shape[2] == 1 else a[:, :, :3]
            if a.shape[:2] != (size, size):
                a = np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))
            cache[i] = a
        return cache[i]

    out = Path(out)
    used = {}
    for split, idx, count in (("train", train_idx, n_train), ("val", val_idx, n_val)):
        by_class = [[i for i in idx if source.labels[i] == c] for c in range(len(source.classes))]
        rng = np.random.default_rng([seed, SPLITS[split]])
        used[split] = set()
        for j in range(count):
            image, mask = collage(rng, by_class, read, size)
            name = f"{j:06d}.png"
            write_via(out / split / "images" / name, lambda f: Image.fromarray(image).save(f, format="PNG"))
            write_via(out / split / "masks" / name, lambda f: Image.fromarray(mask, "L").save(f, format="PNG"))
        used[split] = len(idx)
    write_text(out / "classes.txt", "".join(c + "\n" for c in source.classes))
    return {"train": n_train, "val": n_val, "source_train": used["train"], "source_val": used["val"],
            "classes": list(source.classes)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", help="CIFAR-10 as mimkit reads it: a folder or .tar.gz of one folder per class")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--train", type=int, default=20000, help="training collages (from the 45k training split)")
    ap.add_argument("--val", type=int, default=2000, help="evaluation collages (from the 5k held-out split)")
    ap.add_argument("--size", type=int, default=32, help="canvas side in px (each image resized to it)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = make(a.archive, a.out, a.train, a.val, a.size, a.seed)
    print(f"wrote {info['train']} training collages (from {info['source_train']} images) and {info['val']} "
          f"evaluation collages (from {info['source_val']} held-out images) to {a.out}")


if __name__ == "__main__":
    main()
