"""The one checkpoint reader: mimkit's own, the official MAE release, Hugging Face ViTMAE and timm.

Reading (:func:`load`, :func:`load_encoder`, :func:`load_mae`) takes any of

* a mimkit checkpoint (``format: "mimkit"``, written by ``engine.fit``) or a run directory (its newest one);
* an official MAE ``.pth``, ``{"model": state_dict}``: a pretraining ``MaskedAutoencoderViT`` (with decoder), the
  encoder-only pretrained release, a fine-tuned ViT (``fc_norm``/``head``, global pooling) or a linear-probe ViT
  (``head.0`` BatchNorm + ``head.1``; folded into one exact linear head);
* a Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` directory (``config.json`` + safetensors or ``.bin``,
  sharded or not), from a local path;
* timm ``VisionTransformer`` weights: a state dict in ``.safetensors`` / ``.pth`` / ``.bin``, or a timm
  ``local-dir`` folder (``config.json`` with ``architecture`` + weights).

Each source is first rewritten into one state dict under mimkit's MAE names (the official names, with the
encoder under ``encoder.``), together with what its files say about the architecture; the rest is inferred
from tensor shapes (patch size, width, depth, image size, MLP ratio, decoder shape). Attention heads are not
in the weights: files that record them are believed, otherwise the standard count for the width is assumed
(:data:`STANDARD_HEADS`; decoders: 32 channels per head, MAE's 512-d / 16 heads). Tensors that fit nowhere are
reported, never silently dropped; a tensor of the wrong shape is a :class:`CheckpointError` naming it and both
shapes.

The format-specific names live in :mod:`.hf`, :mod:`.official` and :mod:`.timm`; writing is :mod:`.export`.
"""
import argparse
import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..models import MaskedAutoencoder, MaskedViT, adapt_patch_projection
from ..models.pos_embed import sincos_2d
from ..models.presets import DECODERS
from ..objectives import OBJECTIVES  # a model exactly as trained needs the objective that wrote it (layers: below)
from ..pixels import IMAGENET_MEAN, IMAGENET_STD, PixelSpec, match_bands
from .hf import from_hf, is_hf
from ..checkpoint_files import check_state_dict, load_checkpoint, load_latest
from .official import fold_linprobe_head, official_hints
from .source import Source
from .timm import timm_hints
from .hub import resolve_path

log = logging.getLogger("mimkit")

FORMATS = ("mimkit", "mae", "hf", "timm")
# attention heads by width (ViT-Ti/S/B/L/H and mimkit's micro preset); other widths: 64 channels per head
STANDARD_HEADS = {96: 3, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEAD_DIM = 32  # MAE's decoder: 512 wide with 16 heads
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "open_clip_model.safetensors")


# reading files ----------------------------------------------------------------------------------------------
def read(path) -> Source:
    """Any supported checkpoint (see the module docstring) rewritten into mimkit MAE names; a mimkit checkpoint
    also keeps its kind, stored arch and own state dict (``Source.kind``, ``.arch``, ``.raw``); ``hf://ORG/NAME[@REV]``
    is read from its copy in the Hugging Face cache (:mod:`.hub`)."""
    p = Path(resolve_path(path)).expanduser()
    if p.is_dir():
        if (p / "checkpoints").is_dir():
            state = load_latest(p)
            if state is None:
                raise CheckpointError(f"no checkpoint found in run directory {p} (looked in {p / 'checkpoints'})")
            return from_object(state, state.get("_path", str(p)))
        cfg_file = p / "config.json"
        if cfg_file.is_file():
            cfg = read_json(cfg_file)
            tensors, meta = read_weights(weights_in(p))
            if "model_type" in cfg:
                return from_hf(tensors, cfg, str(p))
            if "architecture" in cfg:
                return from_flat(tensors, str(p), "timm", arch=mimkit_arch(meta), hints=timm_hints(cfg))
        raise CheckpointError(f"{p} is a directory but not a checkpoint: expected a mimkit run (checkpoints/), a "
                              f"Hugging Face ViTMAE directory or a timm folder (config.json + weights)")
    if not p.is_file():
        raise CheckpointError(f"no such checkpoint: {p}")
    if p.name.endswith(".index.json"):
        tensors, meta = read_weights(p)
    elif p.suffix == ".safetensors":
        tensors, meta = read_weights(p)
    else:
        return from_object(torch_load(p), str(p))
    if is_hf(tensors):
        cfg_file = p.parent / "config.json"
        return from_hf(tensors, read_json(cfg_file) if cfg_file.is_file() else None, str(p))
    return from_flat(tensors, str(p), meta.get("mimkit_format", "timm"), arch=mimkit_arch(meta))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def weights_in(d: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(d.glob(pattern))
        if found:
            return found[0]
    raise CheckpointError(f"{d}: config.json but no weights (looked for {', '.join(_WEIGHT_FILES[:3])}, *.safetensors, "
                          f"*.bin, *.pth)")


def read_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Tensors and safetensors metadata of a weights file (or of every shard an index names)."""
    if path.name.endswith(".index.json"):
        files = sorted(set(read_json(path).get("weight_map", {}).values()))
        if not files:
            raise CheckpointError(f"{path}: an index naming no shards")
        tensors, meta = {}, {}
        for f in files:
            t, m = read_weights(path.parent / f)
            tensors.update(t)
            meta.update(m)
        return tensors, meta
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path), device="cpu"), meta
        except FileNotFoundError:
            raise CheckpointError(f"no such checkpoint: {path}") from None
        except Exception as e:  # safetensors raises its own SafetensorError for damaged files
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot read {path}: {why}") from None
    obj = torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return obj, {}


def torch_load(path: Path):
    # official MAE training checkpoints carry their argparse options; a Namespace only holds plain values
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint(path)


def mimkit_arch(meta: dict) -> Optional[dict]:
    text = meta.get("mimkit_arch")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None



def as_trained(arch: dict, version: int, path: str) -> dict:
    """A checkpoint's arch with the input spec its model was trained on. Before version 2 the loader's 8-bit RGB
    path normalised with ImageNet's statistics whatever ``--mean/--std`` the run recorded; such a spec is read
    back as ImageNet's (warned), so old runs are evaluated on the input they were trained on."""
    nested = isinstance(arch.get("encoder"), dict)
    pixels = (arch["encoder"] if nested else arch).get("pixels")
    if version >= 2 or not pixels:
        return arch
    spec = PixelSpec.from_dict(pixels, 3)
    if not (spec.in_chans == 3 and spec.dtype == "uint8" and spec.low is None) or \
            (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD):
        return arch
    log.warning("%s: written before checkpoint version 2, whose 8-bit RGB input was normalised with ImageNet's "
                "statistics whatever the run recorded (mean %s, std %s): read as trained, with ImageNet's", path,
                list(spec.mean), list(spec.std))
    fixed = dict(pixels, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return dict(arch, encoder=dict(arch["encoder"], pixels=fixed)) if nested else dict(arch, pixels=fixed)


def from_object(obj, path: str) -> Source:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict or a checkpoint), "
                              f"got {type(obj).__name__}")
    if obj.get("format") == "mimkit":
        if not isinstance(obj.get("model"), dict):
            raise CheckpointError(f"{path}: a mimkit checkpoint without its 'model' entry")
        arch = as_trained(obj.get("arch") or {}, obj.get("version", 1), path)
        try:
            src = from_flat(obj["model"], path, "mimkit", arch=arch)
        except CheckpointError:  # an objective whose encoder is not a ViT (iGPT): only its own build reads it
            src = Source(path, "mimkit")
        src.kind, src.raw, src.arch = obj.get("kind"), obj["model"], arch
        return src
    hints = official_hints(obj)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            inner, fmt = obj[key], "mae"
            break
    else:
        inner, fmt = obj, "timm"
    arch = obj.get("mimkit_arch") if isinstance(obj.get("mimkit_arch"), dict) else None
    return from_flat(inner, path, fmt, arch=arch, hints=hints)


def from_flat(sd: dict, path: str, fmt: str, arch: Optional[dict] = None, hints: Optional[dict] = None) -> Source:
    """A state dict in timm / official MAE / mimkit names, under any prefix (``module.``, ``model.``)."""
    tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if is_hf(tensors):
        return from_hf(tensors, None, path)
    ends = "patch_embed.proj.weight"
    prefixes = [k[:-len(ends)] for k in tensors if k.endswith(ends)]
    if not prefixes:
        first = ", ".join(list(tensors)[:4]) or "none"
        raise CheckpointError(f"{path}: no ViT encoder found (no '...{ends}' tensor; its tensors begin {first})")
    enc = min(prefixes, key=lambda c: (not c.endswith("encoder."), len(c)))  # objectives keep theirs in 'encoder.'
    dec = enc[:-len("encoder.")] if enc.endswith("encoder.") else enc
    src = Source(path, fmt)
    for k, v in tensors.items():
        rest = k[len(dec):] if k.startswith(dec) else None
        if rest is not None and (rest == "mask_token" or rest.startswith("decoder_")):
            src.add(rest, v, k)
        elif k.startswith(enc):
            src.add("encoder." + k[len(enc):], v, k)
        else:
            src.unused.append(k)
    fold_linprobe_head(src)
    src.hints.update(hints or {})
    if arch:
        _hints_from_arch(src, arch)
    return src


def _hints_from_arch(src: Source, arch: dict):
    enc = arch.get("encoder") if isinstance(arch.get("encoder"), dict) else arch
    if "num_heads" in enc:
        src.hints["num_heads"] = int(enc["num_heads"])
    if isinstance(enc.get("pixels"), dict):
        src.hints["pixels"] = enc["pixels"]
    for k in ("decoder_heads", "mask_ratio", "norm_pix_loss", "pred_dim"):
        if k in arch:
            src.hints[k] = arch[k]


# architecture from the tensors ----------------------------------------------------------------------------
def _count_blocks(tensors, prefix: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found and found != set(range(len(found))):
        missing = min(set(range(max(found) + 1)) - found)
        raise CheckpointError(f"block {prefix}{missing} is missing (blocks 0..{max(found)} expected)")
    return len(found)


def _need(src: Source, name: str) -> torch.Tensor:
    if name not in src.tensors:
        what = "an MAE decoder" if "decoder" in name else "a ViT"
        raise src.error(f"tensor {name!r} is missing, so this is not {what} as mimkit knows it")
    return src.tensors[name]


def _encoder_arch(src: Source) -> Tuple[dict, dict]:
    """(arch, extra): MaskedViT's arch dict, plus num_classes / global_pool for a classification head."""
    t = src.tensors
    w = _need(src, "encoder.patch_embed.proj.weight")
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise src.error(f"tensor {src.where('encoder.patch_embed.proj.weight')!r} has shape {tuple(w.shape)}; "
                        f"expected (width, channels, patch, patch)")
    dim, chans, p = w.shape[0], w.shape[1], w.shape[-1]
    _need(src, "encoder.cls_token")
    pos = _need(src, "encoder.pos_embed")
    n = pos.shape[1] - 1 if pos.ndim == 3 else -1
    grid = math.isqrt(n) if n > 0 else 0
    if pos.ndim != 3 or grid * grid != n or pos.shape[-1] != dim:
        raise src.error(f"tensor {src.where('encoder.pos_embed')!r} has shape {tuple(pos.shape)}; expected (1, 1 + a "
                        f"square number of patches, {dim}) to match {src.where('encoder.patch_embed.proj.weight')!r} "
                        f"{tuple(w.shape)}")
    try:
        depth = _count_blocks(t, "encoder.blocks.")
    except CheckpointError as e:
        raise src.error(str(e)) from None
    if depth == 0:
        raise src.error("no transformer blocks ('blocks.N.*') found")
    fc1 = t.get("encoder.blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    heads = src.hints.get("num_heads")
    if not heads:
        heads = STANDARD_HEADS.get(dim) or max(1, dim // 64)
        src.notes.append(f"attention heads are not stored in the weights: {heads}, the standard for width {dim}, "
                         f"assumed (pass num_heads= to override)")
    if dim % heads:
        raise src.error(f"width {dim} is not divisible by {heads} attention heads")
    arch = dict(img_size=grid * p, patch_size=p, embed_dim=dim, depth=depth, num_heads=int(heads),
                mlp_ratio=float(mlp_ratio))
    if chans != 3:  # as MaskedViT records it
        arch["in_chans"] = int(chans)
    if src.hints.get("pixels"):  # the input spec the file carries (mimkit_arch, HF's config.json)
        try:
            stored = PixelSpec.from_dict(src.hints["pixels"], chans)
            if stored.in_chans != chans:
                raise ValueError(f"{stored.in_chans} channel(s) for weights of {chans}")
        except (TypeError, ValueError) as e:
            raise src.error(f"its stored pixel spec is not one ({e})") from None
        arch["pixels"] = dict(src.hints["pixels"])
    extra = {}
    if "encoder.head.weight" in t:
        extra["num_classes"] = t["encoder.head.weight"].shape[0]
    if "encoder.fc_norm.weight" in t:  # the fine-tuning recipe's global pool: fc_norm after averaging, no final norm
        extra["global_pool"] = "avg"
    return arch, extra


def _has_decoder(src: Source) -> bool:
    return "decoder_embed.weight" in src.tensors


def _decoder_arch(src: Source, enc: dict) -> dict:
    t = src.tensors
    w = t["decoder_embed.weight"]
    dim = w.shape[0]
    if w.ndim != 2 or w.shape[1] != enc["embed_dim"]:
        raise src.error(f"tensor {src.where('decoder_embed.weight')!r} has shape {tuple(w.shape)}; the encoder is "
                        f"{enc['embed_dim']} wide, so ({dim}, {enc['embed_dim']}) was expected")
    try:
        depth = _count_blocks(t, "decoder_blocks.")
    except CheckpointError as e:
        raise src.error(str(e)) from None
    pred = _need(src, "decoder_pred.weight")
    extra = {}
    if src.hints.get("pred_dim") and pred.shape[0] == src.hints["pred_dim"]:  # a non-pixel target (Table 1)
        extra["pred_dim"] = int(pred.shape[0])
    elif pred.shape[0] != enc["patch_size"] ** 2 * enc.get("in_chans", 3):
        raise src.error(f"tensor {src.where('decoder_pred.weight')!r} has shape {tuple(pred.shape)}: it predicts "
                        f"{pred.shape[0]} values per patch, patch size {enc['patch_size']} and "
                        f"{enc.get('in_chans', 3)} channel(s) need {enc['patch_size'] ** 2 * enc.get('in_chans', 3)}")
    fc1 = t.get("decoder_blocks.0.mlp.fc1.weight")
    heads = src.hints.get("decoder_heads") or max(1, dim // DECODER_HEAD_DIM)
    if dim % heads:
        raise src.error(f"decoder width {dim} is not divisible by {heads} attention heads")
    return dict(decoder_dim=dim, decoder_depth=depth, decoder_heads=int(heads),
                mlp_ratio=float(fc1.shape[0] / dim) if fc1 is not None else 4.0, **extra)


# loading into a model -----------------------------------------------------------------------------------------
def _is_sincos(t: torch.Tensor) -> bool:
    n = t.shape[1] - 1
    g = math.isqrt(n)
    return g * g == n and t.shape[-1] % 4 == 0 and torch.allclose(t.float(), sincos_2d(t.shape[-1], g, g), atol=1e-4)


def _assign(module: nn.Module, src: Source, prefix: str = "", optional: Tuple[str, ...] = (),
            refit: bool = False) -> List[str]:
    """Copy ``src`` tensors named ``prefix + key`` into ``module``; returns the module's keys left as they were.

    Depth or shape mismatches raise, naming the tensor and both shapes; missing tensors raise unless their
    name starts with one of ``optional``. With ``refit`` (a model the caller chose), a fixed sin-cos position
    table of another grid size is replaced by the model's own (exact) and a learned one is resampled.
    """
    own = module.state_dict()
    for blocks, what in (("encoder.blocks.", "encoder"), ("decoder_blocks.", "decoder")):
        if not blocks.startswith(prefix):
            continue
        try:
            mine, theirs = _count_blocks(own, blocks[len(prefix):]), _count_blocks(src.tensors, blocks)
        except CheckpointError as e:
            raise src.error(str(e)) from None
        if mine and theirs and mine != theirs:
            last = src.where(f"{blocks}{theirs - 1}.norm1.weight")
            raise src.error(f"the checkpoint's {what} has {theirs} blocks ({last!r} is the last) but the model's "
                            f"has {mine}")
    use, missing = {}, []
    spec = getattr(module, "pixels", None) or getattr(getattr(module, "encoder", None), "pixels", None)
    for key, want in own.items():
        name = prefix + key
        if name not in src.tensors:
            missing.append(name)
            continue
        v = src.tensors[name]
        if v.dtype != want.dtype and not (v.dtype.is_floating_point and want.dtype.is_floating_point):
            raise src.error(f"tensor {src.where(name)!r} has dtype {v.dtype}, expected {want.dtype}")
        if refit and name.endswith("patch_embed.proj.weight") and spec is not None:
            v = _fit_bands(name, v, want, src, spec)
        if tuple(v.shape) != tuple(want.shape):
            v = _refit_positions(name, v, want, src, refit)
            if v is None:  # the model's own freshly initialised tensor stays
                continue
        use[key] = v
    hard = [m for m in missing if not m.startswith(optional)]
    if hard:
        more = f" (and {len(hard) - 1} more)" if len(hard) > 1 else ""
        raise src.error(f"tensor {hard[0]!r} is missing{more}; the checkpoint cannot fill this model")
    module.load_state_dict(use, strict=False)
    src.used |= {prefix + k for k in use}
    return missing


def _fit_bands(name: str, v: torch.Tensor, want: torch.Tensor, src: Source, spec: PixelSpec) -> torch.Tensor:
    """A patch projection made to meet the model's bands (``spec``, the model's pixel spec), before any shape rule:
    by name when the checkpoint and the model both name their bands (reordered; another band set is an error
    naming both lists), and RGB weights by role when the model gives red, green and blue
    (:func:`mimkit.models.adapt_patch_projection`), each band's source logged. Anything else passes as it is
    (timm's position rule follows for another channel count, with a warning saying how to give roles)."""
    if v.ndim != 4 or want.ndim != 4 or v.shape[0] != want.shape[0] or v.shape[2:] != want.shape[2:]:
        return v  # another width or patch size: the shape error names it
    try:
        theirs = PixelSpec.from_dict(src.hints.get("pixels"), v.shape[1])
    except (TypeError, ValueError):
        theirs = PixelSpec.from_dict(None, v.shape[1])
    what = src.where(name)
    if theirs.band_names and spec.band_names:
        try:
            order = match_bands(spec.band_names, theirs.band_names, ("the model's", "the checkpoint's"))
        except ValueError as e:
            raise src.error(str(e)) from None
        if order:
            src.notes.append(f"{what}: bands by name, the checkpoint's {','.join(theirs.band_names)} reordered to "
                             f"the model's {','.join(spec.band_names)}")
            return v[:, list(order)]
        return v
    source_rgb = theirs.rgb or (0, 1, 2)
    is_rgb = v.shape[1] == 3 and (theirs.rgb or not theirs.band_names)  # named non-RGB bands have no colour roles
    if is_rgb and spec.rgb and (want.shape[1] != 3 or tuple(spec.rgb) != tuple(source_rgb)):
        c, scale = want.shape[1], 3 / want.shape[1]
        roles = dict(zip(spec.rgb, ("red", "green", "blue")))
        lines = [f"{spec.band(i)} <- {roles[i] + ' kernel' if i in roles else 'mean of the red, green, blue kernels'}"
                 for i in range(c)]
        src.notes.append(f"{what}: RGB weights by role, each band's kernel x {scale:.4g} (3/{c}, so the kernels sum "
                         f"as RGB's did): " + "; ".join(lines))
        return adapt_patch_projection(v, c, rgb=spec.rgb, source_rgb=source_rgb)
    if is_rgb and want.shape[1] > 3:
        log.warning("%s: RGB weights for %d bands by position (band i takes RGB kernel i mod 3); give the red, "
                    "green and blue bands with --bands (e.g. --bands B04,B03,B02 or 3,2,1) to start each from its "
                    "own colour's kernel", src.path, want.shape[1])
    return v


def _refit_positions(name: str, v: torch.Tensor, want: torch.Tensor, src: Source, refit: bool
                     ) -> Optional[torch.Tensor]:
    """A tensor of another shape made to fit a model the caller chose (``refit``): position tables of another grid,
    an RGB patch projection for another channel count (timm's rule), and then the MAE decoder's pixel head, which
    stays freshly initialised (None). Anything else is a CheckpointError naming both shapes."""
    what = src.where(name)
    if refit and name.endswith("patch_embed.proj.weight") and v.ndim == 4 and want.ndim == 4 and \
            v.shape[0] == want.shape[0] and v.shape[2:] == want.shape[2:] and v.shape[1] != want.shape[1]:
        if v.shape[1] != 3:
            raise src.error(f"tensor {what!r} takes {v.shape[1]} input channels and the model {want.shape[1]}: only "
                            f"RGB (3-channel) weights adapt to another channel count")
        src.notes.append(f"{what}: the RGB patch projection adapted to {want.shape[1]} channel(s) as timm adapts its "
                         f"first convolutions (adapt_input_conv: " + ("the sum over R, G, B)" if want.shape[1] == 1
                         else f"R, G, B repeated and scaled by 3/{want.shape[1]})"))
        return adapt_patch_projection(v, want.shape[1]).to(v.dtype)
    proj = src.tensors.get("encoder.patch_embed.proj.weight")
    rgb_file = proj is not None and proj.ndim == 4 and proj.shape[1] == 3
    if refit and rgb_file and name in ("decoder_pred.weight", "decoder_pred.bias") and v.shape[1:] == want.shape[1:]:
        src.notes.append(f"{what}: predicts RGB pixels; the model's pixel head for its channels starts freshly "
                         f"initialised")
        return None
    if refit and name in ("encoder.pos_embed", "decoder_pos_embed", "pos_embed") and v.ndim == 3 and \
            v.shape[0] == want.shape[0] and v.shape[2] == want.shape[2]:
        old, new = math.isqrt(v.shape[1] - 1), math.isqrt(want.shape[1] - 1)
        if _is_sincos(v):
            src.notes.append(f"{what}: the fixed sin-cos table for {old}x{old} patches was rebuilt for {new}x{new}")
            return want.clone()
        from timm.layers import resample_abs_pos_embed
        src.notes.append(f"{what}: learned positions resampled from {old}x{old} to {new}x{new} patches")
        resampled = resample_abs_pos_embed(v.float(), new_size=[new, new], old_size=[old, old], num_prefix_tokens=1)
        return resampled.to(v.dtype)
    hint = ""
    if name.endswith("patch_embed.proj.weight") and v.ndim == 4 and want.ndim == 4:
        hint = f" (patch size {v.shape[-1]} vs {want.shape[-1]}, width {v.shape[0]} vs {want.shape[0]})"
    raise src.error(f"tensor {what!r} has shape {tuple(v.shape)} but the model's {name!r} has shape "
                    f"{tuple(want.shape)}{hint}")


def _info(src: Source, model: nn.Module, missing: List[str], decoder_initialised: bool) -> dict:
    unused = list(src.unused) + [src.where(k) for k in src.tensors if k not in src.used]
    return {"path": src.path, "format": src.format, "kind": src.kind, "arch": dict(getattr(model, "arch", {})),
            "unused": unused, "missing": missing, "decoder_initialised": decoder_initialised, "notes": list(src.notes)}


def _report(info: dict, quiet_prefixes: Tuple[str, ...] = ()):
    for note in info["notes"]:
        log.info("%s: %s", info["path"], note)
    loud = [k for k in info["unused"] if not any(q in k for q in quiet_prefixes)]
    if loud:
        shown = ", ".join(loud[:8]) + (f" and {len(loud) - 8} more" if len(loud) > 8 else "")
        log.warning("%s: %d tensor(s) not used: %s", info["path"], len(loud), shown)


def _objective(src: Source):
    """A mimkit checkpoint's objective rebuilt from its stored arch, every tensor loaded (None: kind unknown)."""
    if src.raw is None or src.kind not in OBJECTIVES:
        return None
    try:
        obj = OBJECTIVES[src.kind].build(src.arch)
    except (TypeError, KeyError, ValueError) as e:
        raise src.error(f"cannot rebuild the {src.kind!r} model from its stored arch ({e})") from None
    check_state_dict(obj, src.raw, src.path)
    obj.load_state_dict(src.raw)
    src.notes.append(f"the {src.kind!r} objective rebuilt from its stored arch")
    return obj.eval()


def _encoder_from(src: Source, model: Optional[MaskedViT] = None, num_heads: Optional[int] = None):
    obj = _objective(src) if model is None else None
    if obj is not None:  # exactly as trained (any encoder class the objective uses)
        info = _info(src, obj.encoder, [], False)
        info["unused"] = []
        obj.encoder.checkpoint_info = info
        return obj.encoder, info
    if num_heads:
        src.hints["num_heads"] = num_heads
    refit = model is not None
    if model is None:
        arch, extra = _encoder_arch(src)
        model = MaskedViT(**arch, **extra)
    missing = _assign(model, src, "encoder.", refit=refit)
    model.eval()
    info = _info(src, model, missing, False)
    _report(info, quiet_prefixes=("decoder", "mask_token"))
    model.checkpoint_info = info
    return model, info


def _mae_from(src: Source, allow_missing_decoder: bool = True, model: Optional[MaskedAutoencoder] = None,
              decoder: Optional[dict] = None, mask_ratio: Optional[float] = None,
              norm_pix_loss: Optional[bool] = None, num_heads: Optional[int] = None):
    obj = _objective(src) if model is None and src.kind == "mae" else None
    if obj is not None:  # exactly as trained (non-pixel targets too); objective-level extras are not the MAE's
        mae = obj.model
        info = _info(src, mae, [], False)
        info["unused"] = [k for k in src.raw if not k.startswith("model.")]
        if mask_ratio is not None:
            mae.mask_ratio = mae.arch["mask_ratio"] = float(mask_ratio)
        if norm_pix_loss is not None:
            mae.norm_pix_loss = mae.arch["norm_pix_loss"] = bool(norm_pix_loss)
        mae.checkpoint_info = info
        return mae, info
    if num_heads:
        src.hints["num_heads"] = num_heads
    has_decoder = _has_decoder(src)
    if not has_decoder:
        if not allow_missing_decoder:
            raise src.error("it holds no MAE decoder (an encoder-only checkpoint); this needs the full MAE")
        for k in [k for k in src.tensors if k == "mask_token" or k.startswith("decoder_")]:
            src.unused.append(src.where(k))  # decoder pieces without a decoder: reported, not used
            del src.tensors[k]
    refit = model is not None
    if model is None:
        enc_arch, extra = _encoder_arch(src)
        if has_decoder:
            dec = _decoder_arch(src, enc_arch)
        else:
            dec = dict(DECODERS["small32" if enc_arch["img_size"] == 32 else "default"], mlp_ratio=4.0)
            dec.update(decoder or {})
        ratio = mask_ratio if mask_ratio is not None else src.hints.get("mask_ratio", 0.75)
        npl = norm_pix_loss if norm_pix_loss is not None else src.hints.get("norm_pix_loss", True)
        model = MaskedAutoencoder(MaskedViT(**enc_arch, **extra), mask_ratio=float(ratio), norm_pix_loss=bool(npl),
                                  **dec)
    else:
        if mask_ratio is not None:
            model.mask_ratio = model.arch["mask_ratio"] = float(mask_ratio)
        if norm_pix_loss is not None:
            model.norm_pix_loss = model.arch["norm_pix_loss"] = bool(norm_pix_loss)
    missing = _assign(model, src, "", optional=() if has_decoder else ("mask_token", "decoder_"), refit=refit)
    model.eval()
    if not has_decoder:
        src.notes.append("no decoder in the checkpoint: the decoder is freshly initialised")
    info = _info(src, model, missing, not has_decoder)
    _report(info)
    model.checkpoint_info = info
    return model, info


def _source(path_or_source) -> Source:
    return path_or_source if isinstance(path_or_source, Source) else read(path_or_source)


def load_encoder(path, *, model: Optional[MaskedViT] = None, num_heads: Optional[int] = None) -> MaskedViT:
    """The ViT encoder of any supported checkpoint (see the module docstring), as a :class:`MaskedViT`.

    A classification head in the file (fine-tuned or linear-probe releases) comes along (``num_classes``,
    global pooling when it has ``fc_norm``). ``model``: load into this encoder instead (shapes checked).
    ``num_heads``: the attention heads, for widths whose standard count is not right.
    What was loaded is in ``encoder.checkpoint_info`` (the dict :func:`load_mae` returns). A mimkit checkpoint
    of any objective is rebuilt from its stored arch, so its encoder is exactly the trained one (iGPT's too).
    Models come back in eval mode. ``path`` may also be what :func:`read` returned (to see its kind and arch first).
    """
    return _encoder_from(_source(path), model, num_heads)[0]


def load_mae(path, allow_missing_decoder: bool = True, *, model: Optional[MaskedAutoencoder] = None,
             decoder: Optional[dict] = None, mask_ratio: Optional[float] = None, norm_pix_loss: Optional[bool] = None,
             num_heads: Optional[int] = None) -> Tuple[MaskedAutoencoder, dict]:
    """A :class:`MaskedAutoencoder` from any supported checkpoint, and a dict describing the load.

    A checkpoint without a decoder (the encoder-only MAE release, timm or fine-tuned weights) gets a freshly
    initialised one when ``allow_missing_decoder`` (shape ``decoder``: dict of decoder_dim / decoder_depth /
    decoder_heads, default the preset's for the image size), else it is a :class:`CheckpointError`.
    ``mask_ratio`` / ``norm_pix_loss`` override what the checkpoint records (official ``.pth`` releases do not
    record them: 0.75 and True, the released models' recipe, are assumed). ``model``: load into this model
    instead of building one (for ``pretrain --init``: a depth, width or patch size mismatch is an error naming
    the tensor and both shapes; a fixed sin-cos position table of another size is rebuilt for the model's).

    The dict: path, format (mimkit / mae / hf / timm), kind, arch, unused (names in the file not used), missing
    (model tensors not from the file), decoder_initialised (bool), notes.
    """
    return _mae_from(_source(path), allow_missing_decoder, model, decoder, mask_ratio, norm_pix_loss, num_heads)


def load(path, *, num_heads: Optional[int] = None, **mae_options) -> nn.Module:
    """The model in any supported checkpoint: a :class:`MaskedAutoencoder` when it has a decoder, else the
    :class:`MaskedViT` encoder (with its classification head, if any). ``model.checkpoint_info`` says what was
    loaded. ``mae_options`` (mask_ratio, norm_pix_loss) go to :func:`load_mae` when there is a decoder."""
    src = _source(path)
    if _has_decoder(src):
        return _mae_from(src, False, num_heads=num_heads, **mae_options)[0]
    return _encoder_from(src, num_heads=num_heads)[0]
