"""Pieces shared by the blocked long-context kernels (longformer.py, reformer.py).

Both cut a sequence into blocks of b rows and let each block of queries see its own block of
keys and its neighbours: [..., nb, b, d] queries against [..., nb, k*b, d] keys, so scores are
[..., nb, b, k*b], O(n * b) instead of O(n^2). Whatever is not allowed inside that window is
masked.
"""

from __future__ import annotations

import torch
from torch import Tensor


def neighbour_blocks(x: Tensor, block_dim: int, *, ahead: bool) -> Tensor:
    """Blocks m-1, m (and m+1 if `ahead`) of every block m, concatenated along the dimension
    after `block_dim` (the rows of a block). Missing neighbours at the ends are zeros (bool:
    False), so a validity mask passed through here marks them invalid.

    x [..., nb, b, *f] (nb at block_dim)  ->  [..., nb, (2|3)*b, *f]
    """
    block_dim = block_dim % x.dim()
    nb = x.size(block_dim)
    zero = torch.zeros_like(x.narrow(block_dim, 0, 1))
    parts = [torch.cat([zero, x.narrow(block_dim, 0, nb - 1)], dim=block_dim), x]
    if ahead:
        parts.append(torch.cat([x.narrow(block_dim, 1, nb - 1), zero], dim=block_dim))
    return torch.cat(parts, dim=block_dim + 1)


def softmax_rows(scores: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over the last dim where `allowed` (bool, broadcastable to scores), computed in
    fp32 at least.

    Returns (probs, logsumexp, row_ok): row_ok [..., 1] is False for rows that may see nothing.
    Masked scores are set to the most negative finite number rather than -inf, so such rows give
    finite (uniform) probabilities and finite gradients; callers zero their outputs with row_ok.
    Every other row gives masked entries exactly 0 (exp underflows).
    """
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    row_ok = allowed.any(dim=-1, keepdim=True)
    return probs, lse, row_ok
