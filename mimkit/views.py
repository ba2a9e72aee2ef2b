"""What an encoder learned, as numbers and pictures: masked reconstructions under random, block or grid masks, the
class token's attention, the first principal components of patch features, nearest neighbours.

The one home of these computations: ``mimkit reconstruct``, ``mimkit viz attention|pca|neighbours`` and the
``mimkit explore`` page all call them, so a figure and the page show the same numbers.

Masks depend only on (seed, image key), never on an image's place in a batch: each image draws its own noise from
a generator seeded by the seed and its key (the file's own name, or its position when images come without names).
So ``mimkit reconstruct --data photo.jpg``, the same file inside a folder, and the page's upload of ``photo.jpg``
hide the same patches and report the same loss. (Files of one name in different folders, cat/0001.jpg and
dog/0001.jpg, share a mask pattern; a mask never depends on the pixels, so scores stay unbiased.)
"""
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import make_loader
from .data.loader import mix_seed
from .errors import ConfigError, DataError
from .features import checkpoint_id, extract_features
from .masking import MASKINGS, draw_mask, mask_to_ids, random_masking
from .pixels import PixelSpec, resolve_roles

POOLS = ("cls", "mean")  # image features the neighbour index holds (one vector per image)


# masks ------------------------------------------------------------------------------------------------------
def key_seed(seed: int, key) -> int:
    """The generator seed of one image: its key is its file name (str; the last part of a path, so a file seeds
    the same mask inside its folder, alone or uploaded) or its position (int)."""
    if isinstance(key, str):
        key = int.from_bytes(hashlib.blake2b(key.replace("\\", "/").rsplit("/", 1)[-1].encode(),
                                             digest_size=8).digest(), "little") >> 1
    return mix_seed(seed, int(key))


class KeyedNoise:
    """``rand(batch, *shape)`` with one row per image key, each from its own seeded generator: the ``rng`` that
    :func:`mimkit.masking.draw_mask` takes, so its masks follow the images, not their batch."""

    def __init__(self, seed: int, keys: Sequence):
        self.seeds = [key_seed(seed, k) for k in keys]

    def rand(self, batch: int, *shape) -> torch.Tensor:
        if batch != len(self.seeds):
            raise ValueError(f"noise for {len(self.seeds)} images, asked for {batch}")
        return torch.stack([torch.rand(*shape, generator=torch.Generator().manual_seed(s)) for s in self.seeds])


def hidden_patches(kind: str, keys: Sequence, grid_hw, mask_ratio: float, seed: int):
    """MAE's index form (``RandomMask``) of a ``kind`` mask (random, block, grid) for the images ``keys``."""
    if kind not in MASKINGS:
        raise ConfigError(f"mask kind must be one of {', '.join(MASKINGS)}; got {kind!r}")
    rng, n = KeyedNoise(seed, keys), grid_hw[0] * grid_hw[1]
    if kind == "random":  # MAE's own sampler on the same noise as the model's forward(noise=...)
        return random_masking(len(keys), n, mask_ratio, noise=rng.rand(len(keys), n))
    return mask_to_ids(draw_mask(kind, len(keys), grid_hw, mask_ratio, rng=rng))


@torch.no_grad()
def masked_prediction(mae, images: torch.Tensor, keys: Sequence, mask_ratio: float, seed: int, kind: str = "random"):
    """The decoder's prediction (B, L, p*p*C) and the mask (B, L) bool (True = hidden) of an MAE on ``images``."""
    p = mae.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    m = hidden_patches(kind, keys, grid, mask_ratio, seed)
    latent = mae.forward_encoder(images, m.ids_keep.to(images.device))
    return mae.forward_decoder(latent, m.ids_restore.to(images.device), grid), m.mask.to(images.device)


def patch_errors(mae, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(B, L) squared error per patch in the decoder's target space (normalised pixels when norm_pix_loss); the
    MAE loss of an image is its mean over the hidden patches (``mae.forward_loss``)."""
    return (pred.float() - mae.target(images).float()).pow(2).mean(-1)


def hidden_loss(errors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each image's mean error over its hidden patches."""
    m = mask.float()
    return (errors * m).sum(1) / m.sum(1)


# display ----------------------------------------------------------------------------------------------------
def with_bands(spec: PixelSpec, bands=None) -> PixelSpec:
    """``spec`` with ``bands`` (``--bands``: three band names or 1-based numbers, as text or a sequence) as its red,
    green and blue roles; None or '' keeps the spec's own (the checkpoint's roles, else the first three)."""
    if not bands:
        return spec
    parts = [b.strip() for b in bands.split(",")] if isinstance(bands, str) else [str(b) for b in bands]
    return replace(spec, rgb=resolve_roles(parts, spec.band_names, spec.in_chans))


def to_display(x: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """Normalised (B, C, H, W) -> displayable (B, 3, H, W) in [0, 1] by the spec's one denormalisation: one channel
    as grey, the red, green and blue roles as RGB (default the first three: RGB, or a false colour)."""
    return spec.denormalize(x)[:, list(spec.display_channels())]


def stretch(reference: torch.Tensor, *others: torch.Tensor):
    """Non-8-bit data (e.g. 12-bit in a 16-bit range) stretched for display: the 1st-99th percentile of the
    reference's values per shown channel to black-white, the same for every panel."""
    q = torch.quantile(reference.transpose(0, 1).flatten(1).float(),
                       torch.tensor([0.01, 0.99], device=reference.device), dim=1)
    lo, hi = q[0].view(1, -1, 1, 1), q[1].view(1, -1, 1, 1)
    span = (hi - lo).clamp_min(1e-6)
    return [((t - lo) / span).clamp(0, 1) for t in (reference, *others)]


def display_images(images: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    shown = to_display(images, spec)
    return shown if spec.is_rgb8 else stretch(shown)[0]


def upsample_grid(maps: torch.Tensor, size) -> torch.Tensor:
    """(B, gh, gw) patch values -> (B, 1, H, W), each patch a block of pixels."""
    return F.interpolate(maps.unsqueeze(1).float(), size=tuple(size), mode="nearest")


def heat(maps: torch.Tensor, size, per_image: bool = True) -> torch.Tensor:
    """(B, gh, gw) values -> (B, 3, H, W) 'inferno' colours (matplotlib's colormap), scaled to each map's range."""
    from matplotlib import colormaps
    m = maps.float()
    lo = m.flatten(1).min(1).values.view(-1, 1, 1) if per_image else m.min()
    hi = m.flatten(1).max(1).values.view(-1, 1, 1) if per_image else m.max()
    m = ((m - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    rgb = torch.from_numpy(colormaps["inferno"](m.cpu().numpy())[..., :3]).float().permute(0, 3, 1, 2)
    return F.interpolate(rgb, size=tuple(size), mode="nearest")


@torch.no_grad()
def reconstruction(mae, images: torch.Tensor, keys: Sequence, mask_ratio: float = 0.75, seed: int = 0,
                   kind: str = "random", pixels: Optional[PixelSpec] = None) -> dict:
    """The paper's figure panels and their numbers, from one masked forward pass:
    ``panels`` (B, 4, 3, H, W) in [0, 1] (original, masked input with hidden patches grey, reconstruction, and
    the reconstruction with the visible patches pasted back), ``errors`` (B, L) per-patch squared error in the
    decoder's target space, ``mask`` (B, L), ``loss`` (B,) the MAE loss on the hidden patches, ``zero_loss`` (B,)
    the same for predicting zeros (for normalised targets: each hidden patch's own mean colour), ``error_map``
    (B, 3, H, W) the per-patch error as colours."""
    spec = pixels or mae.encoder.pixels
    pred, mask = masked_prediction(mae, images, keys, mask_ratio, seed, kind)
    errors = patch_errors(mae, images, pred)
    zero = patch_errors(mae, images, torch.zeros_like(pred))
    recon = mae.predicted_images(images, pred)
    p = mae.patch_size
    gh, gw = images.shape[-2] // p, images.shape[-1] // p
    pixel_mask = upsample_grid(mask.reshape(-1, gh, gw), images.shape[-2:])  # 1 = hidden
    original, recon = to_display(images, spec), to_display(recon, spec)
    if not spec.is_rgb8:
        original, recon = stretch(original, recon)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = original * (1 - pixel_mask) + recon * pixel_mask
    return {"panels": torch.stack([original, masked, recon, pasted], dim=1), "errors": errors, "mask": mask,
            "loss": hidden_loss(errors, mask), "zero_loss": hidden_loss(zero, mask),
            "error_map": heat(errors.reshape(-1, gh, gw), images.shape[-2:])}


# attention and features -------------------------------------------------------------------------------------
def check_vit(encoder):
    if not hasattr(encoder, "blocks") or not hasattr(encoder, "forward_features"):
        raise ConfigError(f"attention and patch features need a ViT encoder; this checkpoint's is "
                          f"{type(encoder).__name__}")


@torch.no_grad()
def cls_attention(encoder, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """(B, heads, gh, gw): the class token's attention to each patch in ``block`` (negative: from the end).

    timm's attention computes through the fused kernel, which returns no weights, so the block's input is caught
    on the way (a forward pre-hook on the whole-image pass) and its weights are computed again from its own q, k
    projections, as that block computes them: softmax(q k^T * scale), q/k norms included.
    """
    check_vit(encoder)
    depth = len(encoder.blocks)
    if not -depth <= block < depth:
        raise ConfigError(f"block must be in 0..{depth - 1} (or -1 for the last); got {block}")
    attn, seen = encoder.blocks[block].attn, {}
    hook = attn.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    try:
        encoder.forward_features(images)
    finally:
        hook.remove()
    x = seen["x"].float()
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
    gh, gw = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    return weights[:, :, 0, 1:].reshape(b, attn.num_heads, gh, gw)


def attention_overlay(display: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The image (B, 3, H, W) half-blended with each (B, gh, gw) map's colours."""
    return 0.5 * display + 0.5 * heat(maps, display.shape[-2:])


@torch.no_grad()
def patch_features(encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, L, D) the patch tokens after the encoder's final norm (DINOv2's figure uses these)."""
    check_vit(encoder)
    return encoder.forward_features(images)[:, 1:].float()


def fit_pca(features: torch.Tensor, components: int = 3) -> dict:
    """Principal components of (N, D) features (torch's SVD of the centred matrix): ``mean``, ``basis`` (k, D) with
    each component's sign fixed (its largest loading positive, so colours do not flip between runs), ``explained``
    variance ratios, and the 1st/99th percentiles (``lo``, ``hi``) of the fitted features' projections, which map
    them to colours."""
    mean = features.mean(0)
    _, s, vh = torch.linalg.svd(features - mean, full_matrices=False)
    basis = vh[:components]
    basis = basis * torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    proj = (features - mean) @ basis.T
    q = torch.quantile(proj, torch.tensor([0.01, 0.99]), dim=0)
    var = s.pow(2)
    return {"mean": mean, "basis": basis, "explained": (var[:components] / var.sum()).tolist(), "lo": q[0], "hi": q[1]}


def pca_colours(features: torch.Tensor, pca: dict, grid_hw) -> torch.Tensor:
    """(B, L, D) patch features -> (B, 3, gh, gw) in [0, 1]: the first three components as red, green, blue."""
    proj = (features - pca["mean"]) @ pca["basis"].T
    rgb = ((proj - pca["lo"]) / (pca["hi"] - pca["lo"]).clamp_min(1e-12)).clamp(0, 1)
    if rgb.shape[-1] < 3:  # fewer than three components (a 2-D feature space): the missing ones black
        rgb = F.pad(rgb, (0, 3 - rgb.shape[-1]))
    return rgb.transpose(1, 2).reshape(features.shape[0], 3, *grid_hw)


# images -----------------------------------------------------------------------------------------------------
def load_images(source, indices: Sequence[int], img_size: int, pixels: PixelSpec, batch_size: int = 64):
    """Yield (images (B, C, S, S) normalised, source indices) in order, prepared as every evaluation prepares them
    (the 'eval' recipe: resize and centre crop); unreadable files are skipped and warned about by the loader."""
    loader = make_loader(source, list(indices), batch_size=batch_size, recipe="eval", shuffle=False, num_workers=0,
                         img_size=img_size, cache="off", device="cpu", pixels=pixels, with_index=True)
    for x, _, idx in loader:
        yield x, [int(i) for i in idx]


# neighbours -------------------------------------------------------------------------------------------------
class FeatureIndex:
    """One feature vector per image of a source, unit length, for cosine nearest neighbours."""

    def __init__(self, indices: List[int], names: List[str], features: torch.Tensor, meta: dict):
        self.indices, self.names, self.meta = indices, names, meta
        self.features = F.normalize(features.float(), dim=1)

    @classmethod
    def build(cls, encoder, source, indices, pool: str = "cls", batch_size: int = 64,
              progress: Optional[Callable[[int, int], None]] = None) -> "FeatureIndex":
        size, feats, kept = encoder.arch["img_size"], [], []
        indices = list(indices)
        for x, idx in load_images(source, indices, size, encoder.pixels, batch_size):
            feats.append(extract_features(encoder, x, pool).float())
            kept += idx
            if progress:
                progress(len(kept), len(indices))
        features = torch.cat(feats) if feats else torch.zeros(0, encoder.embed_dim)
        return cls(kept, [source.names[i] for i in kept], features, {"pool": pool, "img_size": size})

    @classmethod
    def read(cls, path, checkpoint: str, img_size: int, source) -> "FeatureIndex":
        """``mimkit embed`` output (OUT.npy, names in OUT.txt, how it was made in OUT.json) as an index over
        ``source``; refused when made from another checkpoint, image size or pooling, or for other images."""
        path = Path(path)
        meta_file = path.with_suffix(".json")
        if not meta_file.is_file():
            raise DataError(f"{path}: no {meta_file.name} beside it saying which checkpoint made it; "
                            f"write it again with mimkit embed")
        meta = json.loads(meta_file.read_text())
        if meta.get("checkpoint") != checkpoint_id(checkpoint):
            raise DataError(f"{path}: made from {meta.get('checkpoint')}, not from {checkpoint_id(checkpoint)}")
        if meta.get("img_size") != img_size:
            raise DataError(f"{path}: made at {meta.get('img_size')} px; the explorer shows {img_size} px")
        if meta.get("pool") not in POOLS:
            raise DataError(f"{path}: pooling {meta.get('pool')!r}; an index needs one vector per image "
                            f"({' or '.join(POOLS)})")
        names = path.with_suffix(".txt").read_text().splitlines()
        where = {n: i for i, n in enumerate(source.names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise DataError(f"{path}: {len(missing)} of its images are not in {source.root} (e.g. {missing[0]})")
        features = torch.from_numpy(np.load(path))
        if features.ndim != 2 or len(features) != len(names):
            raise DataError(f"{path}: {tuple(features.shape)} features for {len(names)} names")
        return cls([where[n] for n in names], names, features, meta)

    def nearest(self, query: torch.Tensor, k: int = 8, exclude: Optional[int] = None) -> List[dict]:
        """The ``k`` images most similar (cosine) to one feature vector; ``exclude``: a source index to leave out
        (the query image itself)."""
        scores = self.features @ F.normalize(query.float().flatten(), dim=0)
        order = torch.argsort(scores, descending=True).tolist()
        out = [{"index": self.indices[j], "name": self.names[j], "similarity": float(scores[j])}
               for j in order if self.indices[j] != exclude]
        return out[:k]


def grid_of(encoder, images: torch.Tensor):
    return images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size

