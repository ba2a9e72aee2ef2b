"""The tokenizer's vector quantizer: the EMA codebook update, the dead-code restart and the commitment loss."""
import torch
import torch.nn.functional as F

from mimkit.models.vq import VectorQuantizer, VQTokenizer

torch.set_num_threads(1)


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    """(N, C) vectors -> the (1, C, 1, N) feature map the quantizer takes."""
    return vectors.T[None, :, None, :]


def quantizer(codebook: torch.Tensor, **kw) -> VectorQuantizer:
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], "ema", **kw)
    vq.codebook.copy_(codebook)
    vq.ema_sum.copy_(codebook)
    vq.initialised.fill_(True)
    return vq.train()


def test_the_ema_update_moves_each_code_towards_the_mean_of_its_vectors():
    """After one step, count_k <- d count_k + (1 - d) n_k, sum_k <- d sum_k + (1 - d) S_k and each code is
    sum_k / count_k (Laplace-smoothed), as in VQ-VAE-2 / BEiT's tokenizer. Swapping d and 1 - d, or leaving
    the codebook unchanged, fails this."""
    cb = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]])
    vq = quantizer(cb, decay=0.9)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 11.0]])  # two vectors for code 0, one for code 1, none for 2
    vq(as_map(z))
    counts = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.stack([z[0] + z[1], z[2], torch.zeros(2)])
    ema_count = 0.9 * torch.ones(3) + 0.1 * counts
    ema_sum = 0.9 * cb + 0.1 * sums
    n = ema_count.sum()
    smoothed = (ema_count + 1e-5) / (n + 3 * 1e-5) * n
    torch.testing.assert_close(vq.ema_count, ema_count)
    torch.testing.assert_close(vq.codebook, ema_sum / smoothed[:, None])
    assert vq.codebook[0].norm() > 0 and (vq.codebook[0] - torch.tensor([0.5, 0.5])).norm() < (cb[0] - torch.tensor([0.5, 0.5])).norm()


def test_a_code_unused_for_restart_after_steps_is_restarted_on_a_batch_vector():
    """Code 2 lies far from every vector: after ``restart_after`` (3) steps without use it is replaced by one of
    the batch's vectors and its idle count resets; before that it stays far away. Without the restart it never moves."""
    cb = torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])
    vq = quantizer(cb, decay=0.5, restart_after=3)
    z = torch.tensor([[0.1, 0.0], [0.9, 1.0], [0.0, 0.2], [1.1, 0.9]])
    for step in range(1, 4):
        vq(as_map(z))
        if step < 3:
            assert vq.codebook[2].min() > 90 and int(vq.idle_steps[2]) == step  # far away still (EMA aside)
    assert any(torch.equal(vq.codebook[2], v) for v in z), vq.codebook[2]
    assert int(vq.idle_steps[2]) == 0 and float(vq.ema_count[2]) == 1.0


def test_the_commitment_loss_pulls_the_encoder_to_its_codes_with_its_weight():
    """loss = reconstruction + commitment x mean |z - sg(q)|^2 (EMA codebook: no codebook term), and the
    commitment term's gradient reaches the encoder only. A commitment weight that is ignored, or a loss that
    lets gradient into the codebook through it, fails this."""
    torch.manual_seed(0)
    tok = VQTokenizer(img_size=16, patch_size=4, codebook_size=16, code_dim=8, hidden=8, commitment=0.25).train()
    images = torch.randn(2, 3, 16, 16)
    out = tok(images)
    z = tok.enc(images).permute(0, 2, 3, 1).reshape(-1, 8)
    q = tok.quantize.codebook[tok.quantize.nearest(z)]
    torch.testing.assert_close(out["commit"], F.mse_loss(z, q).detach())
    torch.testing.assert_close(out["loss"].detach(), out["recon"] + 0.25 * out["commit"])
    tok0 = VQTokenizer(img_size=16, patch_size=4, codebook_size=16, code_dim=8, hidden=8, commitment=0.0).train()
    tok0.load_state_dict(tok.state_dict())
    out0 = tok0(images)
    torch.testing.assert_close(out0["loss"].detach(), out0["recon"])
    assert not tok.quantize.codebook.requires_grad  # EMA codes move by averages, never by this gradient
