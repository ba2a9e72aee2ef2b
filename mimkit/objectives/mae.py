"""MAE as a pretraining objective: the model itself is :class:`mimkit.models.MaskedAutoencoder`."""
import torch.nn as nn

from ..models import MaskedAutoencoder, create_mae


class MAEObjective(nn.Module):
    name = "mae"

    def __init__(self, model: MaskedAutoencoder):
        super().__init__()
        self.model = model

    @property
    def encoder(self):
        return self.model.encoder

    @property
    def arch(self) -> dict:
        return self.model.arch

    @classmethod
    def build(cls, arch: dict) -> "MAEObjective":
        return cls(MaskedAutoencoder.from_arch(arch))

    @classmethod
    def from_config(cls, cfg) -> "MAEObjective":
        extra = {"img_size": cfg.img_size} if cfg.img_size else {}
        return cls(create_mae(cfg.model, decoder_dim=cfg.decoder_dim or None, decoder_depth=cfg.decoder_depth or None,
                              decoder_heads=cfg.decoder_heads or None, mask_ratio=cfg.mask_ratio,
                              norm_pix_loss=cfg.norm_pix_loss, **extra))

    def forward(self, images, labels=None, rng=None):
        noise = None
        if rng is not None:
            gh, gw = self.encoder.grid_size
            noise = rng.rand(images.shape[0], gh * gw)
        return self.model(images, noise=noise).loss

    def no_weight_decay(self):
        return {"model." + n for n in self.model.no_weight_decay()}
