"""The official MAE layout (``{"model": state_dict}``, the encoder under timm's names, the decoder unprefixed):
the linear-probe head folding on the way in, the release ``.pth`` on the way out."""
import argparse
import json
from pathlib import Path
from typing import Optional

from ..models import MaskedAutoencoder, MaskedViT
from ..checkpoint_files import save_checkpoint, save_safetensors, tensor_copies
from .source import Source
from .timm import encoder_arch

LINPROBE_BN_EPS = 1e-6  # the official linear probe's BatchNorm1d(affine=False, eps=1e-6)


def official_hints(obj: dict) -> dict:
    """What an official training checkpoint's argparse options say about the MAE (mask ratio, target)."""
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return {k: args[k] for k in ("mask_ratio", "norm_pix_loss") if k in args} if isinstance(args, dict) else {}


def fold_linprobe_head(src: Source):
    """The official linear probe's head is BatchNorm1d(affine=False) then Linear: fold them into one exact Linear."""
    t = src.tensors
    if "encoder.head.1.weight" not in t or "encoder.head.0.running_mean" not in t:
        return
    w, b = t.pop("encoder.head.1.weight"), t.pop("encoder.head.1.bias")
    mean, var = t.pop("encoder.head.0.running_mean"), t.pop("encoder.head.0.running_var")
    scale = (var.double() + LINPROBE_BN_EPS).rsqrt()
    if "encoder.head.0.weight" in t:  # an affine BatchNorm
        scale = scale * t.pop("encoder.head.0.weight").double()
        shift = t.pop("encoder.head.0.bias").double() - mean.double() * scale
    else:
        shift = -mean.double() * scale
    t.pop("encoder.head.0.num_batches_tracked", None)
    src.add("encoder.head.weight", (w.double() * scale).to(w.dtype), src.where("encoder.head.1.weight"))
    src.add("encoder.head.bias", (b.double() + w.double() @ shift).to(b.dtype), src.where("encoder.head.1.bias"))
    src.notes.append(f"linear-probe head: BatchNorm (eps {LINPROBE_BN_EPS:g}) folded into the linear head")


def write_official(mae: Optional[MaskedAutoencoder], enc: MaskedViT, out: Path) -> Path:
    sd = dict(enc.state_dict())  # official names are timm's for the encoder, unprefixed
    arch = mae.arch if mae is not None else encoder_arch(enc)
    if mae is not None:
        sd.update({k: v for k, v in mae.state_dict().items() if not k.startswith("encoder.")})
    if out.suffix == ".safetensors":
        return save_safetensors(sd, out, {"mimkit_format": "mae", "mimkit_arch": json.dumps(arch)})
    # the release layout {"model": state_dict}; 'mimkit_arch' (ignored by MAE's code) keeps the head count
    return save_checkpoint({"model": tensor_copies(sd), "mimkit_arch": arch}, out)
