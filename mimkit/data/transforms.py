"""Augmentation recipes: per-image (PIL, torchvision/timm) and batched (uint8 tensors, on any device).

pretrain  MAE: RandomResizedCrop(scale=(0.2, 1), bicubic) + flip; ``aug=`` picks the Table-1 ablation variant:
          rrc (default) | none (resize only) | fixed_crop (resize + random fixed-size crop) | rrc_jitter (+ ColorJitter)
finetune  timm's create_transform(is_training=True) with RandAugment and random erasing, as MAE fine-tuning
eval      resize (shorter side img_size / crop_pct) + center crop; crop_pct 0.875 from 224 px up, 1 below
"""
import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms as T

from ..errors import ConfigError
from ..pixels import IMAGENET_MEAN, IMAGENET_STD

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # the RGB default; other data bring their own (mimkit.pixels.PixelSpec)
RECIPES = ("pretrain", "finetune", "eval")
AUGS = ("rrc", "none", "fixed_crop", "rrc_jitter")
FINETUNE_SCALE = (0.08, 1.0)  # the fine-tuning crop's area range (timm's and MAE's) where none is given
FINETUNE_DEFAULTS = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1,
                         interpolation="bicubic", color_jitter=None)


def _resize_to(img_size, crop_pct=None):
    """Shorter side before the crop: 224 -> 256 as MAE/timm; small images (CIFAR at 32) are not enlarged."""
    crop_pct = crop_pct or (0.875 if img_size >= 224 else 1.0)
    return int(img_size / crop_pct)


def _fixed_crop_pad(img_size):
    return img_size // 8 if img_size < 224 else 0  # CIFAR-style pad 4 at 32 px; large images crop from the resize


def build_transform(recipe: str, img_size: int, aug: str = "rrc", scale=None, crop_pct=None, mean=MEAN, std=STD,
                    **finetune_kwargs):
    """Per-image transform: RGB PIL image -> normalised float tensor (3, img_size, img_size).

    ``scale``: the random-resized-crop area range, (0.2, 1) for pretrain, timm's (0.08, 1) for finetune.
    ``finetune_kwargs`` go to ``timm.data.create_transform`` over MAE's fine-tuning defaults (FINETUNE_DEFAULTS).
    """
    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if recipe == "pretrain":
        if aug in ("rrc", "rrc_jitter"):
            t = [T.RandomResizedCrop(img_size, scale=scale or (0.2, 1.0), interpolation=bicubic),
                 T.RandomHorizontalFlip()]
            t += [T.ColorJitter(0.4, 0.4, 0.4)] if aug == "rrc_jitter" else []
        elif aug == "none":
            t = [T.Resize((img_size, img_size), interpolation=bicubic)]
        elif aug == "fixed_crop":
            t = [T.Resize(_resize_to(img_size, crop_pct), interpolation=bicubic),
                 T.RandomCrop(img_size, padding=_fixed_crop_pad(img_size) or None), T.RandomHorizontalFlip()]
        else:
            raise ValueError(f"unknown aug {aug!r}; expected one of {AUGS}")
        return T.Compose(t + tail)
    if recipe == "finetune":
        from timm.data import create_transform
        kw = {**FINETUNE_DEFAULTS, **finetune_kwargs, **({"scale": scale} if scale else {})}
        return _safe_posterize(create_transform(img_size, is_training=True, mean=mean, std=std, **kw))
    if recipe == "eval":
        return T.Compose([T.Resize(_resize_to(img_size, crop_pct), interpolation=bicubic), T.CenterCrop(img_size)]
                         + tail)
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")


def _posterize(img, bits_to_keep, **_):
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:  # keep no bits: black, as Pillow < 13 did (Pillow 13 rejects it)
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _safe_posterize(transform):
    """timm's PosterizeIncreasing keeps 4 - int(m * 4 / 10) bits, 0 at magnitude 10 (reached by m9 + mstd0.5
    noise), which Pillow 13 refuses with a ValueError mid-epoch; give its ops the old 0-bit meaning instead."""
    from timm.data.auto_augment import RandAugment
    for t in getattr(transform, "transforms", []):
        for op in t.ops if isinstance(t, RandAugment) else []:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


class BatchAugment:
    """The pretrain and eval recipes on a whole batch (B, C, H, W), on whatever device the batch is on: uint8
    (8-bit files, divided by 255 here) or float in [0, 1] (other bit depths); any C, with ``len(mean)`` = C.

    Why our own code: torchvision's transforms draw one set of random parameters per call, so a batched call
    would give every image the same crop, and a Python loop over images is what costs the CPU time we want to
    save. Here each sample gets its own crop box (drawn as torchvision's RandomResizedCrop.get_params draws it)
    and flip, and a single ``grid_sample`` resamples the whole batch, bicubic as the paper (no antialiasing, so
    crops much larger than the output alias slightly; with CIFAR at 32 px every crop is upsampled).

    Randomness comes from the generator passed to :meth:`sample`, so the caller decides what it depends on.
    """

    def __init__(self, recipe: str, img_size: int, aug: str = "rrc", scale=None, ratio=(3 / 4, 4 / 3),
                 crop_pct=None, mean=MEAN, std=STD):
        if recipe not in ("pretrain", "eval"):
            raise ValueError(f"batched augmentation supports the pretrain and eval recipes, not {recipe!r}")
        if recipe == "pretrain" and aug not in AUGS:
            raise ValueError(f"unknown aug {aug!r}; expected one of {AUGS}")
        if recipe == "pretrain" and aug == "rrc_jitter" and len(mean) != 3:
            raise ConfigError(f"--aug rrc_jitter is a colour augmentation for RGB images; the data has {len(mean)} "
                              f"channel(s) (use rrc)")
        self.mode = aug if recipe == "pretrain" else "eval"
        self.size, self.scale, self.ratio, self.crop_pct = img_size, scale or (0.2, 1.0), ratio, crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def sample(self, n: int, hw, generator: torch.Generator) -> dict:
        """Parameters for ``n`` samples of source size ``hw``: crop boxes (top, left, h, w) in source pixels, flips,
        and colour-jitter factors; all on the CPU (float64 so the integer rounding matches torchvision), one row per
        sample, so they can be sliced."""
        H, W = hw
        g, S, f64 = generator, self.size, torch.float64
        u = lambda *shape: torch.rand(*shape, generator=g, dtype=f64)  # noqa: E731
        if self.mode in ("rrc", "rrc_jitter"):
            box = _rrc_boxes(n, H, W, self.scale, self.ratio, g)
        elif self.mode == "none":
            box = torch.tensor([0.0, 0.0, H, W], dtype=f64).expand(n, 4)
        else:  # eval / fixed_crop: resize the shorter side to R, then crop S x S (random after padding, or central)
            s = _resize_to(S, self.crop_pct) / min(H, W)
            rh, rw = round(H * s), round(W * s)
            if self.mode == "eval":
                top = torch.full((n,), round((rh - S) / 2), dtype=f64)  # rounded as CenterCrop
                left = torch.full((n,), round((rw - S) / 2), dtype=f64)
            else:
                p = _fixed_crop_pad(S)
                top = torch.floor(u(n) * (rh + 2 * p - S + 1)) - p
                left = torch.floor(u(n) * (rw + 2 * p - S + 1)) - p
            box = torch.stack([top / s, left / s, torch.full_like(top, S / s), torch.full_like(top, S / s)], 1)
        random_flip = self.mode in ("rrc", "rrc_jitter", "fixed_crop")
        p = dict(box=box, flip=(u(n) < 0.5) if random_flip else torch.zeros(n, dtype=torch.bool))
        if self.mode == "rrc_jitter":  # ColorJitter(0.4, 0.4, 0.4): factors in [0.6, 1.4], in a random order
            p["jitter"] = 0.6 + 0.8 * u(n, 3)
            p["order"] = u(n, 3).argsort(1)
        return p

    def __call__(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8 (B, C, H, W) or float in [0, 1] -> normalised float32 (B, C, S, S) on x's device."""
        dev, byte = x.device, x.dtype == torch.uint8
        x = resample(x.float(), params["box"].to(dev, torch.float32), params["flip"].to(dev), self.size,
                      "zeros" if self.mode == "fixed_crop" else "border")  # zeros = torchvision's pad fill 0
        # bicubic overshoots; the PIL path clips to uint8 as well
        x = x.clamp_(0, 255).div_(255) if byte else x.clamp_(0, 1)
        if "jitter" in params:
            x = _color_jitter(x, params["jitter"].to(dev, torch.float32), params["order"].to(dev))
        return (x - self.mean.to(dev)) / self.std.to(dev)


def _rrc_boxes(n, H, W, scale, ratio, g, attempts=10):
    """RandomResizedCrop boxes, vectorised: the first of 10 (area, log-aspect) draws that fits, else the
    central fallback, exactly the distribution of torchvision's sequential get_params."""
    f64 = torch.float64
    area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=g, dtype=f64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, attempts, generator=g, dtype=f64))
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first fitting attempt (0 when none fits)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    # fallback: the whole image, or its central part clipped to the aspect-ratio range
    if W / H < min(ratio):
        fw, fh = W, round(W / min(ratio))
    elif W / H > max(ratio):
        fw, fh = round(H * max(ratio)), H
    else:
        fw, fh = W, H
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.floor(torch.rand(n, generator=g, dtype=f64) * (H - h + 1))
    left = torch.floor(torch.rand(n, generator=g, dtype=f64) * (W - w + 1))
    top = torch.where(found, top, float((H - fh) // 2))
    left = torch.where(found, left, float((W - fw) // 2))
    return torch.stack([top, left, h, w], 1)


def resample(x, box, flip, size, padding_mode, mode: str = "bicubic"):
    """Crop box (top, left, h, w) of every image and resize it to size x size, mirrored where ``flip``; the box
    may reach outside the image (``padding_mode`` fills it). ``mode='nearest'`` for masks (segmentation)."""
    B, _, H, W = x.shape
    t = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size  # output pixel centres in (0, 1)
    tx = torch.where(flip[:, None], 1 - t, t)
    # source position in pixel-edge units, then grid_sample's [-1, 1] (align_corners=False); elementwise, so a
    # sample's pixels do not depend on the rest of the batch
    gx = 2 * (box[:, 1:2] + tx * box[:, 3:4]) / W - 1  # (B, size)
    gy = 2 * (box[:, 0:1] + t * box[:, 2:3]) / H - 1
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _color_jitter(x, factors, order):
    """Brightness, contrast, saturation (torchvision's formulas on [0, 1] floats), per sample, in per-sample order."""
    ops = (lambda x, f: x * f,
           lambda x, f: f * x + (1 - f) * _gray(x).mean((2, 3), keepdim=True),
           lambda x, f: f * x + (1 - f) * _gray(x))
    for step in range(3):
        out = x
        for k, op in enumerate(ops):
            sel = (order[:, step] == k).view(-1, 1, 1, 1)
            out = torch.where(sel, op(x, factors[:, k].view(-1, 1, 1, 1)).clamp(0, 1), out)
        x = out
    return x


def batched_form(recipe: str, aug: str, transform_kwargs: dict):
    """``(recipe, aug, kwargs)`` for a :class:`BatchAugment` that does what ``recipe`` does, or None where only the
    per-image path can: the pretrain and eval recipes always; fine-tuning when it is only geometric (its random
    resized crop, timm's scale 0.08-1 unless given, and flip; no RandAugment, colour jitter or random erasing)."""
    if recipe in ("pretrain", "eval"):
        return recipe, aug, transform_kwargs
    kw = {**FINETUNE_DEFAULTS, **transform_kwargs}
    if any(kw.get(k) for k in ("auto_augment", "color_jitter", "re_prob")):
        return None
    kept = {k: transform_kwargs[k] for k in ("crop_pct", "mean", "std") if k in transform_kwargs}
    return "pretrain", "rrc", {**kept, "scale": transform_kwargs.get("scale") or FINETUNE_SCALE}


class TensorTransform:
    """The per-image path for tensors of any channel count and bit depth ((C, H, W) uint8 or float in [0, 1]):
    the pretrain and eval recipes are :class:`BatchAugment` on a batch of one, drawn from torch's global
    generator (the loader seeds it per image). Fine-tuning gets the geometric part of MAE's recipe, a random
    resized crop (scale 0.08-1) and flip, plus random erasing; RandAugment and colour jitter are RGB operations
    and are refused for other channel counts.
    """

    def __init__(self, recipe: str, img_size: int, aug: str = "rrc", scale=None, crop_pct=None, mean=MEAN, std=STD,
                 **finetune_kwargs):
        self.erase = None
        if recipe == "finetune":
            kw = {**FINETUNE_DEFAULTS, **finetune_kwargs}
            for key, what in (("auto_augment", "--randaug (RandAugment)"), ("color_jitter", "colour jitter")):
                if kw.get(key):
                    raise ConfigError(f"{what} is an augmentation for RGB images; the data has {len(mean)} "
                                      f"channel(s): pass --randaug ''")
            if kw.get("re_prob"):
                from timm.data.random_erasing import RandomErasing
                self.erase = RandomErasing(kw["re_prob"], mode=kw.get("re_mode", "pixel"), max_count=kw.get("re_count", 1),
                                           device="cpu")
            recipe, aug, scale = "pretrain", "rrc", scale or FINETUNE_SCALE
        self.augment = BatchAugment(recipe, img_size, aug, scale=scale, crop_pct=crop_pct, mean=mean, std=std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        params = self.augment.sample(1, x.shape[1:], torch.default_generator)
        x = self.augment(x[None], params)[0]
        return self.erase(x) if self.erase is not None else x
