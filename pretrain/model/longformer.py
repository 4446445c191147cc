"""Longformer attention (Beltagy et al. 2020): sliding window, dilation, global positions.

Who sees whom, for self-attention over T positions (w = window, r = dilation):
* local: query i sees key j if |i - j| <= w*r and r divides i - j (causal: also j <= i);
* global positions g (the kernel's `global_positions`, plus per batch `global_mask_BT`): every
  query also sees key g (causal: if g <= i), and the query rows g see every key (causal: j <= g).
  The global query rows use their own projections q_global, k_global, v_global (paper, section
  3.1): out[g] = softmax(q_global[g] k_global^T / sqrt(d)) v_global. Without them (kernel used on
  its own) they use q, k, v. All other rows use q, k, v for window and global keys alike.
* key_padding_mask_BS removes keys; a row that sees no key outputs zeros (module contract).
Equivalently: a dense softmax over the mask  (window | global column) & padding & causal  for
non-global rows, and  padding & causal  for global rows (tests/test_long_attention.py checks
exactly that, in values and gradients).
* A position bias comes as an `OffsetBias` (attention.py; T5's relative position bias): it is
  evaluated on the pairs scored, never on [T, T]. In the blocked layout below the offset of key
  column u from query row t is the same in every block, (u - b - t) * r, so the window's bias is
  one [H, b, K] table; the global columns and rows get theirs from their positions.

Blocked implementation, memory O(T * (3w + G)), never a [T, T] tensor:
1. Dilation is a permutation: position p = m*r + c lies in residue class c at index m, and a
   dilated window is an ordinary window of w inside each class: [B, H, T, d] -> [B, H, r, n, d].
2. Each class is cut into blocks of b = w rows; block m's keys are blocks m-1, m, m+1 (causal:
   m-1, m), so scores are [B, H, r, nb, b, 3b] and one constant [b, 3b] band pattern masks what
   lies beyond w. Global keys are removed from the window and appended as G extra columns of
   the same softmax ([B, H, r, nb, b, G]), so none is counted twice.
3. The G global rows are recomputed as dense rows [B, H, G, T] and written over their places.

Shape legend: B batch, H heads, T positions, d head dim, G global positions, r dilation,
nb blocks of b rows per residue class, K keys per block window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

GLOBAL_PROJECTIONS = {"q_global": "q_global", "k_global": "k_global", "v_global": "v_global"}


@register_attention_kernel("longformer")
class LongformerAttention(AttentionKernel):
    scores_all_pairs = False

    def __init__(
        self,
        window: int,
        dilation: int = 1,
        global_positions: Sequence[int] = (),
        *,
        global_projections: bool | None = None,
    ) -> None:
        """global_projections: whether MultiHeadAttention feeds separate q/k/v_global
        projections (default: when there are static global positions)."""
        super().__init__()
        if window < 1 or dilation < 1:
            raise ValueError(f"window and dilation must be >= 1, got {window} and {dilation}")
        if any(p < 0 for p in global_positions):
            raise ValueError(f"global positions must be >= 0, got {list(global_positions)}")
        self.window, self.dilation = window, dilation
        self.global_positions = tuple(sorted(set(global_positions)))
        if global_projections is None:
            global_projections = bool(self.global_positions)
        if global_projections:
            self.projections = {**AttentionKernel.projections, **GLOBAL_PROJECTIONS}

    @classmethod
    def from_config(cls, cfg: AttentionConfig, layer: int = 0) -> "LongformerAttention":
        lf = cfg.longformer

        def per_layer(value: int | list[int]) -> int:
            return value[layer] if isinstance(value, list) else value

        return cls(per_layer(lf.window), per_layer(lf.dilation), lf.global_positions)

    def extra_repr(self) -> str:
        return (f"window={self.window}, dilation={self.dilation}, "
                f"global_positions={list(self.global_positions)}")

    def keys_per_query(self, seq_len: int) -> float:
        width = min(self.window, seq_len)
        return 3.0 * width + len(self.global_positions)  # causal computes 2 of the 3 blocks

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
        q_global: Tensor | None = None,
        k_global: Tensor | None = None,
        v_global: Tensor | None = None,
        global_mask_BT: Tensor | None = None,
    ) -> Tensor:
        """q_global/k_global/v_global: [B, H, T, d] from the global projections (default q, k,
        v). global_mask_BT: bool [B, T], more global positions for this batch (e.g. every
        question token), in addition to the static ones."""
        check_attention_inputs(q_BHTd, k_BHSd, v_BHSd, key_padding_mask_BS, attn_bias)
        refuse_tensor_bias("longformer", attn_bias)
        B, H, T, d = q_BHTd.shape
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        if k_BHSd.size(2) != T:
            raise ValueError(
                f"longformer attention is self-attention: q has {T} positions, k "
                f"{k_BHSd.size(2)} (use dense attention for cross-attention)"
            )
        for name, t in (("q_global", q_global), ("k_global", k_global), ("v_global", v_global)):
            if t is not None and t.shape != q_BHTd.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected {tuple(q_BHTd.shape)}"
                )
        if global_mask_BT is not None and (
            global_mask_BT.dtype != torch.bool or tuple(global_mask_BT.shape) != (B, T)
        ):
            raise ValueError(
                f"global_mask_BT must be bool [B, T] = {[B, T]}, got {global_mask_BT.dtype} "
                f"{list(global_mask_BT.shape)}"
            )
        glob = self._global_slots(B, T, global_mask_BT, q_BHTd.device)
        out_BHTd = self._windowed(q_BHTd, k_BHSd, v_BHSd, causal, key_padding_mask_BS, glob,
                                  dropout_p, scale, attn_bias)
        if glob is None:
            return out_BHTd[:, :, :T]
        idx_BG, valid_BG, _ = glob
        out_BHGd = self._global_rows(
            q_global if q_global is not None else q_BHTd,
            k_global if k_global is not None else k_BHSd,
            v_global if v_global is not None else v_BHSd,
            causal, key_padding_mask_BS, idx_BG, valid_BG, dropout_p, scale, attn_bias,
        )
        # Write the global rows over the windowed ones. Unused slots go to a spare row past T.
        if out_BHTd.size(2) == T:
            out_BHTd = F.pad(out_BHTd, (0, 0, 0, 1))
        slot_BG = torch.where(valid_BG, idx_BG, T)
        index = slot_BG[:, None, :, None].expand(B, H, -1, d)
        return out_BHTd.scatter(2, index, out_BHGd.to(out_BHTd.dtype))[:, :, :T]

    # ------------------------------------------------------------------ global positions

    def _global_slots(
        self, B: int, T: int, global_mask_BT: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """(idx_BG positions in ascending order, valid_BG, is_global_BT) or None if no position
        is global. Batches with fewer global positions than G have invalid trailing slots."""
        static = [p for p in self.global_positions if p < T]
        is_global_BT = torch.zeros(B, T, dtype=torch.bool, device=device)
        is_global_BT[:, static] = True
        if global_mask_BT is None:
            if not static:
                return None
            idx_BG = torch.tensor(static, device=device).expand(B, -1)
            return idx_BG, torch.ones_like(idx_BG, dtype=torch.bool), is_global_BT
        is_global_BT = is_global_BT | global_mask_BT
        counts_B = is_global_BT.sum(dim=1)
        G = int(counts_B.max())  # one host sync, only for per-batch global masks
        if G == 0:
            return None
        # A stable sort of "not global" puts each row's global positions first, in order.
        idx_BG = torch.sort((~is_global_BT).to(torch.uint8), dim=1, stable=True).indices[:, :G]
        valid_BG = torch.arange(G, device=device) < counts_B[:, None]
        return idx_BG, valid_BG, is_global_BT

    def _global_rows(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, pad_BS: Tensor | None,
        idx_BG: Tensor, valid_BG: Tensor, dropout_p: float, scale: float,
        bias: OffsetBias | None,
    ) -> Tensor:
        """Dense attention of the global query rows over every key: [B, H, G, d]."""
        B, H, T, d = q.shape
        G = idx_BG.size(1)
        q_BHGd = q.gather(2, idx_BG[:, None, :, None].expand(B, H, G, d))
        allowed_B1GT = valid_BG[:, None, :, None].expand(B, 1, G, T)
        if pad_BS is not None:
            allowed_B1GT = allowed_B1GT & pad_BS[:, None, None, :]
        if causal:
            allowed_B1GT = allowed_B1GT & (
                torch.arange(T, device=q.device) <= idx_BG[:, None, :, None]
            )
        row_ok = allowed_B1GT.any(dim=-1, keepdim=True)
        mask = allowed_B1GT | ~row_ok
        if bias is not None:  # offsets key - query [1, B, G, T] -> bias [B, H, G, T]
            offsets = torch.arange(T, device=q.device) - idx_BG[None, :, :, None]
            bias_BHGT = bias(offsets).transpose(0, 1).to(q.dtype)
            mask = torch.where(mask, bias_BHGT, float("-inf"))
        out = F.scaled_dot_product_attention(
            q_BHGd, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
        return out.masked_fill(~row_ok, 0.0)

    # ------------------------------------------------------------------ windowed rows

    def _windowed(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, pad_BS: Tensor | None,
        glob: tuple[Tensor, Tensor, Tensor] | None, dropout_p: float, scale: float,
        bias: OffsetBias | None,
    ) -> Tensor:
        """Window (+ global keys) attention of every row: [B, H, L, d], L >= T padded rows."""
        B, H, T, d = q.shape
        r = self.dilation
        n = math.ceil(T / r)  # positions per residue class
        b = min(self.window, n)  # block rows; one block holds a whole class when n <= w
        nb = math.ceil(n / b)
        L = nb * b * r  # padded length

        def blocks(x: Tensor) -> Tensor:
            """[B, H, T, d] -> [B, H, r, nb, b, d]; position m*r + c -> class c, index m."""
            x = F.pad(x, (0, 0, 0, L - T))
            return x.reshape(B, H, nb * b, r, d).transpose(2, 3).reshape(B, H, r, nb, b, d)

        def mask_blocks(m_BT: Tensor) -> Tensor:
            """bool [B, T] -> [B, r, nb, b] (padding rows False)."""
            m_BT = F.pad(m_BT, (0, L - T), value=False)
            return m_BT.view(-1, nb * b, r).transpose(1, 2).reshape(-1, r, nb, b)

        q_blk = blocks(q * scale)  # [B, H, r, nb, b, d]
        k_blk, v_blk = blocks(k), blocks(v)

        # Keys a window may use: real positions, not padding, not global (those come below).
        key_ok_BT = torch.ones(B, T, dtype=torch.bool, device=q.device)
        if pad_BS is not None:
            key_ok_BT = key_ok_BT & pad_BS
        if glob is not None:
            key_ok_BT = key_ok_BT & ~glob[2]
        key_ok = neighbour_blocks(mask_blocks(key_ok_BT), -2, ahead=not causal)  # [B,r,nb,K]
        allowed = self._band(b, causal, q.device) & key_ok[:, None, :, :, None, :]
        bias_win = None
        if bias is not None:  # the same [H, b, K] in every block (module docstring)
            t = torch.arange(b, device=q.device)[:, None]
            u = torch.arange(allowed.size(-1), device=q.device)[None, :]
            bias_win = bias(((u - b - t) * r)[None])[None, :, None, None]  # [1, H, 1, 1, b, K]

        k_glob = v_glob = None
        row_pos = torch.arange(L, device=q.device).view(nb * b, r).T.reshape(r, nb, b)
        if glob is not None:
            # The G global keys join every window: G more columns of the same softmax.
            idx_BG, valid_BG, _ = glob
            G = idx_BG.size(1)
            index = idx_BG[:, None, :, None].expand(B, H, G, d)
            k_glob = k.gather(2, index)[:, :, None, None]  # [B, H, 1, 1, G, d]
            v_glob = v.gather(2, index)[:, :, None, None]
            g_ok_BG = valid_BG if pad_BS is None else valid_BG & pad_BS.gather(1, idx_BG)
            allowed_g = g_ok_BG[:, None, None, None, None, :]  # [B, 1, 1, 1, 1, G]
            if causal:
                allowed_g = allowed_g & (idx_BG[:, None, None, None, None, :]
                                         <= row_pos[None, None, :, :, :, None])
            allowed = torch.cat([allowed.expand(B, 1, r, nb, b, -1),
                                 allowed_g.expand(B, 1, r, nb, b, G)], dim=-1)
            if bias_win is not None:  # global columns: offsets [1, B, r, nb, b, G]
                offsets = idx_BG[None, :, None, None, None, :] - row_pos[None, None, ..., None]
                bias_g = bias(offsets).transpose(0, 1)  # [B, H, r, nb, b, G]
                bias_win = torch.cat([bias_win.expand(B, -1, r, nb, b, -1), bias_g], dim=-1)

        out, _, row_ok = window_attention(q_blk, k_blk, v_blk, allowed, ahead=not causal,
                                          extra_k=k_glob, extra_v=v_glob, dropout_p=dropout_p,
                                          bias=bias_win)
        out = out.masked_fill(~row_ok, 0.0)
        return out.view(B, H, r, nb * b, d).transpose(2, 3).reshape(B, H, L, d)

    def _band(self, b: int, causal: bool, device: torch.device) -> Tensor:
        """bool [b, K]: query row t of block m may see key column u of its window (blocks m-1,
        m, m+1) iff their distance in the residue class, (1 - part) * b + t - u', is <= w."""
        t = torch.arange(b, device=device)[:, None]
        u = torch.arange((2 if causal else 3) * b, device=device)[None, :]
        dist = b + t - u  # query index minus key index within the class
        band = dist.abs() <= self.window
        return band & (dist >= 0) if causal else band
