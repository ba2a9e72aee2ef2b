"""The MAE model: patchify, masking, encoder input, loss."""
import pytest
import torch

from mimkit.masking import draw_mask, grid_masking, mask_to_ids, num_visible, random_masking
from mimkit.models import MaskedAutoencoder, create_encoder, create_mae, patchify, unpatchify
from mimkit.models.pos_embed import sincos_2d

torch.set_num_threads(1)


def micro(**kw):
    torch.manual_seed(0)
    return create_mae("vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw)


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 3, 224, 224), 16), ((3, 3, 28, 42), 14)])
def test_patchify_round_trip(shape, p):
    x = torch.randn(shape)
    patches = patchify(x, p)
    assert patches.shape == (shape[0], (shape[2] // p) * (shape[3] // p), p * p * 3)
    assert torch.equal(unpatchify(patches, p, (shape[2] // p, shape[3] // p)), x)


def test_patchify_order_is_row_major_pixels_then_channels():
    x = torch.arange(2 * 2 * 3, dtype=torch.float).reshape(1, 3, 2, 2)  # one 2x2 patch
    assert patchify(x, 2)[0, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def test_random_masking_counts_and_reproducibility():
    m = random_masking(5, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert m.mask.dtype == torch.bool and m.mask.sum(1).tolist() == [48] * 5
    assert m.ids_keep.shape == (5, 16)
    # kept indices are exactly the visible ones
    for b in range(5):
        assert set(m.ids_keep[b].tolist()) == set((m.mask[b] == 0).nonzero().flatten().tolist())
    again = random_masking(5, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.mask, again.mask)
    noise = torch.rand(5, 64)
    assert torch.equal(random_masking(5, 64, 0.75, noise=noise).mask, random_masking(5, 64, 0.75, noise=noise).mask)
    # the patches with the lowest noise stay visible
    assert torch.equal(random_masking(1, 4, 0.5, noise=torch.tensor([[0.9, 0.1, 0.5, 0.2]])).mask,
                       torch.tensor([[True, False, True, False]]))


def test_num_visible_truncates_like_mae():
    assert num_visible(196, 0.75) == 49
    assert num_visible(64, 0.9) == 6
    with pytest.raises(ValueError):
        num_visible(64, 1.0)


def test_block_and_grid_masks():
    m = draw_mask("block", 4, (14, 14), 0.4)
    assert m.shape == (4, 196) and m.sum(1).tolist() == [196 - num_visible(196, 0.4)] * 4
    g = grid_masking(2, 8, 8)
    assert g.sum(1).tolist() == [48, 48]
    ids = mask_to_ids(g)
    assert ids.ids_keep.shape == (2, 16)


def test_sincos_matches_mae_layout():
    emb = sincos_2d(8, 2, 3)
    assert emb.shape == (1, 7, 8) and torch.all(emb[0, 0] == 0)
    # first half encodes the column, second half the row: patch (row 1, col 0) has sin(0)=0, cos(0)=1 first
    assert emb[0, 1 + 3, :4].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_encoder_sees_only_visible_patches():
    mae = micro()
    seen = {}
    mae.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(n=a[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    out = mae(x, mask_ratio=0.75)
    assert seen["n"] == 1 + 16  # class token + the 25% visible
    # hidden patches do not influence the encoder's output
    m = random_masking(2, 64, 0.75, noise=torch.rand(2, 64))
    y = x.clone()
    mask = m.mask.float()[..., None]
    hidden = unpatchify(patchify(y, 4) * (1 - mask) + 99 * mask, 4)
    torch.testing.assert_close(mae.forward_encoder(x, m.ids_keep), mae.forward_encoder(hidden, m.ids_keep))
    assert out.pred.shape == (2, 64, 48)


def test_loss_counts_masked_patches_only():
    mae = micro(norm_pix_loss=False)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    out = mae(x, noise=noise)
    target = patchify(x, 4)
    per_patch = ((out.pred - target) ** 2).mean(-1)
    expected = (per_patch * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.loss, expected)
    # changing the prediction on visible patches leaves the loss alone
    pred = out.pred.detach().clone()
    pred[out.mask == 0] += 10
    torch.testing.assert_close(mae.forward_loss(x, pred, out.mask), out.loss.detach())


def test_normalised_target():
    mae = micro(norm_pix_loss=True)
    x = torch.rand(2, 3, 32, 32) * 5 + 3
    t = mae.target(x)
    assert t.mean(-1).abs().max() < 1e-4
    torch.testing.assert_close(t.var(-1), torch.ones(2, 64), atol=1e-3, rtol=1e-3)


def test_few_steps_lower_the_loss():
    mae = micro()
    x = torch.randn(8, 3, 32, 32)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3, betas=(0.9, 0.95))
    noise = torch.rand(8, 64)
    first = None
    for _ in range(30):
        loss = mae(x, noise=noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first


def test_other_image_sizes_interpolate_positions():
    enc = create_encoder("vit_micro_patch4_32")
    assert enc.extract(torch.randn(2, 3, 48, 40), "mean").shape == (2, 96)
    assert enc.extract(torch.randn(2, 3, 32, 32), "all").shape == (2, 65, 96)
    with pytest.raises(ValueError, match="divisible"):
        enc.extract(torch.randn(1, 3, 30, 32))


def test_rebuild_from_arch():
    mae = micro()
    again = MaskedAutoencoder.from_arch(mae.arch)
    again.load_state_dict(mae.state_dict())
    x, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 64)
    torch.testing.assert_close(again(x, noise=noise).loss, mae(x, noise=noise).loss)


def test_encoder_is_a_plain_timm_model():
    import timm
    enc = create_encoder("vit_tiny_patch16_224").eval()
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ref.forward_features(x), enc.forward_features(x))


def test_masked_mse_is_the_mae_loss_and_zero_prediction_its_reference():
    from mimkit.viz import masked_mse
    torch.manual_seed(0)
    mae = create_mae("vit_micro_patch4_32", decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    images = torch.randn(10, 3, 32, 32)
    a, b = masked_mse(mae, images.split(4), seed=3), masked_mse(mae, images, seed=3)
    assert a["images"] == 10 and abs(a["masked_mse"] - b["masked_mse"]) < 1e-5  # same masks in any batching
    from mimkit.views import KeyedNoise
    with torch.no_grad():  # each image's noise from (seed, its position in the stream)
        direct = mae(images, noise=KeyedNoise(3, range(10)).rand(10, 64)).loss.item()
    assert abs(b["masked_mse"] - direct) < 1e-5
    # normalised targets have (unbiased) variance 1 per patch: predicting zeros scores (n - 1) / n
    assert abs(a["zero_prediction_mse"] - 47 / 48) < 1e-3
    torch.nn.init.zeros_(mae.decoder_pred.weight)
    torch.nn.init.zeros_(mae.decoder_pred.bias)
    c = masked_mse(mae, images, seed=3)
    assert abs(c["masked_mse"] - c["zero_prediction_mse"]) < 1e-6


def test_one_random_mask_for_mae_and_the_other_objectives():
    """MAE's forward, draw_mask('random') (the ablations, SimMIM, BEiT's random option) and ViT-MPP's corruption
    hide the same patches for the same noise: one sampler. A second implementation that ranks noise the other way
    (or keeps the largest) fails this."""
    from mimkit.objectives.vit_mpp import corrupt

    class Noise:
        def __init__(self, n):
            self.n = n

        def rand(self, batch, *shape):
            return self.n

    mae = create_mae("vit_micro_patch4_32", decoder_depth=1, decoder_dim=32, decoder_heads=2)
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    with torch.no_grad():
        hidden = mae(x, noise=noise).mask.bool()
    assert torch.equal(draw_mask("random", 3, (8, 8), 0.75, Noise(noise)), hidden)
    assert torch.equal(corrupt(noise, torch.zeros(3, 64), 0.75, 0.8, 0.1)[0], hidden)
