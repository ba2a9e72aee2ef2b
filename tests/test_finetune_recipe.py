"""Fine-tuning does what its recipe says: accuracy rises on an easy task, and mixup / cutmix, label smoothing,
drop path, RandAugment and the position-embedding resize each change what they should."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.config import FinetuneConfig, load_config
from mimkit.models.presets import create_encoder

ft = importlib.import_module("mimkit.eval.finetune")  # mimkit.eval exports the function under the same name

torch.set_num_threads(1)


def easy_folder(root, n=48):
    """Two classes anyone can tell apart: the bright half of the image is the top (class a) or the bottom (b)."""
    rng = np.random.default_rng(0)
    for cls, top in (("a", True), ("b", False)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            x = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            if top:
                x[:16] += 150
            else:
                x[16:] += 150
            Image.fromarray(x).save(root / cls / f"{i}.png")
    return root


@pytest.mark.slow
def test_fine_tuning_raises_accuracy_on_an_easy_task(tmp_path):
    """A randomly initialised micro ViT fine-tuned for 8 epochs on the top-bright / bottom-bright task goes from
    chance to >= 90% top-1 on the held-out quarter. A loss that does not reach the weights (e.g. the task's
    forward returning ``loss * 0``) fails this, staying near 50%."""
    data = easy_folder(tmp_path / "data")
    cfg = load_config(FinetuneConfig, overrides=dict(
        data=str(data), random_init=True, model="vit_micro_patch4_32", val_fraction=0.25, epochs=8, batch_size=16,
        lr=1e-3, warmup_epochs=1, layer_decay=1.0, mixup=0, cutmix=0, randaug="", reprob=0, label_smoothing=0,
        drop_path=0, threads=1, num_workers=0, output=str(tmp_path / "run"), log_every=5))
    results = ft.finetune(cfg)
    assert results["num_val"] == 24 and results["top1"] >= 90, results


def test_mixup_and_cutmix_mix_the_batch_and_its_labels():
    """In training mode the task feeds the classifier mixed images and soft targets (two classes per row); in eval
    mode, the batch untouched. A task that skips its Mixup (or applies it in eval) fails this."""
    enc = create_encoder("vit_micro_patch4_32")
    task = ft.FinetuneTask(ft.build_classifier(enc, 4), 4, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    seen = {}
    class Capture(torch.nn.Module):
        def forward(self, logits, target):
            seen.update(target=target)
            return logits.sum() * 0

    task.criterion = Capture()
    real_logits = task.logits
    task.logits = lambda images: seen.update(images=images) or real_logits(images)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    task.train()
    task(images.clone(), labels)  # timm's Mixup mixes in place
    assert seen["target"].shape == (8, 4) and not torch.equal(seen["images"], images)
    assert ((seen["target"] > 0.02).sum(1) >= 2).all()  # each row mixes two classes (on top of smoothing)
    torch.testing.assert_close(seen["target"].sum(1), torch.ones(8))
    task.eval()
    task(images.clone(), labels)
    assert torch.equal(seen["images"], images) and torch.equal(seen["target"], labels)


def test_label_smoothing_is_the_smoothed_cross_entropy():
    """Without mixup, --label-smoothing 0.1 gives (1 - 0.1) x NLL + 0.1 x mean(-log p). Ignoring the smoothing
    (plain cross-entropy) fails this."""
    enc = create_encoder("vit_micro_patch4_32")
    task = ft.FinetuneTask(ft.build_classifier(enc, 3), 3, label_smoothing=0.1).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(task.model.head.weight, std=1.0)  # confident logits (the fresh head's are all ~0, where
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])  # smoothing changes nothing)
    logp = F.log_softmax(task.logits(images), -1)
    want = (0.9 * -logp.gather(1, labels[:, None])[:, 0] + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(task(images, labels), want)
    assert abs(float(want) - float(F.nll_loss(logp, labels))) > 1e-3  # the check can tell smoothing apart


def test_drop_path_changes_training_outputs_only():
    """With --drop-path 0.5 two training-mode forwards of the same batch differ (blocks dropped at random) while
    eval mode is deterministic; with 0 both are equal. Not passing drop_path to the classifier fails this."""
    enc = create_encoder("vit_micro_patch4_32")
    x = torch.randn(2, 3, 32, 32)
    for rate, differ in ((0.5, True), (0.0, False)):
        model = ft.build_classifier(enc, 3, drop_path=rate)
        model.train()
        a, b = model(x), model(x)
        assert (not torch.allclose(a, b)) == differ, rate
        model.eval()
        assert torch.equal(model(x), model(x))


def test_randaugment_reaches_the_fine_tuning_loader(tmp_path, monkeypatch):
    """finetune hands --randaug and --reprob to the training loader, and that transform holds timm's RandAugment
    and random erasing. Dropping ``auto_augment=cfg.randaug`` in finetune fails this."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from mimkit.data.transforms import build_transform
    seen = {}

    class Stop(Exception):
        pass

    def capture(source, indices, cfg, env, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(ft, "image_loader", capture)
    cfg = load_config(FinetuneConfig, overrides=dict(random_init=True, model="vit_micro_patch4_32", threads=1,
                                                     num_workers=0, output=str(tmp_path / "run"),
                                                     randaug="rand-m7-mstd0.5-inc1", reprob=0.3))
    with pytest.raises(Stop):
        ft.finetune(cfg)
    assert seen["recipe"] == "finetune" and seen["auto_augment"] == "rand-m7-mstd0.5-inc1" and seen["re_prob"] == 0.3
    t = build_transform("finetune", 32, auto_augment=seen["auto_augment"], re_prob=seen["re_prob"])
    kinds = [type(s) for s in t.transforms]
    assert RandAugment in kinds and RandomErasing in kinds


def test_position_embeddings_are_resized_by_interpolation_for_a_new_image_size():
    """Fine-tuning at 64 px from a 32-px encoder interpolates the 8x8 position table to 16x16 (bicubic, as MAE's
    interpolate_pos_embed), keeping the class token's row: shrinking it back gives the original table within
    interpolation error. Loading the table unchanged (shape error) or starting it fresh fails this."""
    from timm.layers import resample_abs_pos_embed
    enc = create_encoder("vit_micro_patch4_32")
    model = ft.build_classifier(enc, 3, img_size=64)
    assert tuple(model.pos_embed.shape) == (1, 1 + 16 * 16, enc.pos_embed.shape[-1])
    torch.testing.assert_close(model.pos_embed[:, :1], enc.pos_embed[:, :1])
    back = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[8, 8], old_size=[16, 16], num_prefix_tokens=1)
    err = (back - enc.pos_embed).abs().max()
    assert err < 0.15 * enc.pos_embed.abs().max(), float(err)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
