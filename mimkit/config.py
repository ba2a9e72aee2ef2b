"""Options for every command, in one place: dataclasses that YAML files and the CLI both fill.

A field's metadata carries its help text (and allowed values); the CLI builds its flags
from these, so an option is declared once. ``load_config`` merges a YAML file and
overrides, rejects unknown keys (suggesting the nearest name) and wrong types, then
runs the class's ``validate`` so bad values fail in one line before any work starts.
"""
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from .errors import ConfigError, did_you_mean
from .files import write_yaml
from .models import ENCODERS
# parse_floats: importable from its old home
from .pixels import PixelOptions, parse_band_names, parse_floats, parse_pixel_options  # noqa: F401


def opt(default, help: str, choices=None, positional: bool = False, aliases=()):
    """A field with its help text; ``positional=True`` also lets the CLI take it as a bare argument, in field order;
    ``aliases``: old names still read from YAML files and flags (``--images`` for ``--data``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "positional": positional,
                                            "aliases": tuple(aliases)})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# shared groups -------------------------------------------------------------------------------
@dataclass
class RunOptions:
    output: str = opt("", "run directory: config, metrics, checkpoints, figures ('': a new runs/COMMAND-TIME)")
    seed: int = opt(0, "random seed (data order, augmentation, masks, init)")
    device: str = opt("auto", "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")
    precision: str = opt("auto", "numeric precision: auto is bf16 where the device runs it natively (GPUs with bf16, "
                         "CPUs with AVX512-BF16 or AMX), else fp32; fp16 only on GPUs", ["auto", "fp32", "bf16", "fp16"])
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    num_workers: int = opt(-1, "data loader worker processes (-1: automatic)")
    cache: str = opt("auto", "decode small data sets once into memory", ["auto", "on", "off"])


@dataclass
class DataOptions:
    data: str = opt("builtin", "image folder, .tar/.tar.gz of one, a .csv/.txt file list (path[,label]), tar shards "
                    "('train-{000000..000127}.tar', local or any fsspec URL), a Hugging Face dataset ('hfds:DIR': "
                    "save_to_disk or an imagefolder), or 'builtin' (the embedded sample); files: JPEG, PNG "
                    "(8/16-bit), TIFF (multi-band, multi-page), WebP, BMP, .npy/.npz (H, W, C) arrays")
    val_fraction: float = opt(0.1, "last fraction of each class held out for validation (never pretrained on)")
    img_size: int = opt(0, "input size in px (0: the model preset's)")
    shard_streams: int = opt(0, "tar shards: read streams in all processes (0: processes x workers); the image "
                             "order depends on it and --seed")
    image_column: str = opt("image", "Hugging Face datasets (--data hfds:DIR): the image column")
    label_column: str = opt("label", "Hugging Face datasets: the label column ('' : unlabeled)")
    train_split: str = opt("train", "Hugging Face datasets: the split to train on")
    val_split: str = opt("auto", "Hugging Face datasets: the held-out split ('auto': 'validation' when the "
                         "dataset has one; '' : --val-fraction of the train split)")
    in_chans: int = opt(0, "input channels (0: from the files when they agree; a checkpoint's for evaluations); "
                        "1 or 3 convert grey and RGB files on read")
    value_range: str = opt("", "file values mapped to 0..1: '' the dtype's range (uint8 0..255, uint16 0..65535, "
                           "float 0..1), LOW,HIGH, or pA,pB per-channel percentiles of the training images; "
                           "explicit ranges clip")
    mean: str = opt("", "per-channel input mean, comma-separated, or 'auto' (computed from up to 500 training "
                    "images); '' : ImageNet's for 3 channels, auto otherwise (evaluations: the checkpoint's)")
    std: str = opt("", "per-channel input std, comma-separated, or 'auto' (see --mean)")
    band_names: str = opt("", "the bands' names in file order, e.g. B02,B03,B04,B08, or @FILE (a name a line); '' : "
                          "the TIFF's band descriptions where present. Stored in the checkpoint; a checkpoint with "
                          "names meets data by name (reordered, or refused when a band is missing)")
    bands: str = opt("", "the bands playing red,green,blue, by name or 1-based number (e.g. B04,B03,B02 or 3,2,1): "
                     "what figures show, and how RGB weights start a multi-band model (red's kernel to the red "
                     "band, ...); stored in the checkpoint")


@dataclass
class OptimOptions:
    epochs: int = opt(10, "training epochs")
    batch_size: int = opt(64, "images per step per process (the effective batch multiplies by processes x accum)")
    accum_steps: int = opt(1, "gradient accumulation steps")
    base_lr: float = opt(1.5e-4, "learning rate per 256 images: lr = base_lr x effective batch / 256")
    lr: float = opt(0.0, "absolute learning rate (overrides base_lr when > 0)")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine decay")
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs (per iteration)")
    weight_decay: float = opt(0.05, "AdamW weight decay (none on norms, biases, tokens, position embeddings)")
    clip_grad: float = opt(0.0, "clip the gradient norm to this value (0: off)")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)")
    time_limit: float = opt(0.0, "minutes; the schedule is sized to fit by measuring the first steps (0: off)")


@dataclass
class EngineOptions:
    log_every: int = opt(20, "steps between metric lines")
    save_every: int = opt(0, "steps between checkpoints (0: at the end of each epoch only)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    resume: bool = opt(False, "continue from the newest checkpoint in --output")
    overwrite: bool = opt(False, "move a previous run in --output aside (to OUTPUT.old-TIME) and start afresh")
    deterministic: bool = opt(False, "deterministic algorithms, so a resumed run ends bit-identical")
    compile: bool = opt(False, "torch.compile the model")
    grad_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    max_bad_steps: int = opt(5, "stop after this many non-finite losses in a row (each is skipped)")
    sigterm_grace: float = opt(60.0, "seconds allowed to write a checkpoint after SIGTERM")
    dist_timeout: float = opt(600.0, "seconds before a collective waiting on a dead process fails")


# commands ------------------------------------------------------------------------------------
@dataclass
class PretrainConfig(RunOptions, DataOptions, OptimOptions, EngineOptions):
    model: str = opt("vit_tiny_patch4_32", "encoder preset (see `mimkit models`)")
    objective: str = opt("mae", "pretraining objective (see `mimkit objectives`)")
    mask_ratio: Optional[float] = opt(None, "fraction of patches hidden (default: the objective's paper value, "
                                      "see `mimkit objectives`)")
    norm_pix_loss: bool = opt(True, "predict per-patch normalised pixels")
    decoder_dim: int = opt(0, "decoder width (0: preset default)")
    decoder_depth: int = opt(0, "decoder blocks (0: preset default)")
    decoder_heads: int = opt(0, "decoder attention heads (0: preset default)")
    aug: str = opt("rrc", "augmentation", ["rrc", "none", "fixed_crop", "rrc_jitter"])
    init: str = opt("", "start from released weights (mimkit, official MAE, HF ViTMAE or timm)")
    figure_every: int = opt(1, "epochs between reconstruction figures (0: only at the end)")
    eval_every: float = opt(0.0, "epochs between k-NN top-1 checks on held-out images, with reconstructions of "
                            "them, to TensorBoard and metrics.jsonl (0.25: four times an epoch; 0: off)")
    eval_images: int = opt(1000, "--eval-every: held-out images scored and training images in the k-NN bank")
    eval_pool: str = opt("cls", "--eval-every: the feature, class token or mean of patch tokens (as knn --pool)",
                         ["cls", "mean"])
    tracker: str = opt("none", "also send the metrics to an experiment tracker (its own settings apply, e.g. "
                       "WANDB_MODE=offline, MLFLOW_TRACKING_URI)", ["none", "wandb", "mlflow"])
    objective_args: Dict[str, Any] = field(default_factory=dict,
                                           metadata={"help": "extra options of the objective (YAML mapping)"})
    pixels: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the input spec pretraining resolved from --in-chans/--value-range/--mean/--std and the data "
                "(written to config.yaml; given, it is used as is)"})

    def validate(self):
        check_common(self)
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        for n in ("decoder_dim", "decoder_depth", "decoder_heads", "figure_every", "eval_every"):
            if getattr(self, n) < 0:
                raise ConfigError(f"{flag(n)} must be >= 0, got {getattr(self, n)}")
        check_positive(self, "eval_images")
        # the objective's name and options are checked by its registry (mimkit.objectives.check_objective) at the
        # command layer: config sits below the objectives and never imports them
        check_model(self, self.model)


@dataclass
class EncoderOptions:
    """The pretrained encoder a later command starts from (evaluations, segment)."""
    checkpoint: str = opt("", "checkpoint to evaluate (mimkit, official MAE, HF ViTMAE or timm)")
    val_data: str = opt("", "a separate labeled validation set (folder, archive or .csv/.txt list); then all of "
                        "--data trains and --val-fraction is unused")
    random_init: bool = opt(False, "evaluate the same encoder randomly initialised")
    model: str = opt("", "encoder preset for --random-init (default: the checkpoint's)")
    train_images: int = opt(0, "use an evenly spaced subset of this many training images (0: all); "
                            "for quick comparisons, the validation split stays whole")


@dataclass
class EvalOptions(RunOptions, DataOptions, EncoderOptions):
    pool: str = opt("cls", "feature: class token or mean of patch tokens", ["cls", "mean"])
    batch_size: int = opt(256, "images per forward pass")
    feature_cache: str = opt("~/.cache/mimkit/features", "folder caching frozen features between evaluations "
                             "(keyed by weights and images; '' : off)")


@dataclass
class KnnConfig(EvalOptions):
    k: int = opt(20, "neighbours")
    temperature: float = opt(0.07, "softmax temperature on cosine similarity")

    def validate(self):
        check_eval(self)
        check_positive(self, "k", "temperature")


@dataclass
class LinprobeConfig(EvalOptions, OptimOptions, EngineOptions):
    # the paper's probe: LARS, base lr 0.1, no weight decay, 90 epochs (batch 16384 there; smaller here)
    epochs: int = opt(90, "training epochs")
    batch_size: int = opt(1024, "images per step per process")
    base_lr: Optional[float] = opt(None, "learning rate per 256 images (default: 0.1 for the linear head, LARS; "
                                   "1e-3 for the attentive head, AdamW)")
    weight_decay: float = opt(0.0, "weight decay")
    warmup_epochs: float = opt(10.0, "linear warm-up length in epochs")
    head: str = opt("linear", "the probe: a linear layer on the pooled feature (MAE's), or attentive: learned "
                    "queries cross-attending over all frozen patch tokens, then a linear layer (--pool unused)",
                    ["linear", "attentive"])
    queries: int = opt(1, "attentive head: learned queries (their outputs are averaged)")
    heads: int = opt(0, "attentive head: attention heads (0: the encoder's)")
    token_cache: str = opt("auto", "attentive head: frozen patch tokens kept in memory in 16-bit (auto: where they "
                           "fit in half the available memory), or recomputed by the encoder every step",
                           ["auto", "memory", "recompute"])

    def validate(self):
        if self.base_lr is None:  # the head's own default, never an explicit value replaced
            self.base_lr = 1e-3 if self.head == "attentive" else 0.1
        check_eval(self)
        check_common(self)
        check_positive(self, "queries")
        if self.heads < 0:
            raise ConfigError(f"--heads must be >= 0, got {self.heads}")


@dataclass
class FinetuneConfig(EvalOptions, OptimOptions, EngineOptions):
    # the paper's ViT-B recipe: AdamW (0.9, 0.999), base lr 5e-4, layer decay 0.65 (0.75 for L/H), 100 epochs
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(128, "images per step per process")
    base_lr: float = opt(5e-4, "learning rate per 256 images")
    warmup_epochs: float = opt(5.0, "linear warm-up length in epochs")
    layer_decay: float = opt(0.75, "layer-wise lr decay (1: off)")
    drop_path: float = opt(0.1, "stochastic depth rate")
    label_smoothing: float = opt(0.1, "label smoothing")
    mixup: float = opt(0.8, "mixup alpha (0: off)")
    cutmix: float = opt(1.0, "cutmix alpha (0: off)")
    randaug: str = opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec ('' : off)")
    reprob: float = opt(0.25, "random erasing probability")
    crop_scale: float = opt(0.08, "smallest area fraction of the random resized crop (timm's and MAE's 0.08)")
    global_pool: bool = opt(True, "average patch tokens for the head (else the class token)")
    blocks: int = opt(0, "tune only the last K blocks (0: all); the paper's partial fine-tuning")

    def validate(self):
        check_eval(self)
        check_common(self)
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f"mixup / cutmix pair images within a batch: --batch-size must be even, got "
                              f"{self.batch_size}")


@dataclass
class SegmentConfig(RunOptions, DataOptions, EncoderOptions, OptimOptions, EngineOptions):
    # the MAE paper's ADE20K recipe (BEiT's): UperNet, AdamW lr 1e-4 at batch 16, layer decay 0.65, wd 0.05,
    # drop path 0.1; random rescale 0.5-2 and crop, flip
    action: str = opt("train", "train a segmenter on an encoder (--checkpoint), or predict masks with a trained one "
                      "(--checkpoint RUN --data IMAGES; scored when --masks is given)", ["train", "predict"],
                      positional=True)
    masks: str = opt("", "folder of masks matched to --data's images by relative path and stem (integer PNG/TIFF, "
                     "palette PNGs by index); '' for a .csv of image,mask rows or a Hugging Face dataset")
    val_masks: str = opt("", "masks of --val-data")
    mask_column: str = opt("mask", "Hugging Face datasets (--data hfds:DIR): the mask column")
    classes: int = opt(0, "number of classes (0: from --class-names, else the largest mask value + 1)")
    class_names: str = opt("", "file of class names, one a line, in class-id order")
    ignore_index: int = opt(255, "mask value that is not scored or trained on (padding gets it too)")
    class_weights: str = opt("", "per-class weights of the loss, comma-separated ('' : equal)")
    head: str = opt("upernet", "decoder: UperNet over a simple feature pyramid of four blocks (the MAE paper's), or "
                    "linear: BatchNorm + 1x1 convolution on the last block (the fast baseline)", ["upernet", "linear"])
    head_channels: int = opt(256, "UperNet: channels of the decoder (segmentation-models-pytorch's default)")
    resize_range: str = opt("0.5,2.0", "training: each image rescaled by a random factor in LOW,HIGH before the "
                            "--img-size crop (mmseg's ratio_range)")
    overlap: float = opt(1 / 3, "inference: overlap of the sliding windows, a fraction of --img-size")
    layer_decay: float = opt(0.65, "layer-wise lr decay (1: off)")
    drop_path: float = opt(0.1, "stochastic depth rate")
    blocks: int = opt(0, "tune only the last K blocks of the encoder (0: all)")
    frozen_encoder: bool = opt(False, "keep the whole encoder frozen: train the head only")
    eval_every: float = opt(0.0, "epochs between held-out mIoU checks during training (0: only at the end)")
    figure_images: int = opt(6, "held-out images in the figure (image | truth | prediction)")
    batch_size: int = opt(16, "images per step per process")
    epochs: int = opt(20, "training epochs")
    base_lr: float = opt(1.6e-3, "learning rate per 256 images (1e-4 at batch 16, the paper's)")
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs")

    def validate(self):
        if self.action == "predict":
            if not self.checkpoint:
                raise ConfigError("--checkpoint is required: the segmenter to predict with (a segment run)")
            check_file(self.checkpoint, "--checkpoint")
            check_run(self)
        else:
            check_eval(self)
            check_common(self)
        for name in ("masks", "val_masks", "class_names"):
            if getattr(self, name):
                check_file(getattr(self, name), flag(name))
        if bool(self.val_data) != bool(self.val_masks) and self.masks:
            raise ConfigError("--val-data and --val-masks go together (images and their masks)")
        for n in ("classes", "head_channels", "figure_images", "blocks"):
            if getattr(self, n) < 0:
                raise ConfigError(f"{flag(n)} must be >= 0, got {getattr(self, n)}")
        lo_hi = parse_floats(self.resize_range, "--resize-range")
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"--resize-range must be LOW,HIGH with 0 < LOW <= HIGH, got {self.resize_range!r}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"--overlap must be in [0, 1), got {self.overlap}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.class_weights and min(parse_floats(self.class_weights, "--class-weights")) < 0:
            raise ConfigError(f"--class-weights must be >= 0, got {self.class_weights!r}")
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.frozen_encoder and self.blocks:
            raise ConfigError("--frozen-encoder trains no block, --blocks K trains the last K: choose one")


@dataclass
class ReconstructConfig(RunOptions):
    output: str = opt("runs/reconstruct", "folder of the figures and their scores")
    checkpoint: str = opt("", "MAE checkpoint with its decoder")
    data: str = opt("builtin", "images: what pretrain's --data reads, or a single image file", aliases=["images"])
    num_images: int = opt(8, "how many images to show (spread over the classes of --data, seeded by --seed)")
    mask_ratio: float = opt(0.75, "fraction of patches hidden")
    grid: bool = opt(True, "one PNG grid (else one PNG per image)")
    val_fraction: float = opt(0.0, "show and score held-out images: the last fraction of each class, as "
                              "pretrain's --val-fraction (0: score the shown images)")
    bands: str = opt("", "the bands shown as red,green,blue, by name or 1-based number (e.g. B04,B03,B02 or 4,3,2; "
                     "default: the checkpoint's roles, else the first three); one channel is shown grey")
    band_names: str = opt("", "the bands' names in file order (as pretrain's; '' : the TIFF's band descriptions)")
    masking: str = opt("random", "which patches are hidden: MAE's random sampling, BEiT's blocks or MAE's grid "
                       "(one patch kept per cell; --mask-ratio picks the cell); each image's mask follows from "
                       "--seed and its file name", ["random", "block", "grid"])
    target: str = opt("auto", "what the decoder predicts: as recorded in the checkpoint (official files: normalised "
                      "pixels), or force normalised/raw (the official mae_visualize weights: raw)",
                      ["auto", "normalised", "raw"])

    def validate(self):
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required")
        check_file(self.checkpoint, "--checkpoint")
        check_data(self.data)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.num_images < 1:
            raise ConfigError(f"--num-images must be at least 1, got {self.num_images}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        parse_pixel_options(band_names=self.band_names, bands=self.bands)


@dataclass
class ExportConfig:
    checkpoint: str = opt("", "weights to convert: a mimkit checkpoint or run directory, an official MAE .pth, a Hugging "
                              "Face ViTMAE directory or timm weights", positional=True)
    to: str = opt("timm", "target format", ["timm", "hf", "mae"])
    output: str = opt("", "where to write: timm: a .safetensors/.pth file or a directory (config.json + weights); hf: "
                          "a directory; mae: a .pth (or .safetensors) file", positional=True, aliases=["out"])
    encoder_only: bool = opt(False, "export the encoder only (hf: a ViTMAEModel; mae: the encoder-only release layout)")
    force: bool = opt(False, "overwrite OUTPUT if it exists")

    def validate(self):
        for name in ("checkpoint", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{name.upper()} is required: mimkit export CHECKPOINT --to timm|hf|mae OUTPUT")
        check_file(self.checkpoint, "CHECKPOINT")
        if Path(self.output).exists() and not self.force:
            raise ConfigError(f"OUTPUT {self.output} exists; pass --force to overwrite it")


@dataclass
class EmbedConfig:
    checkpoint: str = opt("", "encoder weights: any format `mimkit export` reads", positional=True)
    data: str = opt("", "images: what pretrain's --data reads", positional=True, aliases=["images"])
    output: str = opt("", "features file (.npy); the image names go beside it in a .txt file", positional=True,
                      aliases=["out"])
    pool: str = opt("cls", "class token, mean of patch tokens, or every token", ["cls", "mean", "all"])
    band_names: str = opt("", "the bands' names in file order (as pretrain's; '' : the TIFF's band descriptions)")
    img_size: int = opt(0, "input size in px (0: the checkpoint's; others interpolate the position embeddings)")
    batch_size: int = opt(64, "images per forward pass")
    device: str = opt("auto", "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    num_workers: int = opt(-1, "data loader worker processes (-1: automatic)")

    def validate(self):
        for name in ("checkpoint", "data", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{name.upper()} is required: mimkit embed CHECKPOINT DATA OUTPUT.npy")
        parse_band_names(self.band_names)
        check_file(self.checkpoint, "CHECKPOINT")
        check_data(self.data, "DATA")
        check_positive(self, "batch_size")
        if self.img_size < 0:
            raise ConfigError(f"--img-size must be >= 0, got {self.img_size}")


@dataclass
class VizConfig:
    action: str = opt("attention", "which figure: attention (the class token's, per head, in --block), pca (the "
                      "first three principal components of the patch features as RGB) or neighbours (the nearest "
                      "images of --data in feature space)", ["attention", "pca", "neighbours"], positional=True)
    checkpoint: str = opt("", "any checkpoint mimkit reads (an MAE, another objective's run, an encoder)")
    data: str = opt("builtin", "images: what pretrain's --data reads, or a single image file", aliases=["images"])
    output: str = opt("runs/viz", "folder of the figure (ACTION.png, a row per image) and its numbers (ACTION.json)")
    num_images: int = opt(8, "how many images (spread over the classes of --data, seeded by --seed)")
    seed: int = opt(0, "which images are shown")
    block: int = opt(-1, "attention: the block, 0-based (-1: the last)")
    pca_fit: str = opt("image", "pca: components fitted on each image alone, or on a sample of --data (one colour "
                       "scale for all)", ["image", "sample"])
    pca_images: int = opt(64, "pca --pca-fit sample: images in the sample")
    pool: str = opt("cls", "neighbours: the image feature (class token or mean of patch tokens)", ["cls", "mean"])
    k: int = opt(8, "neighbours: how many per image")
    index: str = opt("", "neighbours: features `mimkit embed` wrote (OUT.npy) instead of computing them; refused "
                     "when made from another checkpoint, image size or pooling")
    bands: str = opt("", "the bands shown as red,green,blue, by name or 1-based number (default: the checkpoint's "
                     "roles, else the first three)")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")

    def validate(self):
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required")
        check_file(self.checkpoint, "--checkpoint")
        if self.index:
            check_file(self.index, "--index")
        check_positive(self, "num_images", "k", "pca_images")
        parse_pixel_options(bands=self.bands)


@dataclass
class ExploreConfig:
    checkpoint: str = opt("", "checkpoint(s) shown side by side, comma-separated (any format mimkit reads; a run "
                          "folder: its last checkpoint)", positional=True)
    data: str = opt("builtin", "images to pick from: a folder or 'builtin' (served by name, nothing outside it), or, "
                    "by index, an archive, file list, tar shards or 'hfds:DIR'")
    host: str = opt("127.0.0.1", "address to listen on; another than the loopback lets anyone who reaches it see "
                    "--data and upload files (warned)")
    port: int = opt(8765, "port (0: a free one; the address is printed)")
    index: str = opt("", "neighbours: `mimkit embed` outputs (OUT.npy), comma-separated, each used for the checkpoint "
                     "it was made from (checked); without one the index is built when first asked for")
    bands: str = opt("", "the bands shown as red,green,blue, by name or 1-based number (default: the checkpoint's "
                     "roles, else the first three)")
    max_pixels: int = opt(50_000_000, "uploads with more pixels are refused (read from the header, before decoding)")
    max_upload_mb: float = opt(64.0, "uploads larger than this are refused")
    pca_images: int = opt(64, "PCA fitted on a sample: images of --data in the sample")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")

    def validate(self):
        if not self.checkpoint:
            raise ConfigError("CHECKPOINT is required: mimkit explore --checkpoint RUN[,RUN2] [--data DIR]")
        for path in self.checkpoint.split(","):
            check_file(path.strip(), "--checkpoint")
        for path in filter(None, (p.strip() for p in self.index.split(","))):
            check_file(path, "--index")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        check_positive(self, "max_pixels", "max_upload_mb", "pca_images")
        parse_pixel_options(bands=self.bands)


@dataclass
class TokenizerConfig(RunOptions, DataOptions, OptimOptions, EngineOptions):
    action: str = opt("train", "what to do (mimkit tokenizer train)", ["train"], positional=True)
    output: str = opt("", "run directory: tokenizer.pt, tokenizer.json, checkpoints, metrics "
                          "('': a new runs/tokenizer-TIME)")
    patch_size: int = opt(4, "pixels per token side (a power of 2; the encoder's patch size, for BEiT)")
    codebook_size: int = opt(8192, "number of codes (BEiT's DALL-E tokenizer: 8192)")
    code_dim: int = opt(32, "width of a code vector")
    hidden: int = opt(64, "channels of the convolutional encoder and decoder")
    quantizer: str = opt("ema", "codebook updates: moving averages or gradients (straight-through)", ["ema", "st"])
    commitment: float = opt(0.25, "weight of the commitment loss")
    decay: float = opt(0.99, "moving-average decay of the codebook (quantizer ema)")
    aug: str = opt("rrc", "augmentation of the training images", ["rrc", "none", "fixed_crop", "rrc_jitter"])
    epochs: int = opt(10, "training epochs")
    base_lr: float = opt(1e-3, "learning rate per 256 images")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_epochs: float = opt(0.5, "linear warm-up length in epochs")

    def validate(self):
        check_common(self)
        if self.in_chans not in (0, 3) or self.value_range or self.mean or self.std:
            raise ConfigError("the tokenizer (BEiT's) trains on 8-bit RGB images: --in-chans, --value-range, --mean "
                              "and --std are not its options")
        check_positive(self, "patch_size", "codebook_size", "code_dim", "hidden")
        if self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"--patch-size must be a power of 2, got {self.patch_size}")
        if self.codebook_size < 2:
            raise ConfigError(f"--codebook-size must be >= 2, got {self.codebook_size}")
        if self.commitment < 0:
            raise ConfigError(f"--commitment must be >= 0, got {self.commitment}")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"--decay must be in (0, 1), got {self.decay}")
        if self.img_size and self.img_size % self.patch_size:
            raise ConfigError(f"--img-size {self.img_size} is not divisible by --patch-size {self.patch_size}")


SWEEP_EVALS = ("knn", "linprobe", "finetune")


@dataclass
class SweepConfig(RunOptions):
    file: str = opt("", "the sweep's YAML file (the same as --config)", positional=True)
    output: str = opt("runs/sweep", "folder of the sweep: one subfolder per run, results.md, results.json, plots")
    base: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "pretrain options every run shares (YAML mapping of `mimkit pretrain` options)"})
    budget: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the pretraining budget of every run: time_limit (minutes), epochs and/or max_steps"})
    runs: Any = field(default_factory=list, metadata={
        "help": "list of runs, each a mapping with a name and the pretrain options it changes"})
    grid: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "option: [values] crossed with every run (objective_args.KEY for an objective option)"})
    eval: Any = field(default_factory=lambda: ["knn", "linprobe"], metadata={
        "help": "evaluations of each run: knn, linprobe, finetune (a list, or comma-separated)"})
    knn: Dict[str, Any] = field(default_factory=dict, metadata={"help": "`mimkit knn` options for every run"})
    linprobe: Dict[str, Any] = field(default_factory=dict, metadata={"help": "`mimkit linprobe` options"})
    finetune: Dict[str, Any] = field(default_factory=dict, metadata={"help": "`mimkit finetune` options"})
    tokenizer: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "`mimkit tokenizer train` options: trained once, used where a run says tokenizer: auto"})
    random_init: bool = opt(False, "also evaluate the untrained encoder (a baseline row)")
    plots: bool = opt(True, "draw accuracy against mask ratio, decoder depth and pretraining compute")

    def validate(self):
        import yaml as _yaml
        for name in ("runs", "eval"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lstrip().startswith("["):
                setattr(self, name, _yaml.safe_load(getattr(self, name)))
        if isinstance(self.eval, str):
            self.eval = [e.strip() for e in self.eval.split(",") if e.strip()]
        if not isinstance(self.eval, list) or not all(isinstance(e, str) for e in self.eval):
            raise ConfigError(f"--eval must be a list of {', '.join(SWEEP_EVALS)}; got {self.eval!r}")
        for e in self.eval:
            check_choice("eval", e, SWEEP_EVALS)
        if not isinstance(self.runs, list) or not all(isinstance(r, dict) for r in self.runs):
            raise ConfigError("--runs must be a list of mappings, each with a name and pretrain options")
        names = [r.get("name") for r in self.runs]
        for i, n in enumerate(names):
            if not isinstance(n, str) or not re.fullmatch(r"[\w.+-]+", n):
                raise ConfigError(f"--runs: run {i + 1} needs a name of letters, digits, '.', '+', '-' or '_'; "
                                  f"got {n!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"--runs: run names must be unique; repeated: {', '.join(dup)}")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"--grid: {key} needs a non-empty list of values, got {values!r}")
        for key in self.budget:
            if key not in ("time_limit", "epochs", "max_steps"):
                raise ConfigError(f"--budget: unknown key {key!r} (valid: time_limit, epochs, max_steps)")
        if not (self.runs or self.grid):
            raise ConfigError("a sweep needs runs: or grid: (see configs/lineage.yaml)")


BENCH_CONFIGS = ("tiny32", "base224", "micro32")  # mimkit.bench.CONFIGS


@dataclass
class ShardsConfig:
    data: str = opt("", "images to write: what pretrain's --data reads", positional=True, aliases=["src"])
    output: str = opt("", "folder for the shards (shard-000000.tar, ...)", positional=True, aliases=["out"])
    shard_size: int = opt(1000, "images per shard")
    shuffle: bool = opt(True, "write the images in a seeded random order (the reader shuffles only within a buffer, "
                        "so shards of class-sorted folders would give batches of one class)")
    seed: int = opt(0, "seed of the --shuffle order")

    def validate(self):
        for name in ("data", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{name.upper()} is required: mimkit shards DATA OUTPUT --shard-size N")
        check_data(self.data, "DATA")
        check_positive(self, "shard_size")


@dataclass
class BenchConfig:
    configs: str = opt("tiny32,base224", "configurations to time, comma-separated: tiny32 (ViT-Ti, 32 px, batch 128), "
                       "base224 (ViT-B/16 + 512-d x 8 decoder; batch 16 on the CPU, 256 on a GPU), micro32 (tests)",
                       positional=True)
    precision: str = opt("auto", "precisions to time, comma-separated: fp32, bf16 (autocast, for the peers too); auto: "
                         "fp32, plus bf16 where the device runs it natively")
    peers: str = opt("hf,lightly", "peers timed beside mimkit, comma-separated: hf (transformers ViTMAE), lightly; "
                     "'none' for mimkit alone")
    batch_size: int = opt(0, "images per step (0: the configuration's)")
    warmup: int = opt(3, "untimed steps per contestant before timing")
    steps: int = opt(0, "timed steps per repeat (0: enough for about 3 s)")
    repeats: int = opt(5, "timed repeats, contestants taking turns; the median and spread are reported")
    compile: str = opt("off", "time mimkit under torch.compile too (both) or only (on)", ["off", "on", "both"])
    grad_checkpointing: bool = opt(False, "also time mimkit with activation checkpointing (memory saved, cost)")
    data: str = opt("builtin", "images for the data-pipeline timing and the loss check: a folder, .tar/.tar.gz "
                    "or 'builtin' ('' skips both)")
    data_batches: int = opt(20, "batches per data-pipeline repeat")
    loss_check_steps: int = opt(300, "with bf16: steps of the bf16-vs-fp32 loss-curve check (0: skip)")
    loss_check_batch: int = opt(32, "batch size of the loss-curve check")
    matmul_size: int = opt(0, "side of the square matmuls that measure the machine's rate (0: 2048 CPU, 8192 GPU)")
    device: str = opt("auto", "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")
    threads: int = opt(0, "CPU threads for torch, the same for every contestant (0: torch's default)")
    num_workers: int = opt(-1, "data loader worker processes (-1: automatic)")
    seed: int = opt(0, "random seed")
    output: str = opt("", "write every measurement as JSON to this file", aliases=["out"])

    def validate(self):
        for name, allowed in (("configs", BENCH_CONFIGS), ("precision", ("auto", "fp32", "bf16")),
                              ("peers", ("hf", "lightly", "none"))):
            values = [v.strip() for v in str(getattr(self, name)).split(",") if v.strip()]
            if not values:
                raise ConfigError(f"{flag(name)} is empty; choose from {', '.join(allowed)}")
            for v in values:
                check_choice(name, v, allowed)
        check_positive(self, "repeats", "data_batches", "loss_check_batch")
        for name in ("batch_size", "warmup", "steps", "loss_check_steps", "matmul_size", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")


# checks ---------------------------------------------------------------------------------------
def check_positive(cfg, *names):
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ConfigError(f"{flag(n)} must be > 0, got {getattr(cfg, n)}")


def check_file(path: str, option: str):
    if "://" in path or path.startswith("hfds:") or re.search(r"\{[^{}]*\.\.[^{}]*\}", path):
        return  # Hub weights, URLs, shard patterns and Hugging Face datasets are checked when opened
    if not Path(path).exists():
        raise ConfigError(f"{option}: no such file or directory: {path}")


def check_data(path: str, option: str = "--data"):
    """What every command that reads images takes: the embedded sample, or a path (patterns, URLs, hfds:)."""
    if path not in ("builtin", "builtin:sample"):
        check_file(path, option)


def check_common(cfg):
    check_positive(cfg, "epochs", "batch_size", "accum_steps")
    for n in ("base_lr", "lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "time_limit"):
        if getattr(cfg, n) < 0:
            raise ConfigError(f"{flag(n)} must be >= 0, got {getattr(cfg, n)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    check_positive(cfg, "log_every", "max_bad_steps", "dist_timeout")
    for n in ("max_steps", "save_every", "sigterm_grace", "img_size"):
        if getattr(cfg, n) < 0:
            raise ConfigError(f"{flag(n)} must be >= 0, got {getattr(cfg, n)}")
    check_run(cfg)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --output, --overwrite moves it aside: choose one")
    if cfg.resume and not cfg.output:
        raise ConfigError("--resume needs --output: the run directory to continue")
    if getattr(cfg, "init", ""):
        check_file(cfg.init, "--init")


def world_size() -> int:
    """Processes in this run, as torchrun announces them (1 outside torchrun): the one reading of WORLD_SIZE."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_run(cfg):
    """Options every command that loads data shares: device, threads, workers, batch, data path."""
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", cfg.device):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {cfg.device!r}")
    if cfg.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {cfg.threads}")
    if cfg.num_workers < -1:
        raise ConfigError(f"--num-workers must be >= 0, or -1 for automatic; got {cfg.num_workers}")
    check_positive(cfg, "batch_size")
    world = world_size()
    if cfg.batch_size < world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes (WORLD_SIZE); "
                          f"it must be >= {world}")
    check_data(getattr(cfg, "data", "builtin"))
    if hasattr(cfg, "in_chans"):
        pixel_options(cfg)


def check_choice(name: str, value, allowed):
    if value not in allowed:
        hint = did_you_mean(value, allowed, before=" (", after=")")
        raise ConfigError(f"{flag(name)} must be one of {', '.join(sorted(allowed))}; got {value!r}{hint}")


def check_model(cfg, name: str, option: str = "model"):
    """A known encoder preset whose patch size divides the image size."""
    check_choice(option, name, ENCODERS)
    size, patch = cfg.img_size or ENCODERS[name]["img_size"], ENCODERS[name]["patch_size"]
    if size % patch:
        raise ConfigError(f"--img-size {size} is not divisible by the patch size {patch} of {name}; "
                          f"use a multiple of {patch}")
    if size < 2 * patch:
        raise ConfigError(f"--img-size {size} holds a single patch of {patch} px; use at least {2 * patch}")


def check_eval(cfg):
    if not cfg.checkpoint and not cfg.random_init:
        raise ConfigError("--checkpoint is required (or --random-init with --model)")
    if cfg.checkpoint:
        check_file(cfg.checkpoint, "--checkpoint")
    if cfg.random_init and not (cfg.model or cfg.checkpoint):
        raise ConfigError("--random-init needs --model (an encoder preset) or a --checkpoint to copy the shape from")
    if cfg.model:
        check_model(cfg, cfg.model)
    if cfg.train_images < 0:
        raise ConfigError(f"--train-images must be >= 0, got {cfg.train_images}")
    if cfg.val_data:
        check_file(cfg.val_data, "--val-data")
    check_run(cfg)


# pixel options: parsed by mimkit.pixels (the one parser; the data layer resolves the spec from the same parse)
def pixel_options(cfg) -> PixelOptions:
    """A command's pixel options parsed (one-line ConfigErrors before any file is read)."""
    return parse_pixel_options(cfg.in_chans, cfg.value_range, cfg.mean, cfg.std, cfg.band_names, cfg.bands)


# loading ----------------------------------------------------------------------------------------
def option_fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _coerce(name: str, value, typ, label=flag):
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
        origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{label(name)} must be true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool) or (typ is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{label(name)} must be {'an integer' if typ is int else 'a number'}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{label(name)} must be {'an integer' if typ is int else 'a number'}, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{label(name)} must be a finite number, got {value!r}")
        return out
    if typ is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{label(name)} must be a string, got {value!r}")
        return str(value)
    if origin in (dict, typing.Dict) or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label(name)} must be a mapping, got {value!r}")
        return dict(value)
    return value


def load_config(cls, path: Optional[str] = None, overrides: Optional[dict] = None):
    """Defaults < YAML file < overrides; every key checked, then ``validate()``."""
    values: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k.replace("-", "_"): v for k, v in (overrides or {}).items()})

    return build_options(cls, values)


def build_options(cls, values: dict, label=flag):
    """An options dataclass from a mapping: unknown keys (with the nearest name), types and choices checked, then
    ``validate()``. ``label`` names a key in messages (``--key`` for command options)."""
    known = {f.name: t for f, t in option_fields(cls)}
    values = dict(values)
    for f, _ in option_fields(cls):  # old spellings: --images for --data, --out for --output
        for old in f.metadata.get("aliases", ()):
            if old in values:
                if f.name in values:
                    raise ConfigError(f"{label(f.name)} given twice ({label(old)} is its old name)")
                values[f.name] = values.pop(old)
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown option {label(key)}{did_you_mean(key, known, label)}")
    kwargs = {}
    for f, typ in option_fields(cls):
        if f.name in values:
            v = _coerce(f.name, values[f.name], typ, label)
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(f"{label(f.name)} must be one of {', '.join(map(str, choices))}; got {v!r}")
            kwargs[f.name] = v
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path):
    write_yaml(path, to_dict(cfg))
