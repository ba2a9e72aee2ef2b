"""Semantic segmentation on a plain ViT encoder, as the MAE paper transfers it (Sec. 5, ADE20K; BEiT's setup).

``upernet``: features of four blocks (for 12 blocks the 4th, 6th, 8th and 12th, BEiT's and MAE's choice; d/3, d/2,
2d/3 and d in general) made into a simple feature pyramid at strides 4, 8, 16, 32 of the image (ViTDet / BEiT:
transposed convolutions up, max-pooling down: x4, x2, x1, x1/2 for patch 16; x1, 1/2, 1/4, 1/8 for patch 4), then
segmentation-models-pytorch's UPerNet decoder (PPM + FPN) and a 1x1 classifier. smp's own UPerNet model needs a
CNN encoder with a stride pattern; its decoder takes any list of maps at strides 4..32, so the pyramid is the one
piece written here. ``linear``: BatchNorm and a 1x1 convolution on the last block's patch tokens (the fast
baseline). Logits are upsampled bilinearly to the input size.

The encoder's fixed sin-cos position table stays fixed: at a crop size other than pretraining's the table is
regenerated for the new grid (what MAE would have used there), or resampled when the source's positions were
learned. Inference on images of any size: :meth:`Segmenter.slide`, overlapping windows of the training crop.
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import MaskedViT

HEADS = ("upernet", "linear")
STRIDES = (4, 8, 16, 32)


def feature_blocks(depth: int) -> List[int]:
    """The four blocks the pyramid reads (0-based): [3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24."""
    return [max(0, b) for b in (depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1)]


class SimplePyramid(nn.Module):
    """One (B, D, h, w) map per stride of :data:`STRIDES` from a stride-``patch`` map: 2x transposed convolutions
    (BatchNorm + GELU between two) up, max-pooling down, as BEiT's fpn1..fpn4; a patch size that is not a power of
    two reaches the stride by bilinear resizing."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.levels = nn.ModuleList()
        for stride in STRIDES:
            ratio = math.log2(patch / stride)
            if ratio >= 1 and ratio == int(ratio):
                layers = []
                for i in range(int(ratio)):
                    if i:
                        layers += [nn.BatchNorm2d(dim), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
                self.levels.append(nn.Sequential(*layers))
            elif ratio <= -1 and ratio == int(ratio):
                k = 2 ** int(-ratio)
                self.levels.append(nn.MaxPool2d(k, k, ceil_mode=True))  # ceil: tiny maps keep one cell
            else:
                self.levels.append(nn.Identity())

    def forward(self, maps: List[torch.Tensor], image_hw) -> List[torch.Tensor]:
        out = []
        for level, x, stride in zip(self.levels, maps, STRIDES):
            x = level(x)
            want = (max(1, math.ceil(image_hw[0] / stride)), max(1, math.ceil(image_hw[1] / stride)))
            if tuple(x.shape[-2:]) != want:
                x = F.interpolate(x, size=want, mode="bilinear", align_corners=False)
            out.append(x)
        return out


class Segmenter(nn.Module):
    """``forward(images) -> (B, num_classes, H, W)`` logits; ``arch`` rebuilds it (:meth:`from_arch`)."""

    def __init__(self, encoder: MaskedViT, num_classes: int, head: str = "upernet", channels: int = 256,
                 crop_size: int = 0):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
        self.encoder = encoder
        dim = encoder.embed_dim
        self.blocks_out = feature_blocks(len(encoder.blocks)) if head == "upernet" else [len(encoder.blocks) - 1]
        self.arch = {"encoder": dict(encoder.arch), "num_classes": num_classes, "head": head, "channels": channels,
                     "crop_size": crop_size or encoder.arch["img_size"]}
        if head == "upernet":
            try:
                from segmentation_models_pytorch.base import SegmentationHead
                from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
            except ImportError as e:
                raise ImportError("the UperNet head needs segmentation-models-pytorch: "
                                  "pip install 'mimkit[seg]'") from e
            self.pyramid = SimplePyramid(dim, encoder.patch_size)
            # smp's decoder skips the first two entries (strides 1 and 2); the rest are our four levels
            self.decoder = UPerNetDecoder([encoder.in_chans, dim, dim, dim, dim, dim], encoder_depth=5,
                                          decoder_channels=channels)
            self.classifier = SegmentationHead(channels, num_classes, kernel_size=1)
        else:
            self.classifier = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, 1))

    @property
    def num_classes(self) -> int:
        return self.arch["num_classes"]

    @property
    def crop_size(self) -> int:
        return self.arch["crop_size"]

    @classmethod
    def from_arch(cls, arch: dict) -> "Segmenter":
        return cls(MaskedViT(**arch["encoder"]), arch["num_classes"], arch["head"], arch["channels"],
                   arch["crop_size"])

    def block_maps(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, D, h, w) patch-token maps after the blocks ``blocks_out`` (the last through the final norm)."""
        enc = self.encoder
        gh, gw = images.shape[-2] // enc.patch_size, images.shape[-1] // enc.patch_size
        x = enc.patch_tokens(images) + enc.position_table((gh, gw))[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(enc.pos_drop(torch.cat([cls, x], dim=1)))
        maps, last = [], len(enc.blocks) - 1
        for i, blk in enumerate(enc.blocks):
            if enc.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            for _ in range(self.blocks_out.count(i)):
                y = enc.norm(x) if i == last else x
                maps.append(y[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.block_maps(images)
        if self.arch["head"] == "upernet":
            x = self.decoder([None, None, *self.pyramid(maps, images.shape[-2:])])
        else:
            x = maps[-1]
        return F.interpolate(self.classifier(x), size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def slide(self, images: torch.Tensor, overlap: float = 1 / 3, pad_value: Optional[torch.Tensor] = None,
              batch: int = 32) -> torch.Tensor:
        """Logits (B, K, H, W) of images of any size: windows of the crop size with ``overlap`` (mmseg's 'slide'
        mode), their logits averaged where they overlap; an image smaller than a window is padded to it with
        ``pad_value`` (per channel; the normalised value of a zero pixel, as training's padding)."""
        was_training = self.training
        self.eval()
        try:
            return self._slide(images, overlap, pad_value, batch)
        finally:
            self.train(was_training)

    def _slide(self, images, overlap, pad_value, batch):
        S = self.crop_size
        B, C, H, W = images.shape
        Hp, Wp = max(H, S), max(W, S)
        if (Hp, Wp) != (H, W):
            fill = torch.zeros(C) if pad_value is None else pad_value
            padded = fill.to(images).view(1, C, 1, 1).expand(B, C, Hp, Wp).clone()
            padded[:, :, :H, :W] = images
            images = padded
        step = max(1, int(S * (1 - overlap)))
        tops = sorted(set(list(range(0, Hp - S, step)) + [Hp - S]))
        lefts = sorted(set(list(range(0, Wp - S, step)) + [Wp - S]))
        boxes = [(t, l) for t in tops for l in lefts]
        logits = images.new_zeros(B, self.num_classes, Hp, Wp, dtype=torch.float32)
        count = images.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)
        per = max(1, batch // B)
        for i in range(0, len(boxes), per):
            chunk = boxes[i:i + per]
            crops = torch.cat([images[:, :, t:t + S, l:l + S] for t, l in chunk])
            out = self(crops).float()
            for j, (t, l) in enumerate(chunk):
                logits[:, :, t:t + S, l:l + S] += out[j * B:(j + 1) * B]
                count[:, :, t:t + S, l:l + S] += 1
        return (logits / count)[:, :, :H, :W]

    # layer-wise lr decay (timm's create_optimizer_v2) and weight decay see the encoder's groups under "encoder."
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^encoder\.(?:cls_token|pos_embed|patch_embed)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))])

    def no_weight_decay(self):
        return {"encoder." + n for n in self.encoder.no_weight_decay()}
