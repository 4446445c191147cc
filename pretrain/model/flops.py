"""Model FLOPs per token and model FLOPs utilization (MFU), as defined in PaLM (Chowdhery et
al. 2022, appendix B).

Training one token costs

    6 N + 12 L H Q T   FLOPs

* 6 N: every parameter takes part in one multiply-add (2 FLOPs) in the forward pass and two in
  the backward pass (gradients w.r.t. activations and w.r.t. weights): 2 + 4 = 6 per parameter.
  N is the number of NON-EMBEDDING parameters: the token embedding, learned position table and
  output head (tied or not) are left out, following PaLM and Kaplan et al. 2020. The output
  head's matmul (6 V D per token) is therefore not counted, which understates the work of small
  models with large vocabularies; the convention keeps numbers comparable with published MFU.
* 12 L H Q T: the two attention matmuls (q k^T and probabilities x v) per layer, L layers, H
  heads of size Q, over a context of T tokens: 2 matmuls x 2 FLOPs x H Q T forward, times 3
  with the backward pass. T is the full sequence length even for causal attention (PaLM's
  convention; a kernel that skips the masked half does about half of this work).

MFU = (tokens per second x FLOPs per token) / peak FLOP/s of the hardware. Recomputation
(activation checkpointing) is not counted: MFU measures useful work only.
"""

from __future__ import annotations


def transformer_flops_per_token(
    *, n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: float
) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L H Q T.

    n_params: non-embedding parameter count N; seq_len: attention context T, the keys each
    query is scored against (the sequence length for dense attention; for sliding-window or
    LSH attention the keys of its window, see AttentionKernel.keys_per_query).
    """
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def model_flops_utilization(
    tokens_per_second: float, flops_per_token: float, peak_flops_per_second: float
) -> float:
    """Fraction of the hardware's peak spent on model FLOPs (all devices: pass the summed
    throughput and summed peak, or both per device)."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_second}")
    return tokens_per_second * flops_per_token / peak_flops_per_second
