"""``pretrain(cfg)``: build the objective, the data and the optimizer, then run the engine."""
import logging

import torch

from .config import PretrainConfig
from .errors import ConfigError
from .data import (PixelSpec, check_sample, make_loader, open_images, resolve_pixels, split_train_val,
                   spread_over_classes)
from .data.hfdata import dataset_options
from .engine import TrainResult, effective_lr, fit, pretrain_optimizer
from .run import start
from .objectives import check_channels, check_objective, get_objective
from .checkpoints import load_mae
from .data import load_image, load_input
from .errors import BadImage
from .monitor import OnlineEval, check_online_eval
from .precision import resolve
from .viz import reconstruction_grid

log = logging.getLogger("mimkit")


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Pretrain on ``cfg.data`` (its training split only) and write everything to ``--output``."""
    options = check_objective(cfg)  # the objective's name and options, before any work starts
    run = start(cfg, "pretrain")  # the environment, a new folder (or refuse to overwrite another run), the seeds
    env = run.env
    source = open_images(cfg.data, **dataset_options(cfg))
    train_idx, val_idx = split_train_val(source, cfg.val_fraction)
    run = run.derive(pixels=_resolve_pixels(cfg, source, train_idx))
    objective = get_objective(cfg.objective).from_config(run.config(cfg), options)
    if getattr(objective, "mask_ratio", None) is not None:
        run = run.derive(mask_ratio=float(objective.mask_ratio))  # None on the command line: the paper's
    pixels = run.pixels
    encoder = objective.encoder
    img_size, patch = encoder.arch["img_size"], encoder.arch["patch_size"]
    if img_size % patch:
        raise ConfigError(f"--img-size {img_size} is not divisible by the patch size {patch} of {cfg.model}")
    if cfg.init:
        _init_from(objective, cfg.init)

    check_sample(source, min_size=patch, pixels=pixels)
    loader = make_loader(source, train_idx, batch_size=cfg.batch_size, recipe="pretrain", img_size=img_size,
                         aug=cfg.aug, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                         num_workers=cfg.num_workers, device=env.device,
                         cache=cfg.cache, min_size=patch, streams=cfg.shard_streams, pixels=pixels)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)

    lr = effective_lr(cfg, env)
    optimizer = pretrain_optimizer(objective, lr, cfg.weight_decay)
    recorded = run.record(cfg)  # config.yaml and run.json
    if env.is_main:
        log.info("pretraining %s (%s, %.1fM parameters) on %d images of %s (%d held out), lr %.2e, %s on %s",
                 cfg.objective, cfg.model, sum(p.numel() for p in objective.parameters()) / 1e6, len(train_idx),
                 cfg.data, len(val_idx), lr, env.precision, env.device)

    figure = _figure_callback(objective, source, val_idx if len(val_idx) else train_idx, img_size, run, cfg)
    watch = _online_eval(objective, source, train_idx, val_idx, img_size, run, cfg)

    def on_epoch_end(epoch: int, step: int):
        if figure is not None:
            figure(epoch, step)

    result = fit(objective, optimizer, loader, recorded, run.output, env, on_epoch_end=on_epoch_end, on_step=watch)
    if env.is_main:
        if figure is not None:
            figure(result.epoch - 1, result.step, final=True)
        if result.skipped_files:
            log.warning("skipped %d unreadable image file(s)", len(result.skipped_files))
        log.info("done: %d steps, %d epochs, final loss %.4f, %.1f min; checkpoints in %s", result.step,
                 result.epoch, result.loss, result.seconds / 60, run.output / "checkpoints")
    return result


def _resolve_pixels(cfg, source, train_idx) -> PixelSpec:
    """The run's input spec: ``cfg.pixels`` when given (a rerun of a config.yaml), else resolved from the options
    and the training images; the run records it (config.yaml, run.json, the checkpoints' config and, through the
    encoder's arch, every checkpoint and export) unless it is the 8-bit RGB default."""
    if cfg.pixels:
        try:
            spec = PixelSpec.from_dict(cfg.pixels)
        except (TypeError, KeyError, ValueError) as e:
            raise ConfigError(f"--pixels: not a pixel spec ({e}); leave it empty to resolve it from the data") from None
    else:
        spec = resolve_pixels(source, train_idx, cfg.in_chans, cfg.value_range, cfg.mean, cfg.std,
                              band_names=cfg.band_names, bands=cfg.bands)
    check_channels(cfg.objective, spec.in_chans)
    if spec != PixelSpec():
        log.info("input: %s", spec.describe())
    return spec


def _init_from(objective, path: str):
    """Start from released weights (any supported format); a release without a decoder keeps a fresh one."""
    if getattr(objective, "name", "") != "mae":
        raise ConfigError("--init continues MAE pretraining; other objectives start from scratch")
    _, info = load_mae(path, model=objective.model)  # shapes checked tensor by tensor, one-line errors
    if info.get("decoder_initialised"):
        log.info("--init %s holds no decoder: the decoder starts freshly initialised", path)
    log.info("--init: loaded %s", path)


def _online_eval(objective, source, train_idx, val_idx, img_size, run, cfg):
    """--eval-every: k-NN top-1 of held-out images and their reconstructions, on the main process (the weights are
    the same on every process); the check that there are labeled held-out images runs on every process."""
    if not cfg.eval_every:
        return None
    check_online_eval(source, val_idx)
    if not run.env.is_main:
        return None
    return OnlineEval(objective, source, train_idx, val_idx, every=cfg.eval_every, images=cfg.eval_images,
                      img_size=img_size, device=run.env.device, precision=resolve(cfg.precision, run.env.device)[0],
                      mask_ratio=run.mask_ratio or 0.75, seed=cfg.seed, pool=cfg.eval_pool, pixels=run.pixels)


def _figure_callback(objective, source, indices, img_size, run, cfg):
    """Reconstruction figures of eight fixed held-out images (spread over the classes, seeded) at every
    ``figure_every`` epochs and at the end."""
    if not hasattr(objective, "model") or not hasattr(objective.model, "reconstruct"):
        return None
    if not getattr(objective, "pixel_output", True):  # an MAE ablation that predicts PCA coefficients or tokens
        return None
    images = None

    def on_epoch_end(epoch: int, step: int, final: bool = False):
        nonlocal images
        if not (final or (cfg.figure_every and (epoch + 1) % cfg.figure_every == 0)):
            return
        if images is None:
            picks = _good_images(source, spread_over_classes(source, indices, cfg.seed), 8, objective.encoder.patch_size,
                                 run.pixels)
            loader = make_loader(source, picks, batch_size=len(picks), recipe="eval", img_size=img_size, shuffle=False,
                                 num_workers=0, cache="off", device=run.env.device, pixels=run.pixels)
            images = next(iter(loader))[0]
        was_training = objective.training
        objective.eval()
        with torch.no_grad():
            name = "reconstruction.png" if final else f"reconstruction-epoch{epoch + 1:04d}.png"
            reconstruction_grid(objective.model, images, run.output / "figures" / name, mask_ratio=run.mask_ratio,
                                seed=cfg.seed)
        objective.train(was_training)

    return on_epoch_end


def _good_images(source, candidates, n: int, min_size: int, pixels: PixelSpec):
    """The first ``n`` candidates that decode and are large enough, found quietly: the training loader
    names each bad file once, and a figure must not name them again."""
    picks = []
    for i in candidates:
        try:
            size = load_image(source, i).size if pixels.is_rgb8 else load_input(source, i, pixels).shape[1:]
            if min(size) >= min_size:
                picks.append(i)
        except BadImage:
            continue
        if len(picks) == n:
            break
    return picks
