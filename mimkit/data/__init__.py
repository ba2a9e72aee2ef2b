"""Images in, normalised batches out: sources (folder, tar, built-in sample), robust decoding, the MAE
augmentation recipes, and a deterministic, resumable, DDP-shardable loader with an in-memory fast path."""
from .decode import decode_image, load_image, to_rgb
from .loader import (ImageCache, ImageDataset, Loader, benchmark_loader, build_cache, check_sample, collate, fit_images,
                     make_loader, resolve_workers)
from .source import IMG_EXTENSIONS, ImageSource, open_images, split_train_val, spread_over_classes
from . import hfdata, shards  # noqa: E402,F401  (their sources register with open_images)
from .transforms import AUGS, MEAN, RECIPES, STD, BatchAugment, build_transform

__all__ = ["AUGS", "BatchAugment", "IMG_EXTENSIONS", "ImageCache", "ImageDataset", "ImageSource", "Loader", "MEAN",
           "RECIPES", "STD", "benchmark_loader", "build_cache", "build_transform", "check_sample", "collate",
           "decode_image", "fit_images", "load_image", "make_loader", "open_images", "resolve_workers",
           "split_train_val", "spread_over_classes", "to_rgb"]
