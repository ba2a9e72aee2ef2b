"""timm ``VisionTransformer`` weights: what a timm ``local-dir`` folder's config says on the way in, the weights
file or folder ``timm.create_model`` loads on the way out. timm's names are mimkit's encoder names."""
import json
from pathlib import Path

from ..files import write_json
from ..models import MaskedViT
from ..checkpoint_files import save_checkpoint, save_safetensors, tensor_copies


def timm_hints(cfg: dict) -> dict:
    """What a timm folder's ``config.json`` says that the weights do not: the attention heads, and the pixel spec
    mimkit's export records at its top level (band names included)."""
    args = cfg.get("model_args") or {}
    hints = {"num_heads": args["num_heads"]} if "num_heads" in args else {}
    if isinstance(cfg.get("mimkit_pixels"), dict):
        hints["pixels"] = cfg["mimkit_pixels"]
    return hints


def encoder_arch(enc: MaskedViT) -> dict:
    """The encoder's arch with its classification head's shape (what an exported file records)."""
    return dict(enc.arch, num_classes=int(enc.num_classes), global_pool=enc.global_pool or "token")


def timm_name(arch: dict) -> str:
    """A timm entrypoint for this shape: the matching one when there is one, else the nearest by width (the
    config's model_args carry the exact shape)."""
    sizes = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
    size = sizes.get(arch["embed_dim"], "base")
    return f"vit_{size}_patch{14 if size == 'huge' else 16}_224"


def write_timm(enc: MaskedViT, out: Path) -> Path:
    arch = encoder_arch(enc)
    sd = enc.state_dict()
    meta = {"mimkit_format": "timm", "mimkit_arch": json.dumps(arch)}
    if out.suffix in (".pth", ".pt", ".bin"):
        return save_checkpoint(tensor_copies(sd), out)
    if out.suffix == ".safetensors":
        return save_safetensors(sd, out, meta)
    out.mkdir(parents=True, exist_ok=True)  # a timm folder: timm.create_model('local-dir:OUT', pretrained=True)
    size = arch["img_size"]
    save_safetensors(sd, out / "model.safetensors", meta)
    model_args = {k: arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                       "num_classes", "global_pool", "in_chans") if k in arch}
    pixels = enc.pixels  # the statistics the encoder was trained with
    # the band names and the whole spec at the top level: timm keeps unknown top-level keys out of its way, while
    # pretrained_cfg is a dataclass that refuses them (timm.create_model would fail)
    extra = {"mimkit_pixels": enc.arch["pixels"]} if "pixels" in enc.arch else {}
    if pixels.band_names:
        extra["band_names"] = list(pixels.band_names)
    write_json(out / "config.json", {
        "architecture": timm_name(arch), "num_classes": arch["num_classes"], "num_features": arch["embed_dim"],
        "global_pool": arch["global_pool"], "model_args": model_args,
        "pretrained_cfg": {"tag": "mimkit", "custom_load": False, "input_size": [enc.in_chans, size, size],
                           "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.875,
                           "crop_mode": "center", "mean": list(pixels.mean), "std": list(pixels.std),
                           "num_classes": arch["num_classes"], "pool_size": None, "first_conv": "patch_embed.proj",
                           "classifier": "head"}, **extra})
    return out
