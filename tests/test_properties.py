"""Property-based tests (hypothesis): patchify/unpatchify, masking and the data transforms hold for arbitrary
valid shapes and ratios, and invalid ones fail with a clear error."""
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mimkit.masking import (block_mask, draw_mask, grid_masking, mask_to_ids, num_visible, random_masking)
from mimkit.models import patchify, unpatchify
from mimkit.data.transforms import AUGS

torch.set_num_threads(1)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ratios = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
open_ratios = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True, allow_nan=False)


# patchify / unpatchify ---------------------------------------------------------------------------------------
@FAST
@given(b=st.integers(1, 3), c=st.integers(1, 4), p=st.integers(1, 8), gh=st.integers(1, 6), gw=st.integers(1, 6),
       seed=st.integers(0, 2**31))
def test_patchify_round_trips_and_lays_out_patches_row_major(b, c, p, gh, gw, seed):
    x = torch.randn(b, c, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))
    patches = patchify(x, p)
    assert patches.shape == (b, gh * gw, p * p * c)
    assert torch.equal(unpatchify(patches, p, (gh, gw), channels=c), x)
    # patch k is the (k // gw, k % gw) tile, its values in (row, col, channel) order
    k = seed % (gh * gw)
    r, q = divmod(k, gw)
    tile = x[:, :, r * p:(r + 1) * p, q * p:(q + 1) * p]
    assert torch.equal(patches[:, k], tile.permute(0, 2, 3, 1).reshape(b, -1))


@FAST
@given(b=st.integers(1, 2), p=st.integers(1, 6), g=st.integers(1, 6))
def test_unpatchify_defaults_to_a_square_grid(b, p, g):
    x = torch.randn(b, g * g, p * p * 3)
    assert torch.equal(patchify(unpatchify(x, p), p), x)


@pytest.mark.parametrize("p,h,w", [(4, 30, 32), (16, 224, 200), (3, 1, 1)])
def test_patchify_rejects_sizes_not_divisible_by_the_patch_clearly(p, h, w):
    with pytest.raises(ValueError, match=r"divisible by the patch size"):
        patchify(torch.zeros(1, 3, h, w), p)


@FAST
@given(p=st.integers(2, 8), h=st.integers(1, 40), w=st.integers(1, 40))
def test_the_encoder_rejects_sizes_not_divisible_by_the_patch_clearly(p, h, w):
    assume(h % p or w % p)
    enc = _encoder(p)
    with pytest.raises(ValueError, match=rf"image size \({h}, {w}\) is not divisible by the patch size {p}"):
        enc.patch_tokens(torch.zeros(1, 3, h, w))


_ENCODERS = {}


def _encoder(p):
    from mimkit.models import create_encoder
    if p not in _ENCODERS:
        _ENCODERS[p] = create_encoder("vit_micro_patch4_32", img_size=8 * p, patch_size=p, depth=1)
    return _ENCODERS[p]


# masking -----------------------------------------------------------------------------------------------------
@FAST
@given(b=st.integers(1, 4), n=st.integers(1, 300), r=ratios, seed=st.integers(0, 2**31))
def test_random_masking_invariants(b, n, r, seed):
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    m = random_masking(b, n, r, noise=noise)
    keep = num_visible(n, r)
    assert 1 <= keep <= n and keep == max(1, int(n * (1 - r)))
    assert m.ids_keep.shape == (b, keep) and m.ids_restore.shape == (b, n) and m.mask.shape == (b, n)
    assert m.mask.dtype == torch.bool and torch.equal(m.mask.sum(1), torch.full((b,), n - keep))
    # ids_restore inverts the shuffle; the kept ones are the visible ones and the lowest-noise ones
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(n).expand(b, n))
    for i in range(b):
        visible = set((m.mask[i] == 0).nonzero().flatten().tolist())
        assert set(m.ids_keep[i].tolist()) == visible
        if keep < n:
            assert noise[i, m.ids_keep[i]].max() <= noise[i, m.mask[i]].min()
    # the same noise, the same mask
    assert torch.equal(random_masking(b, n, r, noise=noise.clone()).mask, m.mask)


@FAST
@given(n=st.integers(1, 1000), r1=ratios, r2=ratios)
def test_more_masking_never_keeps_more_patches(n, r1, r2):
    lo, hi = sorted((r1, r2))
    assert num_visible(n, hi) <= num_visible(n, lo)


@FAST
@given(r=st.one_of(st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0), st.just(float("nan"))))
def test_invalid_mask_ratios_fail_clearly(r):
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        random_masking(2, 16, r)
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        num_visible(16, r)


@FAST
@given(b=st.integers(1, 3), n=st.integers(2, 20), extra=st.integers(1, 3))
def test_noise_of_the_wrong_shape_fails_clearly(b, n, extra):
    with pytest.raises(ValueError, match=rf"noise must have shape \({b}, {n}\), got \({b}, {n + extra}\)"):
        random_masking(b, n, 0.5, noise=torch.rand(b, n + extra))


@FAST
@given(b=st.integers(1, 4), n=st.integers(1, 64), hidden=st.integers(0, 64), seed=st.integers(0, 2**31))
def test_mask_to_ids_keeps_the_visible_patches_in_spatial_order(b, n, hidden, seed):
    hidden = min(hidden, n)
    g = torch.Generator().manual_seed(seed)
    mask = torch.stack([torch.randperm(n, generator=g) < hidden for _ in range(b)])
    m = mask_to_ids(mask)
    for i in range(b):
        assert m.ids_keep[i].tolist() == (~mask[i]).nonzero().flatten().tolist()
    order = torch.cat([m.ids_keep, torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, n - hidden:]], 1)
    assert torch.equal(torch.gather(order, 1, m.ids_restore), torch.arange(n).expand(b, n))
    assert torch.equal(m.mask, mask.float())


@FAST
@given(n=st.integers(2, 32), seed=st.integers(0, 2**31))
def test_mask_to_ids_rejects_unequal_counts_clearly(n, seed):
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, seed % n] = True
    with pytest.raises(ValueError, match="every sample must hide the same number of patches"):
        mask_to_ids(mask)


class FixedNoise:
    """Stands in for the engine's per-step noise (``rng.rand(batch, *shape)``)."""

    def __init__(self, noise):
        self.noise = noise

    def rand(self, batch, *shape):
        return self.noise


@FAST
@given(b=st.integers(1, 3), gh=st.integers(1, 14), gw=st.integers(1, 14), r=ratios,
       min_block=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_block_masking_hides_exactly_the_asked_number(b, gh, gw, r, min_block, seed):
    noise = torch.rand(b, 1, generator=torch.Generator().manual_seed(seed))
    m = draw_mask("block", b, (gh, gw), r, FixedNoise(noise), min_block=min_block)
    n = gh * gw
    assert m.shape == (b, n) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [n - num_visible(n, r)] * b
    again = draw_mask("block", b, (gh, gw), r, FixedNoise(noise.clone()), min_block=min_block)
    assert torch.equal(m, again)


@FAST
@given(gh=st.integers(1, 10), gw=st.integers(1, 10), extra=st.integers(1, 5))
def test_block_mask_rejects_impossible_counts_clearly(gh, gw, extra):
    with pytest.raises(ValueError, match=rf"cannot mask {gh * gw + extra} of {gh * gw} patches"):
        block_mask(gh, gw, gh * gw + extra)


@FAST
@given(b=st.integers(1, 3), gh=st.integers(1, 16), gw=st.integers(1, 16), k=st.integers(1, 5))
def test_grid_masking_keeps_one_patch_per_cell(b, gh, gw, k):
    m = grid_masking(b, gh, gw, k)
    kept = (~m[0]).sum().item()
    assert kept == math.ceil(gh / k) * math.ceil(gw / k)
    assert all(torch.equal(m[i], m[0]) for i in range(b))


# the MAE forward on any valid shape ---------------------------------------------------------------------------
@SLOW
@given(g=st.integers(2, 6), p=st.sampled_from([2, 4]), r=open_ratios, b=st.integers(1, 3), seed=st.integers(0, 99))
def test_mae_forward_on_any_grid_and_ratio(g, p, r, b, seed):
    from mimkit.models import create_mae
    torch.manual_seed(0)
    model = create_mae("vit_micro_patch4_32", img_size=4 * p, patch_size=p, depth=1, decoder_dim=16, decoder_depth=1,
                       decoder_heads=2)
    imgs = torch.randn(b, 3, g * p, g * p, generator=torch.Generator().manual_seed(seed))
    n = g * g
    assume(n - num_visible(n, r) >= 1)  # at least one hidden patch
    out = model(imgs, mask_ratio=r)
    assert out.pred.shape == (b, n, p * p * 3) and out.mask.shape == (b, n)
    assert torch.isfinite(out.loss) and out.loss >= 0
    assert out.mask.sum(1).tolist() == [float(n - num_visible(n, r))] * b


# data transforms ----------------------------------------------------------------------------------------------
@FAST
@given(n=st.integers(1, 4), h=st.integers(1, 80), w=st.integers(1, 80), seed=st.integers(0, 2**31),
       lo=st.floats(0.01, 1.0))
def test_random_resized_crop_boxes_stay_inside_the_image(n, h, w, seed, lo):
    from mimkit.data.transforms import BatchAugment
    aug = BatchAugment("pretrain", 32, "rrc", scale=(lo, 1.0))
    top, left, bh, bw = aug.sample(n, (h, w), torch.Generator().manual_seed(seed))["box"].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()


@FAST
@given(b=st.integers(1, 3), h=st.integers(1, 48), w=st.integers(1, 48), size=st.integers(2, 40),
       aug=st.sampled_from(["rrc", "none", "fixed_crop", "rrc_jitter", "eval"]), seed=st.integers(0, 2**31))
def test_batch_augment_any_source_size_gives_normalised_images_per_sample(b, h, w, size, aug, seed):
    from mimkit.data import MEAN, STD, BatchAugment
    recipe = "eval" if aug == "eval" else "pretrain"
    t = BatchAugment(recipe, size, aug if aug != "eval" else "rrc")
    x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    params = t.sample(b, (h, w), torch.Generator().manual_seed(seed))
    y = t(x, params)
    assert y.shape == (b, 3, size, size) and y.dtype == torch.float32 and torch.isfinite(y).all()
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (y >= lo.view(1, 3, 1, 1) - 1e-5).all() and (y <= hi.view(1, 3, 1, 1) + 1e-5).all()
    # each sample depends only on its own image and parameters (so a batch can be split over processes)
    i = seed % b
    alone = t(x[i:i + 1], {k: v[i:i + 1] for k, v in params.items()})
    assert torch.allclose(alone[0], y[i], atol=1e-5)


@SLOW
@given(h=st.integers(1, 70), w=st.integers(1, 70), size=st.integers(2, 48),
       recipe=st.sampled_from(["pretrain", "eval", "finetune"]),
       aug=st.sampled_from(["rrc", "none", "fixed_crop", "rrc_jitter"]),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA", "1"]))
def test_per_image_transforms_accept_any_size_and_mode(h, w, size, recipe, aug, mode):
    from PIL import Image
    from mimkit.data import build_transform, to_rgb
    img = Image.new(mode, (w, h))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (w, h)
    t = build_transform(recipe, size, aug)
    out = t(rgb)
    assert tuple(out.shape) == (3, size, size) and torch.isfinite(out).all()


@FAST
@given(recipe=st.text(min_size=1, max_size=10).filter(lambda s: s not in ("pretrain", "eval", "finetune")
                                                       and s not in AUGS))
def test_unknown_recipes_and_augs_fail_clearly(recipe):
    from mimkit.data import BatchAugment, build_transform
    with pytest.raises(ValueError, match="unknown recipe"):
        build_transform(recipe, 32)
    with pytest.raises(ValueError, match="unknown aug"):
        build_transform("pretrain", 32, aug=recipe)
    with pytest.raises(ValueError):
        BatchAugment(recipe, 32)


@SLOW
@given(w=st.integers(1, 40), h=st.integers(1, 40), fmt=st.sampled_from(["PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF"]),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P"]), seed=st.integers(0, 2**31))
def test_decoding_any_encoded_image_gives_rgb_of_its_size(w, h, fmt, mode, seed):
    from PIL import Image
    from mimkit.data import decode_image
    assume(not (fmt == "JPEG" and mode in ("RGBA", "P")))
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    out = decode_image(buf.getvalue(), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (w, h)


@FAST
@given(data=st.binary(max_size=2000))
def test_decoding_arbitrary_bytes_either_works_or_is_a_bad_image(data):
    from mimkit.data import decode_image
    from mimkit.errors import BadImage
    try:
        img = decode_image(data, "fuzz.jpg")
    except BadImage as e:
        assert e.name == "fuzz.jpg" and "\n" not in str(e)
    else:
        assert img.mode == "RGB"
