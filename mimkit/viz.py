"""Figures as in the paper: original | masked | reconstruction | reconstruction with the visible patches pasted back."""
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from . import views
from .errors import ConfigError
from .checkpoints import load, load_mae
from .data import open_images, reuse_pixels, split_train_val, spread_over_classes
from .errors import DataError
from .features import extract_features
from .files import write_json, write_via
from .pixels import PixelSpec

log = logging.getLogger("mimkit")


@torch.no_grad()
def reconstruction_panels(mae, images: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0,
                          pixels: PixelSpec = None, keys=None, kind: str = "random") -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1]: original, masked input (hidden patches grey), reconstruction, pasted; shown by
    ``pixels`` (default the encoder's spec: its statistics and red, green, blue roles). Each image's mask comes from
    (seed, its key): ``keys`` are the images' names, or their positions when None (:mod:`mimkit.views`)."""
    keys = list(range(len(images))) if keys is None else keys
    return views.reconstruction(mae, images, keys, mask_ratio, seed, kind, pixels)["panels"]


def _upscale(x: torch.Tensor, min_px: int = 128) -> torch.Tensor:
    scale = max(1, min_px // x.shape[-1])
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


def reconstruction_grid(mae, images: torch.Tensor, path, mask_ratio: float = 0.75, seed: int = 0,
                        pixels: PixelSpec = None, keys=None, kind: str = "random") -> Path:
    """One PNG, a row per image; small images are enlarged (nearest) so patches stay visible."""
    panels = reconstruction_panels(mae, images, mask_ratio, seed, pixels, keys, kind)
    return save_rows(panels, path)


def save_rows(rows: torch.Tensor, path) -> Path:
    """(B, K, 3, H, W) figures in [0, 1] as one PNG grid, a row per image, K columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(_upscale(rows.flatten(0, 1).cpu()), nrow=rows.shape[1], padding=2, pad_value=1.0)
    write_via(path, lambda f: save_image(grid, f, format="png"))
    return path


@torch.no_grad()
def masked_mse(mae, batches, mask_ratio: float = 0.75, seed: int = 0, kind: str = "random") -> dict:
    """The MAE loss (MSE on the hidden patches, in the decoder's target space) over image ``batches`` (an iterable
    of (B, C, H, W) tensors or of (tensor, keys) pairs, or one tensor) with seeded masks, beside the same error of
    predicting zeros: for normalised targets, each hidden patch's own mean colour. Each image's mask depends only
    on the seed and its key (its name; its position in the stream when the batches come without keys), never on
    the batching. ``gain`` is how much lower the model's error is, with its standard error over the images
    (paired: the same images and masks), the noise a comparison must beat."""
    if torch.is_tensor(batches):
        batches = [batches]
    model, zeros = [], []  # per image
    for batch in batches:
        x, keys = batch if isinstance(batch, (tuple, list)) else (batch, range(len(model), len(model) + len(batch)))
        out = views.reconstruction(mae, x, list(keys), mask_ratio, seed, kind)
        model += out["loss"].tolist()
        zeros += out["zero_loss"].tolist()
    model, zeros = torch.tensor(model, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)
    return {"masked_mse": model.mean().item(), "masked_mse_se": _standard_error(model),
            "zero_prediction_mse": zeros.mean().item(), "zero_prediction_se": _standard_error(zeros),
            "gain": (zeros - model).mean().item(), "gain_se": _standard_error(zeros - model), "images": len(model),
            "mask_ratio": mask_ratio, "seed": seed, "normalised_target": bool(mae.norm_pix_loss)}


def _standard_error(x: torch.Tensor) -> float:
    return (x.std() / len(x) ** 0.5).item() if len(x) > 1 else float("nan")


def reconstruct(cfg) -> list:
    """CLI ``mimkit reconstruct``: figures for ``cfg.num_images`` images of ``cfg.data`` (spread over its classes,
    seeded) into ``cfg.output``, and the reconstruction error (``results.json``) over those images, or over all
    held-out ones with val_fraction."""
    norm_pix = {"auto": None, "normalised": True, "raw": False}[cfg.target]
    source = open_images(cfg.data)  # the images first: a bad --data fails before the weights are read
    if cfg.val_fraction > 0:
        scored = split_train_val(source, cfg.val_fraction)[1]
        if not scored:
            raise DataError(f"--val-fraction {cfg.val_fraction} holds out no image of the {len(source)} in "
                            f"{cfg.data}")
        shown = spread_over_classes(source, scored, cfg.seed)[:cfg.num_images]
    else:
        scored = shown = spread_over_classes(source, range(len(source)), cfg.seed)[:cfg.num_images]
    mae, info = load_mae(cfg.checkpoint, allow_missing_decoder=False, norm_pix_loss=norm_pix)
    mae.eval()
    # the encoder's input spec, the data's bands matched to it by name, --bands as the colours shown
    pixels = reuse_pixels(mae.encoder.pixels, source, scored, band_names=cfg.band_names, bands=cfg.bands)
    size = mae.encoder.arch["img_size"]

    def named(batches):  # each image's mask is keyed by its name (mimkit.views), as on the explore page
        return ((x, [source.names[i] for i in idx]) for x, idx in batches)

    images, names = zip(*named(views.load_images(source, shown, size, pixels, len(shown))))
    images, names = torch.cat(images), [n for batch in names for n in batch]
    out = Path(cfg.output)
    if cfg.grid:
        paths = [reconstruction_grid(mae, images, out / f"reconstruction-mask{cfg.mask_ratio:.2f}-seed{cfg.seed}.png",
                                     cfg.mask_ratio, cfg.seed, pixels, names, cfg.masking)]
    else:
        panels = reconstruction_panels(mae, images, cfg.mask_ratio, cfg.seed, pixels, names, cfg.masking)
        paths = []
        for name, row in zip(names, panels):
            # the file's path inside the folder, flattened: cat/0000.jpg and ship/0000.jpg must not share a figure
            p = out / (str(Path(name).with_suffix("")).replace("/", "_") + f"-mask{cfg.mask_ratio:.2f}.png")
            paths.append(save_rows(row.unsqueeze(0), p))
    for p in paths:
        log.info("wrote %s", p)
    score = masked_mse(mae, named(views.load_images(source, scored, size, pixels, min(len(scored), 256))),
                       cfg.mask_ratio, cfg.seed, cfg.masking)  # streamed
    score["masking"] = cfg.masking
    score["held_out"] = cfg.val_fraction > 0
    write_json(out / "results.json", score)
    which = "held-out" if cfg.val_fraction > 0 else "shown"
    zeros = "predicting zeros" + (" (each patch its own mean colour)" if mae.norm_pix_loss else "")
    print(f"reconstruct: MSE on hidden patches {score['masked_mse']:.4f} over {score['images']} {which} images, "
          f"{score['zero_prediction_mse']:.4f} {zeros}: "
          f"the model's error is lower by {score['gain']:.4f} +- {score['gain_se']:.4f} (standard error over the "
          f"images; {out / 'results.json'})")
    return paths


def viz(cfg) -> dict:
    """CLI ``mimkit viz attention|pca|neighbours``: a PNG (a row per image of ``cfg.data``, spread over its
    classes) and the numbers behind it in a JSON beside it, computed by :mod:`mimkit.views` as the explore page
    computes them."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = open_images(cfg.data)  # the images first: a bad --data fails before the weights are read
    model = load(cfg.checkpoint)
    encoder = model.encoder if hasattr(model, "encoder") else model
    views.check_vit(encoder)
    encoder.eval()
    picks = spread_over_classes(source, range(len(source)), cfg.seed)[:cfg.num_images]
    # the encoder's input spec, the data's bands matched to it by name, --bands as the colours shown
    pixels, size = reuse_pixels(encoder.pixels, source, picks, bands=cfg.bands), encoder.arch["img_size"]
    images, index = zip(*views.load_images(source, picks, size, pixels))
    images, index = torch.cat(images), [i for batch in index for i in batch]
    shown = views.display_images(images, pixels)
    numbers = {"checkpoint": str(cfg.checkpoint), "images": str(cfg.data), "img_size": size}
    if cfg.action == "attention":
        maps = views.cls_attention(encoder, images, cfg.block)  # (B, heads, gh, gw)
        columns = [shown, views.attention_overlay(shown, maps.mean(1))]
        columns += [views.attention_overlay(shown, maps[:, h]) for h in range(maps.shape[1])]
        numbers.update(block=cfg.block % len(encoder.blocks), heads=maps.shape[1],
                       columns=["image", "mean over heads"] + [f"head {h}" for h in range(maps.shape[1])],
                       per_image=[{"name": source.names[i], "mean": maps[j].mean(0).tolist(), "heads": maps[j].tolist()}
                                  for j, i in enumerate(index)])
    elif cfg.action == "pca":
        feats, grid = views.patch_features(encoder, images), views.grid_of(encoder, images)
        if cfg.pca_fit == "sample":
            sample = spread_over_classes(source, range(len(source)), cfg.seed)[:cfg.pca_images]
            fitted = torch.cat([views.patch_features(encoder, x) for x, _ in views.load_images(source, sample, size, pixels)])
            fits = [views.fit_pca(fitted.flatten(0, 1))] * len(index)
        else:
            fits = [views.fit_pca(f) for f in feats]
        colours = torch.cat([views.pca_colours(f.unsqueeze(0), pca, grid) for f, pca in zip(feats, fits)])
        columns = [shown, views.upsample_grid(colours.flatten(0, 1), images.shape[-2:]).view_as(shown)]
        numbers.update(fit=cfg.pca_fit, sample_images=cfg.pca_images if cfg.pca_fit == "sample" else None,
                       columns=["image", "first three principal components as RGB"],
                       per_image=[{"name": source.names[i], "explained": pca["explained"]}
                                  for i, pca in zip(index, fits)])
    else:
        if cfg.index:
            found = views.FeatureIndex.read(cfg.index, cfg.checkpoint, size, source)
            if found.meta["pool"] != cfg.pool:
                raise ConfigError(f"--index {cfg.index} holds {found.meta['pool']!r} features; --pool is {cfg.pool!r}")
        else:
            found = views.FeatureIndex.build(encoder, source, range(len(source)), cfg.pool, progress=_every_tenth())
        queries = extract_features(encoder, images, cfg.pool)
        lists = [found.nearest(q, cfg.k, exclude=i) for q, i in zip(queries, index)]
        columns = [shown]
        for j in range(cfg.k):  # the j-th neighbour of every image, blank where an image has fewer
            picks = [row[j]["index"] if j < len(row) else None for row in lists]
            got = {}
            for x, idx in views.load_images(source, [i for i in picks if i is not None], size, pixels):
                got.update(zip(idx, views.display_images(x, pixels)))
            columns.append(torch.stack([got.get(i, torch.ones_like(shown[0])) for i in picks]))
        numbers.update(pool=cfg.pool, k=cfg.k, index=cfg.index or "built", columns=["image"] + [
            f"neighbour {j + 1}" for j in range(cfg.k)], per_image=[
            {"name": source.names[i], "neighbours": row} for i, row in zip(index, lists)])
    out = Path(cfg.output)
    figure = save_rows(torch.stack(columns, dim=1), out / f"{cfg.action}.png")
    write_json(out / f"{cfg.action}.json", numbers)
    log.info("wrote %s and %s", figure, out / f"{cfg.action}.json")
    return numbers


def _every_tenth():
    """A progress callback logging the index build about every tenth of the images."""
    last = [0]

    def progress(done: int, total: int):
        if done == total or done - last[0] >= total / 10:
            last[0] = done
            log.info("neighbour index: %d of %d images", done, total)
    return progress
