"""Reformer LSH attention (Kitaev et al. 2020): shared query-key, hashing, sorting, chunks.

For each of n_hashes rounds:
1. Hash: random rotation R [d, n_buckets/2]; bucket(x) = argmax([x R, -x R]) (angular LSH, so
   vectors pointing the same way share a bucket). One rotation per round, shared by all heads
   and batch rows (so a head-sliced module computes exactly its share).
2. Sort the positions by bucket (stable: by position within a bucket) and cut the sorted
   sequence into chunks of c = chunk_len.
3. A query attends to the keys of its own bucket in its chunk and the previous one (no wrap
   around from the first chunk). Causal: only keys at earlier positions, and at most c sorted
   places back (the c latest earlier keys of its bucket). That bound makes the causal variant
   exactly causal: which keys a query sees depends only on earlier positions, never on how
   later tokens hashed (with plain chunk boundaries a later token in a lower bucket would shift
   them).
4. Shared QK: keys are the unit vectors k / |k| of the queries' own vectors, and the score is
   q . k/|k| (the key normalization takes the place of 1/sqrt(d), as in the reference
   implementation). A query never attends to itself unless it has no other key.
5. Rounds are combined by their log-sum-exp: out = sum_r softmax_r(lse_r) out_r, which is the
   softmax over the union of the rounds' keys when no key is seen in two rounds.
With n_buckets = 1 and chunk_len >= T this is full shared-QK attention.

`scale` (the kernel contract's factor on q k^T, default 1/sqrt(d)) is relative to that default
here: scores are q . k/|k| * scale * sqrt(d), so T5's unscaled scores (scale 1) are sqrt(d)
sharper, as they are for dense attention. A position bias comes as an `OffsetBias`
(attention.py) and is evaluated on each chunk window's pairs from their original positions:
[B, H, R, nc, c, 2c], the size of the window's scores, never [T, T].

Memory O(n_hashes * T * 2c); the only [T]-long work besides the chunks is hashing and sorting.
Positions masked by key_padding_mask_BS are hashed into an extra bucket of their own, sorted
after all real ones: as keys they are never attended, as queries they see no key and output 0
(the module contract for rows with no key; the same holds for any row with no key in any round).

Shape legend: B batch, H heads, T positions (L padded to a multiple of c), d head dim,
R hash rounds, nc chunks per round, c chunk length, K = 2c keys per chunk window.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.config import AttentionConfig
from pretrain.model.attention import (
    AttentionKernel,
    OffsetBias,
    check_attention_inputs,
    refuse_tensor_bias,
    register_attention_kernel,
)
from pretrain.model.blocked import neighbour_blocks, window_attention


@register_attention_kernel("reformer")
class LSHAttention(AttentionKernel):
    projections = {"q": "qk", "k": "qk", "v": "v"}  # shared query-key: one projection
    scores_all_pairs = False
    # Tensor parallelism: the rotations are drawn from the random stream that tensor-parallel
    # peers share, also while attention dropout draws per-rank masks, so that every rank hashes
    # its heads as the unsplit module hashes them.
    tp_plan = {"rotations": "shared_rng"}

    def __init__(
        self, n_hashes: int = 2, n_buckets: int = 32, chunk_len: int = 64,
        hash_seed: int | None = None,
    ) -> None:
        super().__init__()
        if n_hashes < 1 or chunk_len < 1:
            raise ValueError(f"n_hashes and chunk_len must be >= 1, got {n_hashes}, {chunk_len}")
        if n_buckets != 1 and (n_buckets < 2 or n_buckets % 2):
            raise ValueError(f"n_buckets must be 1 or even, got {n_buckets}")
        self.n_hashes, self.n_buckets, self.chunk_len = n_hashes, n_buckets, chunk_len
        self.hash_seed = hash_seed

    @classmethod
    def from_config(cls, cfg: AttentionConfig, layer: int = 0) -> "LSHAttention":
        rf = cfg.reformer
        return cls(rf.n_hashes, rf.n_buckets, rf.chunk_len, rf.hash_seed)

    def extra_repr(self) -> str:
        return (f"n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, "
                f"chunk_len={self.chunk_len}, hash_seed={self.hash_seed}")

    def keys_per_query(self, seq_len: int) -> float:
        return 2.0 * min(self.chunk_len, seq_len) * self.n_hashes

    # ------------------------------------------------------------------ hashing

    def rotations(self, d: int, device: torch.device) -> Tensor:
        """fp32 [d, n_hashes, n_buckets // 2]: fresh from torch's RNG, or fixed by hash_seed."""
        shape = (d, self.n_hashes, self.n_buckets // 2)
        if self.hash_seed is None:
            return torch.randn(shape, device=device)
        gen = torch.Generator().manual_seed(self.hash_seed)
        return torch.randn(shape, generator=gen).to(device)

    @torch.no_grad()
    def buckets(self, qk_BHTd: Tensor, key_ok_BT: Tensor | None = None) -> Tensor:
        """int64 [B, H, R, T]: the bucket of every position in every round, in [0, n_buckets);
        positions where key_ok_BT is False (padding) go to an extra last bucket, n_buckets, so
        they take no place among the real keys of the sorted sequence."""
        B, H, T, d = qk_BHTd.shape
        R = self.n_hashes
        if self.n_buckets == 1:
            buckets = torch.zeros(B, H, R, T, dtype=torch.long, device=qk_BHTd.device)
        else:
            rot = self.rotations(d, qk_BHTd.device).view(d, -1)
            proj = (qk_BHTd.float() @ rot).view(B, H, T, R, -1)
            # argmax over [proj, -proj] without building it
            top, arg_top = proj.max(dim=-1)
            low, arg_low = proj.min(dim=-1)
            half = self.n_buckets // 2
            buckets = torch.where(top >= -low, arg_top, arg_low + half).transpose(2, 3)
        if key_ok_BT is not None:
            buckets = buckets.masked_fill(~key_ok_BT[:, None, None, :], self.n_buckets)
        return buckets.contiguous()

    # ------------------------------------------------------------------ attention

    @staticmethod
    def _patterns(c: int, causal: bool, device: torch.device) -> tuple[Tensor, Tensor]:
        """bool [c, 2c] over a chunk's window (previous chunk, own chunk): the columns a query
        row t may use, and its own column (c + t: a position appears once per round).

        Within one bucket, sorted order is position order, so for same-bucket keys "earlier
        position" is "earlier sorted place": causal keeps columns t ... c + t (at most c places
        back, and not ahead); bidirectional keeps all."""
        t = torch.arange(c, device=device)[:, None]
        u = torch.arange(2 * c, device=device)[None, :]
        pattern = (u >= t) & (u <= c + t) if causal else torch.ones(c, 2 * c, dtype=torch.bool,
                                                                     device=device)
        return pattern, u == c + t

    def forward(
        self,
        q_BHTd: Tensor,
        k_BHSd: Tensor,
        v_BHSd: Tensor,
        *,
        causal: bool,
        key_padding_mask_BS: Tensor | None = None,
        attn_bias: OffsetBias | None = None,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> Tensor:
        check_attention_inputs(q_BHTd, k_BHSd, v_BHSd, key_padding_mask_BS, attn_bias)
        if q_BHTd is not k_BHSd:
            raise ValueError(
                "reformer LSH attention shares queries and keys: pass the same tensor as q and k "
                "(MultiHeadAttention does, from its one qk_proj; cross-attention cannot share)"
            )
        refuse_tensor_bias("reformer LSH", attn_bias)
        B, H, T, d = q_BHTd.shape
        R = self.n_hashes
        c = min(self.chunk_len, T)
        nc = math.ceil(T / c)
        L = nc * c  # sorted places per round: T padded to whole chunks
        device = q_BHTd.device
        key_ok_BT = (key_padding_mask_BS if key_padding_mask_BS is not None
                     else torch.ones(B, T, dtype=torch.bool, device=device))

        # 1-2. hash, then sort each round by bucket (stable: by position inside a bucket).
        # Places past T get the padding bucket, after every real one.
        bucket_BHRL = F.pad(self.buckets(q_BHTd, key_ok_BT), (0, L - T), value=self.n_buckets)
        order_BHRL = torch.argsort(bucket_BHRL, dim=-1, stable=True)  # place -> position
        # Gather rows by flat index, straight from the memory of q and v (for
        # MultiHeadAttention's head views, [B, T, H, d]: no transposed copy). Places past T
        # read position 0: masked as keys, dropped as queries, so they get zero gradient.
        pos_BHRL = order_BHRL.clamp(max=T - 1)
        q_rows, q_index = _rows(q_BHTd)
        k_rows, k_index = _rows(F.normalize(q_BHTd, dim=-1))  # unit keys, before the gather
        v_rows, v_index = _rows(v_BHSd)
        q_s = q_rows.index_select(0, q_index(pos_BHRL).view(-1)).view(B, H, R, nc, c, d)
        k_s = k_rows.index_select(0, k_index(pos_BHRL).view(-1)).view(B, H, R, nc, c, d)
        v_s = v_rows.index_select(0, v_index(pos_BHRL).view(-1)).view(B, H, R, nc, c, d)
        if scale is not None and scale * math.sqrt(d) != 1.0:
            q_s = q_s * (scale * math.sqrt(d))

        # 3. chunk + previous chunk (K = 2c keys): allowed = same bucket, within the pattern.
        # Bucket ids + 1, with 0 for invalid keys (padding, and the zeros neighbour_blocks puts
        # before the first chunk) and -1 for invalid queries, so that neither ever matches.
        ok_s = (bucket_BHRL.gather(-1, order_BHRL) < self.n_buckets).view(B, H, R, nc, c)
        bucket_s = bucket_BHRL.gather(-1, order_BHRL).view(B, H, R, nc, c) + 1
        bucket_win = neighbour_blocks(bucket_s * ok_s, -2, ahead=False)  # [B, H, R, nc, K]
        bucket_q = bucket_s.masked_fill(~ok_s, -1)
        pattern, is_self = self._patterns(c, causal, device)  # [c, K] each
        others = (bucket_q[..., :, None] == bucket_win[..., None, :]) & (pattern & ~is_self)
        # itself only when nothing else is allowed (and it is a real position)
        lonely = ~others.any(dim=-1, keepdim=True) & ok_s[..., None]
        allowed = others | (is_self & lonely)
        bias = None
        if attn_bias is not None:  # offsets key - query of each window, from positions
            pos_s = pos_BHRL.view(B, H, R, nc, c)
            offsets = neighbour_blocks(pos_s, -2, ahead=False)[..., None, :] - pos_s[..., None]
            bias = attn_bias(offsets.transpose(0, 1)).transpose(0, 1)  # [B, H, R, nc, c, K]

        out_s, lse, row_ok = window_attention(q_s, k_s, v_s, allowed, ahead=False,
                                              dropout_p=dropout_p, need_lse=R > 1,
                                              save_probs=True, bias=bias)

        # 4. undo the sort: the rows of each position t < T, in [B, T, H, R] order (so that the
        # result is laid out [B, T, H, d], the layout MultiHeadAttention merges heads from).
        place_BHRL = torch.empty_like(order_BHRL).scatter_(
            -1, order_BHRL, torch.arange(L, device=device).expand_as(order_BHRL))
        bhr = torch.arange(B * H * R, device=device).view(B, H, R, 1) * L
        rows_BTHR = (place_BHRL[..., :T] + bhr).permute(0, 3, 1, 2).reshape(-1)
        out_BTHRd = out_s.reshape(-1, d).index_select(0, rows_BTHR).view(B, T, H, R, d)
        ok_BTHR = row_ok.reshape(-1).index_select(0, rows_BTHR).view(B, T, H, R)

        # 5. combine rounds by log-sum-exp; rows with no key in any round output zeros
        if R == 1:
            out_BTHd = out_BTHRd[:, :, :, 0]
        else:
            lse = lse.masked_fill(~row_ok, torch.finfo(lse.dtype).min)  # empty rows weigh 0
            lse_BTHR = lse.reshape(-1).index_select(0, rows_BTHR).view(B, T, H, R)
            weight = torch.softmax(lse_BTHR, dim=-1).to(out_BTHRd.dtype)[..., None]
            out_BTHd = out_BTHRd[:, :, :, 0] * weight[:, :, :, 0]
            for r in range(1, R):  # a loop of addcmul beats a broadcast multiply + sum on CPU
                out_BTHd = torch.addcmul(out_BTHd, out_BTHRd[:, :, :, r], weight[:, :, :, r])
        out_BTHd = out_BTHd.masked_fill(~ok_BTHR.any(dim=-1, keepdim=True), 0.0)
        return out_BTHd.transpose(1, 2).to(q_BHTd.dtype)


def _rows(x_BHTd: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x as a [rows, d] matrix without copying when its memory is [B, T, H, d] (a head view) or
    [B, H, T, d], and the function mapping positions [B, H, ...] to row numbers."""
    B, H, T, d = x_BHTd.shape
    b = torch.arange(B, device=x_BHTd.device).view(B, 1, 1, 1)
    h = torch.arange(H, device=x_BHTd.device).view(1, H, 1, 1)
    if x_BHTd.transpose(1, 2).is_contiguous():
        return x_BHTd.transpose(1, 2).reshape(-1, d), lambda t: (b * T + t) * H + h
    x = x_BHTd.contiguous()
    return x.view(-1, d), lambda t: (b * H + h) * T + t
