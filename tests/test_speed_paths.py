"""The speed paths compute what the plain formulation computes (fp32 within 1e-5), keep every parameter name,
and stay traceable by torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer

from mimkit.pretrain import pretrain_optimizer
from mimkit.masking import random_masking
from mimkit.models import create_mae
from mimkit.models.vit import Attention

torch.set_num_threads(1)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return create_mae("vit_micro_patch4_32", **kw)


def _batch(b=4, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _noise(b, n, seed=2):
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed))


def reference_forward(model, imgs, noise):
    """MAE as the paper's code writes it: embed every patch (the convolution), add positions, gather the visible,
    concatenate mask tokens, unshuffle with a gather, concatenate the class token, decode; then the loss."""
    enc = model.encoder
    m = random_masking(imgs.shape[0], noise.shape[1], model.mask_ratio, noise=noise)
    x = enc.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
    x = torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1)
    for blk in enc.blocks:
        x = blk(x)
    x = model.decoder_embed(enc.norm(x))
    b, n_vis, d = x.shape
    patches = torch.cat([x[:, 1:], model.mask_token.expand(b, noise.shape[1] + 1 - n_vis, -1)], 1)
    patches = torch.gather(patches, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, d))
    x = torch.cat([x[:, :1], patches], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    return model.forward_loss(imgs, pred, m.mask), pred


def test_forward_and_gradients_match_the_plain_formulation():
    model, imgs = _model(), _batch()
    noise = _noise(4, 64)
    out = model(imgs, noise=noise)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast("cpu", enabled=False):
        ref_loss, ref_pred = reference_forward(model, imgs, noise)
    ref_loss.backward()
    assert torch.allclose(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.pred, ref_pred, atol=1e-5, rtol=1e-5)
    assert grads.keys() == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[k], p.grad, atol=1e-5, rtol=1e-4), k


def test_visible_patch_embedding_is_the_convolution_then_a_gather():
    enc = _model().encoder
    imgs = _batch(3, 48)  # a size other than the training one: the grid is 12 x 12
    ids_keep = torch.argsort(_noise(3, 144), 1)[:, :36]
    full = enc.patch_tokens(imgs)
    gathered = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(enc.patch_tokens(imgs, ids_keep), gathered, atol=1e-5)
    # the encoder path that embeds only the visible patches equals gathering from all tokens
    assert torch.allclose(enc.forward_features(imgs, ids_keep), enc.forward_tokens(full, ids_keep, grid_hw=(12, 12)),
                          atol=1e-5)


def test_decoder_single_gather_places_visible_tokens_and_mask_tokens():
    model = _model()
    b, n, k, d = 2, 64, 16, model.decoder_embed.in_features
    latent = torch.randn(b, 1 + k, d)
    ids_restore = torch.argsort(torch.argsort(_noise(b, n), 1), 1)
    seen = {}
    hook = model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.forward_decoder(latent, ids_restore)
    hook.remove()
    x = seen["x"] - model.decoder_pos_embed
    emb = model.decoder_embed(latent)
    assert torch.allclose(x[:, 0], emb[:, 0], atol=1e-6)  # the class token first
    for i in range(b):
        for pos in range(n):
            slot = int(ids_restore[i, pos])
            want = emb[i, 1 + slot] if slot < k else model.mask_token[0, 0]
            assert torch.allclose(x[i, 1 + pos], want, atol=1e-6)


def test_state_dict_keys_are_timms_and_the_official_decoders():
    model = _model()
    enc_keys = {k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder.")}
    timm_keys = set(VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, qkv_bias=True,
                                      num_classes=0).state_dict())
    assert enc_keys == timm_keys
    dec = {k for k in model.state_dict() if not k.startswith("encoder.")}
    assert {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_norm.weight", "decoder_pred.bias",
            "decoder_blocks.0.attn.qkv.weight", "decoder_blocks.1.mlp.fc2.bias"} <= dec
    assert all(isinstance(m, TimmAttention) for m in model.modules() if isinstance(m, Attention))


def test_attention_on_the_cpu_is_plain_for_low_precision_and_short_fp32_sequences(monkeypatch):
    """SDPA only where it was measured faster on the CPU: fp32 beyond PLAIN_FP32_MAX_TOKENS; plain ops for bf16
    and for fp32 sequences up to that length (tiny32's 17 and 65 tokens). The bench's model at the tiny32 shapes
    must take the plain path in fp32, and a longer fp32 sequence SDPA."""
    from mimkit.models.vit import PLAIN_FP32_MAX_TOKENS
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, imgs = _model(), _batch()
    model(imgs)
    assert imgs.shape[-1] // model.patch_size == 8 and not calls  # 17 and 65 tokens: plain in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(imgs)
    assert not calls
    attn = Attention(64, num_heads=4, qkv_bias=True)
    attn(torch.randn(2, PLAIN_FP32_MAX_TOKENS + 1, 64))
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(torch.randn(2, PLAIN_FP32_MAX_TOKENS + 1, 64))
    assert len(calls) == 1


def test_cpu_bf16_attention_matches_sdpa():
    attn = Attention(64, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 17, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attn(x)
        attn.fused_attn = False  # timm's own unfused path, the reference formula
        timm_unfused = super(Attention, attn).forward(x)
        attn.fused_attn = True
        sdpa = super(Attention, attn).forward(x)
    assert fast.dtype == torch.bfloat16
    assert torch.allclose(fast.float(), timm_unfused.float(), atol=1e-2)
    assert torch.allclose(fast.float(), sdpa.float(), atol=3e-2)
    # fp32: timm's forward to rounding at 17 tokens (plain ops), exactly timm's forward beyond the plain range
    assert torch.allclose(attn(x.float()), super(Attention, attn).forward(x.float()), atol=1e-6)
    long = torch.randn(2, 80, 64)
    assert torch.equal(attn(long), super(Attention, attn).forward(long))


def test_grad_checkpointing_gives_the_same_gradients_and_covers_the_decoder():
    imgs, noise = _batch(), _noise(4, 64)
    plain = _model()
    plain(imgs, noise=noise).loss.backward()
    ckpt = _model()
    ckpt.set_grad_checkpointing(True)
    runs = []
    for blk in (ckpt.encoder.blocks[0], ckpt.decoder_blocks[0]):
        blk.forward = lambda x, f=blk.forward, **kw: runs.append(f) or f(x, **kw)
    loss = ckpt(imgs, noise=noise).loss
    loss.backward()
    assert len(runs) == 4  # each block: forward, then recomputed in backward
    for (k, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), k
    ckpt.set_grad_checkpointing(False)
    assert not ckpt.encoder.grad_checkpointing


def test_pretrain_optimizer_is_fused_adamw_with_timms_groups():
    model = _model()
    opt = pretrain_optimizer(model, 1.5e-4, 0.05)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    decay = {g["weight_decay"] for g in opt.param_groups}
    assert decay == {0.0, 0.05}
    no_decay = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert all(p.ndim <= 1 or p is model.mask_token or p is model.encoder.cls_token for p in no_decay)
    model(_batch()).loss.backward()
    opt.step()


def test_the_training_step_traces_without_graph_breaks():
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    imgs = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(imgs).loss
    loss.backward()
    assert torch.isfinite(loss)
    torch._dynamo.reset()


def test_compiles_with_dynamic_shapes():
    """A second image size or batch makes torch.compile trace symbolic shapes: masking must trace too."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    for b, size in ((4, 32), (3, 48)):
        assert torch.isfinite(compiled(_batch(b, size)).loss)
    torch._dynamo.reset()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_has_no_per_sample_python_loop(precision):
    """Masking, gathers and loss are batched ops: a 4x larger batch runs exactly the same ops. Only the ops our code
    calls are counted (an aten op inside another aten op is torch's own work: on CPUs without native bf16, torch's
    bf16 batched matmul loops over the batch internally). A Python loop over samples in the model fails this."""
    model = _model()
    from torch.profiler import profile
    counts = []
    for b in (2, 8):
        with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(_batch(b))
        counts.append(len([e for e in prof.events() if e.name.startswith("aten::")
                           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]))
    assert counts[0] == counts[1]
