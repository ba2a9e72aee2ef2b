"""Hugging Face ViTMAE (``ViTMAEForPreTraining`` / ``ViTMAEModel``) names mapped both ways: its directory
rewritten into mimkit MAE names on the way in, a directory ``from_pretrained`` loads on the way out."""
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..files import write_json
from ..models import MaskedAutoencoder, MaskedViT
from ..models.presets import DECODERS
from ..checkpoint_files import save_safetensors
from .source import Source

log = logging.getLogger("mimkit")

_HF_FIXED = {  # HF (without the 'vit.' prefix of ViTMAEForPreTraining) -> mimkit
    "embeddings.cls_token": "encoder.cls_token",
    "embeddings.position_embeddings": "encoder.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
    "layernorm.weight": "encoder.norm.weight",
    "layernorm.bias": "encoder.norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
# inside a layer: the on-disk names (all transformers versions write these), then transformers 5's module names
_HF_LAYER = [
    ("attention.attention.query.", 0), ("attention.attention.key.", 1), ("attention.attention.value.", 2),
    ("attention.q_proj.", 0), ("attention.k_proj.", 1), ("attention.v_proj.", 2),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
]
_HF_ENC_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
# transformers 5.x save_pretrained writes decoder layers as 'decoder_encoder.layer.N' (a renaming slip): read it too
_HF_DEC_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$")
_QKV = ("query", "key", "value")


def is_hf(tensors: dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in tensors)


def from_hf(tensors: dict, cfg: Optional[dict], path: str) -> Source:
    src = Source(path, "hf")
    parts: Dict[Tuple[str, str], Dict[int, Tuple[torch.Tensor, str]]] = {}
    for key, v in tensors.items():
        k = key[len("vit."):] if key.startswith("vit.") else key
        if k in _HF_FIXED:
            src.add(_HF_FIXED[k], v, key)
            continue
        m = _HF_ENC_LAYER.match(k) or _HF_DEC_LAYER.match(k)
        block = None
        if m:
            block = (f"encoder.blocks.{m.group(1)}." if k.startswith(("encoder", "layers"))
                     else f"decoder_blocks.{m.group(1)}.")
            for hf, ours in _HF_LAYER:
                if m.group(2).startswith(hf):
                    leaf = m.group(2)[len(hf):]
                    if isinstance(ours, int):
                        parts.setdefault((block + "attn.qkv.", leaf), {})[ours] = (v, key)
                    else:
                        src.add(block + ours + leaf, v, key)
                    break
            else:
                block = None
        if block is None:
            src.unused.append(key)
    for (block, leaf), got in parts.items():
        if len(got) == 3:
            origin = got[0][1].replace("query", "{query,key,value}")
            src.add(block + leaf, torch.cat([got[i][0] for i in range(3)], 0), origin)
        else:
            src.unused.extend(t[1] for t in got.values())
    if cfg:
        _hints_from_hf_config(src, cfg)
    return src


def _hints_from_hf_config(src: Source, cfg: dict):
    if cfg.get("model_type") not in ("vit_mae", "vit"):
        raise src.error(f"config.json has model_type {cfg.get('model_type')!r}; expected 'vit_mae' (ViTMAE)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise src.error(f"config.json hidden_act {cfg['hidden_act']!r}: mimkit's ViT uses exact GELU ('gelu')")
    if cfg.get("qkv_bias", True) is False:
        raise src.error("config.json qkv_bias is false: mimkit's ViT (as MAE's) has query/key/value biases")
    h = src.hints
    h["num_heads"] = cfg.get("num_attention_heads", 12)
    if isinstance(cfg.get("mimkit_pixels"), dict):  # the input spec mimkit's export records
        h["pixels"] = cfg["mimkit_pixels"]
    h["decoder_heads"] = cfg.get("decoder_num_attention_heads", 16)
    for k in ("mask_ratio", "norm_pix_loss"):
        if k in cfg:
            h[k] = cfg[k]
    eps = cfg.get("layer_norm_eps", 1e-12)
    if eps != 1e-6:
        src.notes.append(f"config.json layer_norm_eps {eps:g}: mimkit uses MAE's 1e-6 (a negligible difference)")


def to_hf(named: Dict[str, torch.Tensor], prefix: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """mimkit MAE names -> the on-disk names of transformers' ViTMAE (``prefix`` 'vit.' for ViTMAEForPreTraining)."""
    inverse = {v: k for k, v in _HF_FIXED.items()}
    sub = {"attn.proj.": "attention.output.dense.", "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense.",
           "norm1.": "layernorm_before.", "norm2.": "layernorm_after."}
    out, skipped = {}, []
    for name, t in named.items():
        if name in inverse:
            key = inverse[name]
            out[key if key.startswith("decoder.") else prefix + key] = t
            continue
        m = re.match(r"^encoder\.blocks\.(\d+)\.(.+)$", name) or re.match(r"^decoder_blocks\.(\d+)\.(.+)$", name)
        if not m:
            skipped.append(name)
            continue
        layer = (f"{prefix}encoder.layer.{m.group(1)}." if name.startswith("encoder.")
                 else f"decoder.decoder_layers.{m.group(1)}.")
        rest = m.group(2)
        if rest.startswith("attn.qkv."):
            for part, chunk in zip(_QKV, t.chunk(3, 0)):
                out[f"{layer}attention.attention.{part}.{rest[len('attn.qkv.'):]}"] = chunk
            continue
        for ours, hf in sub.items():
            if rest.startswith(ours):
                out[layer + hf + rest[len(ours):]] = t
                break
        else:
            skipped.append(name)
    return out, skipped


def hf_config(mae: Optional[MaskedAutoencoder], enc: MaskedViT) -> dict:
    a = enc.arch
    dec = mae.arch if mae is not None else dict(DECODERS["default"], mlp_ratio=4.0, mask_ratio=0.75,
                                               norm_pix_loss=True)
    return {
        "architectures": ["ViTMAEForPreTraining" if mae is not None else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": a["embed_dim"], "num_hidden_layers": a["depth"], "num_attention_heads": a["num_heads"],
        "intermediate_size": int(a["embed_dim"] * a["mlp_ratio"]), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": 1e-6, "image_size": a["img_size"], "patch_size": a["patch_size"],
        "num_channels": enc.in_chans,
        "qkv_bias": True,
        "decoder_hidden_size": dec["decoder_dim"], "decoder_num_hidden_layers": dec["decoder_depth"],
        "decoder_num_attention_heads": dec["decoder_heads"],
        "decoder_intermediate_size": int(dec["decoder_dim"] * dec["mlp_ratio"]),
        "mask_ratio": dec["mask_ratio"], "norm_pix_loss": bool(dec["norm_pix_loss"]),
        **({"mimkit_pixels": dict(a["pixels"])} if a.get("pixels") else {}),  # how files map to the input
        **({"band_names": list(enc.pixels.band_names)} if enc.pixels.band_names else {}),  # config.band_names
    }


def write_hf(mae: Optional[MaskedAutoencoder], enc: MaskedViT, out: Path) -> Path:
    if enc.global_pool == "avg" or isinstance(enc.norm, nn.Identity):
        raise CheckpointError("a global-pool encoder (fc_norm, no final norm) has no Hugging Face ViTMAE equivalent; "
                              "export it --to timm or --to mae")
    if mae is not None and mae.arch.get("pred_dim"):
        raise CheckpointError(f"this MAE predicts {mae.arch['pred_dim']} non-pixel targets per patch; Hugging Face "
                              f"ViTMAE predicts pixels only (export --encoder-only, or --to mae)")
    named = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    if mae is not None:
        named.update({k: v for k, v in mae.state_dict().items() if not k.startswith("encoder.")})
    hf, skipped = to_hf(named, "vit." if mae is not None else "")
    if skipped:
        log.warning("ViTMAE has no place for %s: not exported", ", ".join(skipped))
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(mae, enc)
    save_safetensors(hf, out / "model.safetensors", {"mimkit_format": "hf"})
    write_json(out / "config.json", cfg)
    size = cfg["image_size"]
    pixels = enc.pixels
    write_json(out / "preprocessor_config.json", {  # 8-bit files: /255 as ViTImageProcessor does; other bit depths
        # map to [0, 1] by the range recorded in config.json's mimkit_pixels before the processor sees them
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": pixels.dtype == "uint8", "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(pixels.mean), "image_std": list(pixels.std)})
    return out
