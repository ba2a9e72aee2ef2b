"""Figures as in the paper: original | masked | reconstruction | reconstruction with the visible patches pasted back."""
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from .data import PixelSpec
from .errors import ConfigError
from .files import write_via
from .checkpoints import load_mae
from .data import make_loader, open_images, split_train_val, spread_over_classes
from .errors import DataError
from .files import write_json

log = logging.getLogger("mimkit")


def _to_pixels(x: torch.Tensor, spec: PixelSpec, bands=None) -> torch.Tensor:
    """Normalised (B, C, H, W) -> displayable (B, 3, H, W) in [0, 1]: one channel as grey, three as RGB, more as
    the false colour of ``bands`` (1-based, as remote sensing names them; default the first three)."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    x = (x.float() * std + mean).clamp(0, 1)
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    return x[:, [b - 1 for b in (bands or (1, 2, 3))]]


def check_bands(bands, in_chans: int):
    if bands and (len(bands) != 3 or not all(1 <= b <= in_chans for b in bands)):
        raise ConfigError(f"--bands needs three channel numbers in 1..{in_chans}, got {','.join(map(str, bands))}")


@torch.no_grad()
def reconstruction_panels(mae, images: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0,
                          bands=None) -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1]: original, masked input (hidden patches grey), reconstruction, pasted; N-channel
    images shown as the false colour of ``bands`` (see :func:`_to_pixels`)."""
    gen = torch.Generator().manual_seed(seed)
    gh, gw = images.shape[-2] // mae.patch_size, images.shape[-1] // mae.patch_size
    noise = torch.rand(images.shape[0], gh * gw, generator=gen).to(images.device)
    recon, mask = mae.reconstruct(images, mask_ratio=mask_ratio, noise=noise)
    p = mae.patch_size
    pixel_mask = mask.reshape(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)  # 1 = hidden
    spec = PixelSpec.from_dict(mae.encoder.arch.get("pixels"), mae.encoder.in_chans)
    check_bands(bands, spec.in_chans)
    original, recon = _to_pixels(images, spec, bands), _to_pixels(recon, spec, bands)
    if not spec.is_rgb8:  # e.g. 12-bit data in a 16-bit range: stretch for display, the 1st-99th percentile of
        # the originals' values per shown channel to black-white, the same for every panel
        q = torch.quantile(original.transpose(0, 1).flatten(1).float(), torch.tensor([0.01, 0.99], device=images.device), dim=1)
        lo, hi = q[0].view(1, -1, 1, 1), q[1].view(1, -1, 1, 1)
        span = (hi - lo).clamp_min(1e-6)
        original, recon = ((original - lo) / span).clamp(0, 1), ((recon - lo) / span).clamp(0, 1)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = original * (1 - pixel_mask) + recon * pixel_mask
    return torch.stack([original, masked, recon, pasted], dim=1)


def _upscale(x: torch.Tensor, min_px: int = 128) -> torch.Tensor:
    scale = max(1, min_px // x.shape[-1])
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


def reconstruction_grid(mae, images: torch.Tensor, path, mask_ratio: float = 0.75, seed: int = 0,
                        bands=None) -> Path:
    """One PNG, a row per image; small images are enlarged (nearest) so patches stay visible."""
    panels = reconstruction_panels(mae, images, mask_ratio, seed, bands)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(_upscale(panels.flatten(0, 1).cpu()), nrow=4, padding=2, pad_value=1.0)
    write_via(path, lambda f: save_image(grid, f, format="png"))
    return path


@torch.no_grad()
def masked_mse(mae, batches, mask_ratio: float = 0.75, seed: int = 0) -> dict:
    """The MAE loss (MSE on the hidden patches, in the decoder's target space) over image ``batches`` (an iterable
    of (B, 3, H, W) tensors, or one tensor) with seeded masks, beside the same error of predicting zeros: for
    normalised targets, each hidden patch's own mean colour. Masks depend only on the seed and image order.
    ``gain`` is how much lower the model's error is, with its standard error over the images (paired: the same
    images and masks), the noise a comparison must beat."""
    if torch.is_tensor(batches):
        batches = [batches]
    gen = torch.Generator().manual_seed(seed)
    model, zeros = [], []  # per image
    for x in batches:
        gh, gw = x.shape[-2] // mae.patch_size, x.shape[-1] // mae.patch_size
        out = mae(x, mask_ratio=mask_ratio, noise=torch.rand(x.shape[0], gh * gw, generator=gen).to(x.device))
        for j in range(x.shape[0]):  # every image hides the same number of patches: the batch loss is their mean
            one = slice(j, j + 1)
            model.append(mae.forward_loss(x[one], out.pred[one], out.mask[one]).item())
            zeros.append(mae.forward_loss(x[one], torch.zeros_like(out.pred[one]), out.mask[one]).item())
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
    pixels = PixelSpec.from_dict(mae.encoder.arch.get("pixels"), mae.encoder.in_chans)  # the encoder's input
    bands = [int(b) for b in cfg.bands.split(",")] if cfg.bands else None
    check_bands(bands, pixels.in_chans)

    def images_of(indices, batch_size):
        loader = make_loader(source, indices, batch_size=batch_size, recipe="eval", shuffle=False, num_workers=0,
                             img_size=mae.encoder.arch["img_size"], cache="off", device="cpu", pixels=pixels)
        return (x for x, _ in loader)

    images = torch.cat(list(images_of(shown, len(shown))))
    out = Path(cfg.output)
    if cfg.grid:
        paths = [reconstruction_grid(mae, images, out / f"reconstruction-mask{cfg.mask_ratio:.2f}-seed{cfg.seed}.png",
                                     cfg.mask_ratio, cfg.seed, bands)]
    else:
        panels = reconstruction_panels(mae, images, cfg.mask_ratio, cfg.seed, bands)
        paths = []
        for name, row in zip([source.names[i] for i in shown], panels):
            # the file's path inside the folder, flattened: cat/0000.jpg and ship/0000.jpg must not share a figure
            p = out / (str(Path(name).with_suffix("")).replace("/", "_") + f"-mask{cfg.mask_ratio:.2f}.png")
            p.parent.mkdir(parents=True, exist_ok=True)
            grid = make_grid(_upscale(row.cpu()), nrow=4, padding=2, pad_value=1.0)
            write_via(p, lambda f: save_image(grid, f, format="png"))
            paths.append(p)
    for p in paths:
        log.info("wrote %s", p)
    score = masked_mse(mae, images_of(scored, min(len(scored), 256)), cfg.mask_ratio, cfg.seed)  # streamed
    score["held_out"] = cfg.val_fraction > 0
    write_json(out / "results.json", score)
    which = "held-out" if cfg.val_fraction > 0 else "shown"
    zeros = "predicting zeros" + (" (each patch its own mean colour)" if mae.norm_pix_loss else "")
    print(f"reconstruct: MSE on hidden patches {score['masked_mse']:.4f} over {score['images']} {which} images, "
          f"{score['zero_prediction_mse']:.4f} {zeros}: "
          f"the model's error is lower by {score['gain']:.4f} +- {score['gain_se']:.4f} (standard error over the "
          f"images; {out / 'results.json'})")
    return paths
