"""Hugging Face datasets as an image source: ``--data hfds:DIR``, where DIR holds a dataset written by
``save_to_disk`` (a Dataset or a DatasetDict) or is a local ``imagefolder`` (read with
``load_dataset("imagefolder", data_dir=DIR)``).

The image and label columns are named by ``--image-column`` / ``--label-column``. With named splits, the
training split (``--train-split``) and the held-out split (``--val-split``) replace ``--val-fraction``'s split,
so pretraining never sees the validation images and the evaluations score them, as the benchmarks define it.
Arrow files are memory-mapped, so random access is cheap and the usual loader reads them (image bytes are
taken undecoded from the dataset and decoded by mimkit, as every other source's).
"""
import os
from pathlib import Path

from ..errors import DataError
from .source import ImageSource, register_source

PREFIX = "hfds:"


def is_hf_dataset(path) -> bool:
    return str(path).startswith(PREFIX)


def dataset_options(cfg) -> dict:
    """The column and split options of a data config (defaults where a command has none)."""
    return {k: getattr(cfg, k) for k in ("image_column", "label_column", "train_split", "val_split") if hasattr(cfg, k)}


def _load(spec: str, directory: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs the datasets package: "
                        f"pip install 'mimkit[datasets]'") from None
    if not directory.is_dir():
        raise DataError(f"{spec}: no such folder")
    try:
        if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
            return datasets.load_from_disk(str(directory))
        return datasets.load_dataset("imagefolder", data_dir=str(directory))
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"{spec}: cannot read the dataset ({type(e).__name__}: {e})".replace("\n", " ")) from None


class HFDatasetSource(ImageSource):
    """The training split followed by the held-out split (when there is one) of a Hugging Face dataset.

    ``fixed_split`` = (training indices, held-out indices) when the dataset names its splits."""

    def __init__(self, spec: str, image_column: str = "image", label_column: str = "label",
                 train_split: str = "train", val_split: str = "auto"):
        import datasets
        self.root = spec
        ds = _load(spec, Path(os.path.expanduser(spec[len(PREFIX):])))
        if isinstance(ds, datasets.DatasetDict):
            if val_split == "auto":
                val_split = "validation" if "validation" in ds else ""
            if train_split not in ds:
                raise DataError(f"{spec}: no split {train_split!r} (--train-split; splits: {', '.join(ds)})")
            if val_split and val_split not in ds:
                raise DataError(f"{spec}: no split {val_split!r} (--val-split; splits: {', '.join(ds)}, or '' to "
                                f"hold out --val-fraction of {train_split!r})")
            parts = [(train_split, ds[train_split])] + ([(val_split, ds[val_split])] if val_split else [])
        else:
            parts = [("", ds)]
        for _, d in parts:
            for option, column in (("--image-column", image_column), ("--label-column", label_column)):
                if column and column not in d.column_names:
                    raise DataError(f"{spec}: no column {column!r} ({option}; columns: {', '.join(d.column_names)})")
        image_feature = parts[0][1].features[image_column]
        if not isinstance(image_feature, datasets.Image):
            raise DataError(f"{spec}: column {image_column!r} holds {type(image_feature).__name__}, not images "
                            f"(--image-column)")
        # undecoded: the stored bytes (or path), decoded by mimkit like any other file
        self.parts = [d.cast_column(image_column, datasets.Image(decode=False)) for _, d in parts]
        self.image_column = image_column
        self.names, self.labels, self._where = [], [], []
        for (split, d), part in zip(parts, range(len(parts))):
            labels = d[label_column] if label_column else [-1] * len(d)
            self.labels += [int(y) if y is not None else -1 for y in labels]
            self.names += [f"{split or 'data'}[{i}]" for i in range(len(d))]
            self._where += [(part, i) for i in range(len(d))]
        feature = parts[0][1].features.get(label_column) if label_column else None
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
        else:
            self.classes = [str(c) for c in range(max(self.labels) + 1)] if self.labels and max(self.labels) >= 0 else []
        n_train = len(parts[0][1])
        self.fixed_split = ((list(range(n_train)), list(range(n_train, len(self.names)))) if len(parts) == 2 else None)
        if not self.names:
            raise DataError(f"{spec}: the dataset holds no rows")

    def read_bytes(self, i: int) -> bytes:
        part, row = self._where[i]
        value = self.parts[part][row][self.image_column]
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
        raise OSError("the row holds no image")


def open_hf_dataset(spec: str, **options) -> HFDatasetSource:
    return HFDatasetSource(spec, **options)


register_source(is_hf_dataset, open_hf_dataset)
