"""Fixed 2-D sine-cosine position embeddings, laid out as in MAE.

timm's ``build_sincos2d_pos_embed`` orders the sin/cos halves and the two axes
differently from MAE's release; we keep MAE's layout so that released
checkpoints and Hugging Face's ViTMAE see exactly the same embedding.
"""
import torch


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Return (1, [1 +] grid_h * grid_w, dim); the class-token row is zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    # MAE encodes the column coordinate in the first half, the row in the second
    emb = torch.cat([_sincos_1d(dim // 2, xs), _sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
