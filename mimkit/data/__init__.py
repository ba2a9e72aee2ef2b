"""Images in, normalised batches out: sources (folder, tar, built-in sample), robust decoding, the MAE
augmentation recipes, and a deterministic, resumable, DDP-shardable loader with an in-memory fast path."""
from .decode import decode_array, decode_image, load_image, to_rgb
from .loader import (ImageCache, ImageDataset, Loader, benchmark_loader, build_cache, check_sample, collate, fit_images,
                     make_loader, resolve_workers)
from ..pixels import PixelSpec, default_spec
from .inputs import channel_stats, encoder_pixels, load_input, resolve_pixels, reuse_pixels
from .source import (IMG_EXTENSIONS, ImageSource, JoinedSource, ListSource, open_images, split_train_val,
                     spread_over_classes)
from . import hfdata, shards  # noqa: E402,F401  (their sources register with open_images)
from .transforms import AUGS, MEAN, RECIPES, STD, BatchAugment, build_transform

__all__ = ["AUGS", "BatchAugment", "IMG_EXTENSIONS", "ImageCache", "ImageDataset",
           "ImageSource", "JoinedSource", "ListSource", "Loader", "MEAN", "PixelSpec", "RECIPES", "STD",
           "benchmark_loader", "build_cache", "build_transform", "channel_stats", "check_sample", "collate",
           "decode_array", "decode_image", "default_spec", "encoder_pixels", "fit_images", "load_image", "load_input",
           "make_loader", "open_images", "resolve_pixels", "resolve_workers", "reuse_pixels", "split_train_val",
           "spread_over_classes", "to_rgb"]
