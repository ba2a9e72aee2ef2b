"""``mimkit tokenizer train``: fit the VQ tokenizer (:mod:`mimkit.models.vq`) that BEiT predicts the ids of."""
import logging

import torch
import torch.nn.functional as F

from .data import check_sample, make_loader, open_images, split_train_val
from .data.hfdata import dataset_options
from .engine import effective_lr, fit
from .errors import ConfigError
from .files import write_json
from .models.vq import FILE, VQTokenizer, save_tokenizer
from .run import start

log = logging.getLogger("mimkit")


# training -----------------------------------------------------------------------------------------------
def train_tokenizer(cfg) -> dict:
    """``mimkit tokenizer train``: fit the tokenizer on the training split of ``cfg.data`` with the shared engine,
    then write ``tokenizer.pt`` and ``tokenizer.json`` (reconstruction error and codebook use on held-out images)."""
    run = start(cfg, "tokenizer")  # the environment, a new folder (or refuse to overwrite another run), the seeds
    env = run.env
    img_size = cfg.img_size or 32
    if img_size % cfg.patch_size:
        raise ConfigError(f"--img-size {img_size} is not divisible by --patch-size {cfg.patch_size}")
    torch.manual_seed(cfg.seed)
    tok = VQTokenizer(img_size=img_size, patch_size=cfg.patch_size, codebook_size=cfg.codebook_size,
                      code_dim=cfg.code_dim, hidden=cfg.hidden, quantizer=cfg.quantizer, commitment=cfg.commitment,
                      decay=cfg.decay)
    source = open_images(cfg.data, **dataset_options(cfg))  # as pretrain opens it (Hugging Face columns, splits)
    train_idx, val_idx = split_train_val(source, cfg.val_fraction)
    check_sample(source, min_size=cfg.patch_size)
    loader = make_loader(source, train_idx, batch_size=cfg.batch_size, recipe="pretrain", img_size=img_size,
                         aug=cfg.aug, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                         num_workers=cfg.num_workers, device=env.device, cache=cfg.cache)
    optimizer = torch.optim.AdamW([p for p in tok.parameters() if p.requires_grad], lr=effective_lr(cfg, env),
                                  weight_decay=cfg.weight_decay)
    run_dir = run.output
    recorded = run.record(cfg)
    if env.is_main:
        log.info("training a %d-code tokenizer (patch %d, %s) on %d images of %s", cfg.codebook_size, cfg.patch_size,
                 cfg.quantizer, len(train_idx), cfg.data)
    result = fit(tok, optimizer, loader, recorded, run_dir, env)
    summary = {"steps": result.step, "epochs": result.epoch, "loss": result.loss, "seconds": round(result.seconds, 1),
               **dict(tok.arch)}
    if env.is_main:
        summary.update(_held_out_stats(tok, source, val_idx or train_idx, img_size, env.device))
        save_tokenizer(tok.cpu(), run_dir / FILE, summary=summary)
        write_json(run_dir / "tokenizer.json", summary)
        log.info("tokenizer: reconstruction MSE %.4f, %d of %d codes used on held-out images; saved %s",
                 summary.get("val_recon", float("nan")), summary.get("val_codes_used", 0), cfg.codebook_size,
                 run_dir / FILE)
    return summary


@torch.no_grad()
def _held_out_stats(tok: VQTokenizer, source, indices, img_size: int, device, limit: int = 2048) -> dict:
    loader = make_loader(source, indices[:limit], batch_size=256, recipe="eval", img_size=img_size, shuffle=False,
                         num_workers=0, cache="off", device=device)
    tok.eval()
    err, n, counts = 0.0, 0, torch.zeros(tok.codebook_size)
    for images, _ in loader:
        images = images.to(device)
        ids = tok.encode(images)
        g = images.shape[-2] // tok.patch_size, images.shape[-1] // tok.patch_size
        err += F.mse_loss(tok.decode(ids, g).float(), images.float(), reduction="sum").item()
        n += images.numel()
        counts += torch.bincount(ids.flatten().cpu(), minlength=tok.codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    return {"val_recon": err / max(n, 1), "val_codes_used": int((counts > 0).sum()),
            "val_perplexity": float(torch.exp(-(probs * (probs + 1e-10).log()).sum()))}


def tokenizer_command(cfg) -> dict:
    """``mimkit tokenizer ACTION``; the one action is ``train``."""
    if cfg.action == "train":
        return train_tokenizer(cfg)
    raise ConfigError(f"unknown tokenizer action {cfg.action!r} (expected: train)")
