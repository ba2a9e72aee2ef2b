"""The contestants ``mimkit bench`` times: mimkit's MAE (eager, compiled, gradient-checkpointed), Hugging Face
transformers' ``ViTMAEForPreTraining`` and lightly's MAE modules, each built at the same shapes (:data:`CONFIGS`)
with its optimizer. The peers are an optional extra (``pip install 'mimkit[bench]'``)."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import DECODERS, ENCODERS, create_mae
from ..precision import autocast
from ..engine import pretrain_optimizer


# what is timed -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSpec:
    model: str  # encoder preset (mimkit.models.ENCODERS)
    decoder: str  # decoder shape (mimkit.models.DECODERS)
    cpu_batch: int
    gpu_batch: int
    mask_ratio: float = 0.75

    @property
    def encoder(self) -> dict:
        return {"mlp_ratio": 4.0, **ENCODERS[self.model]}

    @property
    def dec(self) -> dict:
        return dict(DECODERS[self.decoder])

    def batch(self, device: torch.device) -> int:
        return self.gpu_batch if device.type == "cuda" else self.cpu_batch


CONFIGS: Dict[str, BenchSpec] = {
    # the CIFAR recipe: ViT-Tiny on 64 patches of 4 px, the light 32 px decoder (128-d, 2 blocks)
    "tiny32": BenchSpec("vit_tiny_patch4_32", "small32", cpu_batch=128, gpu_batch=128),
    # the paper's ViT-B/16 with its 512-d, 8-block decoder
    "base224": BenchSpec("vit_base_patch16_224", "default", cpu_batch=16, gpu_batch=256),
    # a few-layer model that keeps the benchmark's own test quick
    "micro32": BenchSpec("vit_micro_patch4_32", "small32", cpu_batch=8, gpu_batch=8),
}
PEERS = ("hf", "lightly")
PRECISIONS = ("fp32", "bf16")

# the MAE recipe's optimizer settings, for every contestant
LR, WEIGHT_DECAY, BETAS = 1.5e-4, 0.05, (0.9, 0.95)


def mimkit_optimizer(model: nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    """The optimizer of ``mimkit pretrain`` (:func:`mimkit.pretrain.pretrain_optimizer`) at the MAE recipe's decay."""
    return pretrain_optimizer(model, lr, WEIGHT_DECAY)


@dataclass
class Contestant:
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]  # images -> scalar loss, as trained
    eager_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the same, uncompiled (FLOP counting)

    def step(self, images: torch.Tensor, precision: str) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(images.device, precision):
            loss = self.loss(images)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def build_mimkit(spec: BenchSpec, device: torch.device, variants=("mimkit",)) -> List[Contestant]:
    """mimkit's model; ``variants`` (mimkit, mimkit+compile, mimkit+ckpt) share one model and optimizer."""
    model = create_mae(spec.model, mask_ratio=spec.mask_ratio, **spec.dec).to(device).train()
    opt = mimkit_optimizer(model)

    def eager(x):
        return model(x).loss

    def checkpointed(x):  # the recomputation in backward runs the blocks themselves, so the flag can drop here
        model.set_grad_checkpointing(True)
        try:
            return model(x).loss
        finally:
            model.set_grad_checkpointing(False)

    out = []
    for v in variants:
        if v == "mimkit":
            out.append(Contestant(v, model, opt, eager, eager))
        elif v == "mimkit+compile":
            torch._dynamo.reset()  # a fresh cache per configuration: its shapes are static, compiled as such
            compiled = torch.compile(model, dynamic=False)
            out.append(Contestant(v, model, opt, lambda x, f=compiled: f(x).loss, eager))
        elif v == "mimkit+ckpt":
            out.append(Contestant(v, model, opt, checkpointed, eager))  # FLOPs of the model, not the recompute
        else:
            raise ValueError(f"unknown mimkit variant {v!r}")
    return out


def build_hf(spec: BenchSpec, device: torch.device) -> Contestant:
    """transformers' ViTMAEForPreTraining with the same shapes (its default attention: SDPA) and torch's AdamW."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    e, d = spec.encoder, spec.dec
    cfg = ViTMAEConfig(image_size=e["img_size"], patch_size=e["patch_size"], num_channels=3, qkv_bias=True,
                       hidden_size=e["embed_dim"], num_hidden_layers=e["depth"], num_attention_heads=e["num_heads"],
                       intermediate_size=int(e["embed_dim"] * e["mlp_ratio"]), decoder_hidden_size=d["decoder_dim"],
                       decoder_num_hidden_layers=d["decoder_depth"], decoder_num_attention_heads=d["decoder_heads"],
                       decoder_intermediate_size=int(d["decoder_dim"] * e["mlp_ratio"]), mask_ratio=spec.mask_ratio,
                       norm_pix_loss=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = ViTMAEForPreTraining(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

    def loss(x):
        return model(pixel_values=x).loss
    return Contestant("hf", model, opt, loss, loss)


def build_lightly(spec: BenchSpec, device: torch.device) -> Contestant:
    """lightly's MAE: its timm-based masked encoder and decoder modules and its masking utilities, put together
    the way lightly's MAE example does (decoder embedding and prediction as linear layers, MSE on the masked
    patches), with torch's AdamW."""
    from lightly.models import utils as lu
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
    from timm.models.vision_transformer import VisionTransformer
    e, d = spec.encoder, spec.dec
    p = e["patch_size"]

    class LightlyMAE(nn.Module):
        def __init__(self):
            super().__init__()
            vit = VisionTransformer(img_size=e["img_size"], patch_size=p, embed_dim=e["embed_dim"], depth=e["depth"],
                                    num_heads=e["num_heads"], mlp_ratio=e["mlp_ratio"], qkv_bias=True, num_classes=0)
            self.backbone = MaskedVisionTransformerTIMM(vit=vit)
            self.decoder_embed = nn.Linear(e["embed_dim"], d["decoder_dim"])
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, embed_dim=d["decoder_dim"], depth=d["decoder_depth"],
                num_heads=d["decoder_heads"], mlp_ratio=e["mlp_ratio"])
            self.decoder_pred = nn.Linear(d["decoder_dim"], p * p * 3)

        def forward(self, images):
            b, n = images.shape[0], self.backbone.sequence_length
            idx_keep, idx_mask = lu.random_token_mask((b, n), mask_ratio=spec.mask_ratio, device=images.device)
            latent = self.backbone.encode(images=images, idx_keep=idx_keep)
            tokens = lu.repeat_token(self.decoder.mask_token, (b, n))
            tokens = lu.set_at_index(tokens, idx_keep, self.decoder_embed(latent).type_as(tokens))
            pred = self.decoder_pred(lu.get_at_index(self.decoder(tokens), idx_mask))
            target = lu.get_at_index(lu.patchify(images, p), idx_mask - 1)  # the patches have no class token
            return F.mse_loss(pred, target)

    model = LightlyMAE().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return Contestant("lightly", model, opt, model, model)


BUILDERS = {"hf": build_hf, "lightly": build_lightly}
