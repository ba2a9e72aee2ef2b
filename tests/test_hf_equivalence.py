"""mimkit's MAE computes what transformers' ViTMAEForPreTraining computes, with the same weights and noise.

Small random models built here (nothing is downloaded). Weights go mimkit -> HF through ``export(..., 'hf')``
and ``from_pretrained``, and HF -> mimkit through ``save_pretrained`` and ``load_mae``, so both the exporter
and the importer are checked against transformers' own loading and saving code.
"""
import pytest
import torch

from mimkit.checkpoints import export, load, load_encoder, load_mae
from mimkit.models import MaskedAutoencoder, create_mae
from mimkit.models.pos_embed import sincos_2d

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

TOL = 1e-5
SHAPES = {  # name: (create_mae arguments, batch)
    # ViT-B/16 at 224 px with two blocks, the paper's decoder width and heads
    "vitb16-224": (dict(name="vit_base_patch16_224", depth=2, decoder_dim=512, decoder_depth=1, decoder_heads=16), 2),
    "micro-32": (dict(name="vit_micro_patch4_32", depth=2, decoder_dim=64, decoder_depth=2, decoder_heads=4), 3),
}


def randomize(module, seed=0):
    """Random values in every parameter but the fixed sin-cos tables (so biases and norms are checked too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("pos_embed") and "position_embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name and "weight" in name else 0))
    return module.eval()


def mimkit_mae(shape, norm_pix_loss, seed=0):
    kw, _ = SHAPES[shape]
    kw = dict(kw)
    torch.manual_seed(seed)
    return randomize(create_mae(kw.pop("name"), norm_pix_loss=norm_pix_loss, mask_ratio=0.75, **kw), seed)


def inputs(model: MaskedAutoencoder, batch: int, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.encoder.arch["img_size"]
    n = model.encoder.patch_embed.num_patches
    return torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, n, generator=g)


def compare(ours: MaskedAutoencoder, hf, x, noise):
    with torch.no_grad():
        a = ours(x, noise=noise)
        b = hf(pixel_values=x, noise=noise)
    assert torch.equal(a.mask, b.mask)
    assert (a.pred - b.logits).abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mimkit_to_hf_same_loss_pred_mask(tmp_path, shape, norm_pix_loss):
    ours = mimkit_mae(shape, norm_pix_loss)
    out = export(ours, "hf", tmp_path / "hf")
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = hf.config
    assert (cfg.norm_pix_loss, cfg.mask_ratio, cfg.layer_norm_eps) == (norm_pix_loss, 0.75, 1e-6)
    compare(ours, hf.eval(), *inputs(ours, SHAPES[shape][1]))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_hf_to_mimkit_same_loss_pred_mask(tmp_path, norm_pix_loss):
    cfg = transformers.ViTMAEConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=384,
                                    image_size=32, patch_size=4, decoder_hidden_size=64, decoder_num_hidden_layers=2,
                                    decoder_num_attention_heads=4, decoder_intermediate_size=256, mask_ratio=0.75,
                                    norm_pix_loss=norm_pix_loss, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
    torch.manual_seed(0)
    hf = randomize(transformers.ViTMAEForPreTraining(cfg))
    with torch.no_grad():  # the fixed tables as a release holds them
        hf.vit.embeddings.position_embeddings.copy_(sincos_2d(96, 8, 8))
        hf.decoder.decoder_pos_embed.copy_(sincos_2d(64, 8, 8))
    hf.save_pretrained(tmp_path / "hf")
    ours, info = load_mae(tmp_path / "hf")
    assert info["format"] == "hf" and info["unused"] == [] and not info["decoder_initialised"]
    assert ours.norm_pix_loss is norm_pix_loss
    assert ours.encoder.arch["num_heads"] == 3 and ours.arch["decoder_heads"] == 4  # from config.json
    compare(ours, hf, *inputs(ours, 2))
    # the encoder alone, as a ViTMAEModel folder
    hf.vit.save_pretrained(tmp_path / "vit")
    enc = load_encoder(tmp_path / "vit")
    x, noise = inputs(ours, 2)
    with torch.no_grad():
        want = hf.vit(pixel_values=x, noise=noise).last_hidden_state
        got = ours.forward_encoder(x, ours.random_masking(x, 0.75, noise=noise).ids_keep)
    assert (want - got).abs().max().item() <= TOL
    assert all(torch.equal(v, ours.encoder.state_dict()[k]) for k, v in enc.state_dict().items())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_round_trip_mimkit_hf_mimkit(tmp_path, shape):
    ours = mimkit_mae(shape, True)
    back = load(export(ours, "hf", tmp_path / "hf"))
    assert isinstance(back, MaskedAutoencoder) and back.arch == ours.arch
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and through transformers' own save_pretrained
    transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "hf2")
    b = load(tmp_path / "hf2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_only_export_is_a_vitmae_model(tmp_path):
    ours = mimkit_mae("micro-32", True)
    out = export(ours, "hf", tmp_path / "enc", encoder_only=True)
    vit = transformers.ViTMAEModel.from_pretrained(out, mask_ratio=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # mask ratio 0 with sorted noise keeps every patch in place
        got = vit(pixel_values=x, noise=torch.arange(64.0).expand(2, -1)).last_hidden_state
    assert (got - ours.encoder.forward_features(x)).abs().max().item() <= TOL


def test_position_tables_share_the_release_layout():
    # HF builds its sin-cos tables its own way; they equal ours (the official layout) for both widths
    cfg = transformers.ViTMAEConfig(hidden_size=96, num_hidden_layers=1, num_attention_heads=3, intermediate_size=384,
                                    image_size=32, patch_size=4, decoder_hidden_size=96, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=3, decoder_intermediate_size=384)
    dec = transformers.ViTMAEForPreTraining(cfg).decoder
    if not hasattr(dec, "initialize_weights"):
        pytest.skip("this transformers version builds the decoder table elsewhere")
    dec.initialize_weights(64)
    assert torch.allclose(dec.decoder_pos_embed, sincos_2d(96, 8, 8), atol=1e-6)
