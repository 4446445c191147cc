"""Sampling from trained models, one function per family, so users see what a model learned.

    gpt   continue a prompt token by token; one KVCache per block keeps the keys and values of
          the tokens so far, so each new token costs one position's forward (use_cache=False
          recomputes the whole prefix: the same tokens, slower; so do models with a
          long-context kernel, which need the whole sequence at once)
    t5    fill the sentinel spans of a prompt: encode it once, decode "<extra_id_0> span0
          <extra_id_1> span1 ... EOS", then put each span in place of its sentinel
    bert  fill the [MASK] tokens of a prompt in one forward (top candidates per mask)

Sampling (`Sampling`): logits / temperature, then the top_k most likely tokens, then the
smallest set whose probability reaches top_p (nucleus), then a draw from a seeded generator;
temperature 0 is greedy.

Shape legend: B batch (1 here), T positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pretrain.model.attention import AttentionKernel, KVCache


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def filtered_logits(self, logits_BV: Tensor) -> Tensor:
        """Logits after temperature, top-k and top-p; excluded tokens are -inf."""
        logits_BV = logits_BV.float() / max(self.temperature, 1e-8)
        if self.top_k is not None and self.top_k < logits_BV.size(-1):
            kth = torch.topk(logits_BV, self.top_k, dim=-1).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_BV, order_BV = torch.sort(logits_BV, descending=True, dim=-1)
            cum = sorted_BV.softmax(-1).cumsum(-1)
            drop = cum - sorted_BV.softmax(-1) >= self.top_p  # the mass before it already suffices
            logits_BV = logits_BV.masked_fill(drop.scatter(-1, order_BV, drop), float("-inf"))
        return logits_BV

    def __call__(self, logits_BV: Tensor) -> Tensor:
        """Next token ids [B]."""
        if self.temperature == 0:
            return logits_BV.argmax(-1)
        probs = self.filtered_logits(logits_BV).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


@torch.no_grad()
def generate_gpt(model, prompt: list[int], *, max_new_tokens: int, eos_id: int | None,
                 sampling: Sampling, use_cache: bool = True) -> list[int]:
    """The new tokens after `prompt` (stops at EOS, max_new_tokens or model.max_seq_len)."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    room = model.cfg.max_seq_len - len(prompt)
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model takes at most "
                         f"{model.cfg.max_seq_len}")
    ids = torch.tensor([prompt])
    use_cache = use_cache and all(
        m.scores_all_pairs for m in model.modules() if isinstance(m, AttentionKernel))
    caches = [KVCache() for _ in model.h] if use_cache else None
    logits = model(ids, kv_caches=caches).logits[:, -1]
    out: list[int] = []
    for _ in range(min(max_new_tokens, room)):
        nxt = sampling(logits)
        out.append(int(nxt))
        if eos_id is not None and out[-1] == eos_id:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        step_ids = nxt[:, None] if use_cache else ids
        logits = model(step_ids, kv_caches=caches).logits[:, -1]
    return out


@torch.no_grad()
def generate_t5(model, inputs: list[int], *, max_new_tokens: int, start_id: int, eos_id: int,
                sampling: Sampling) -> list[int]:
    """Decoder output for encoder `inputs`, without the start token and the final EOS."""
    enc = model.encode(torch.tensor([inputs]))
    dec = [start_id]
    for _ in range(max_new_tokens):
        logits = model.decode(torch.tensor([dec]), enc)[:, -1]
        nxt = int(sampling(logits))
        if nxt == eos_id:
            break
        dec.append(nxt)
    return dec[1:]


def fill_spans(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """`inputs` with each sentinel replaced by the tokens that follow it in `targets`."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets:
        if t in sentinels:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs:
        out += spans.get(t, [t]) if t in sentinels else [t]
    return out


@torch.no_grad()
def fill_masks(model, ids: list[int], *, mask_id: int, sampling: Sampling,
               top: int = 5) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """(ids with every [MASK] filled, per mask its `top` candidates with probabilities)."""
    x = torch.tensor([ids])
    logits = model(x).logits[0]  # [T, V]
    where = (x[0] == mask_id).nonzero().flatten().tolist()
    filled, candidates = list(ids), []
    for pos in where:
        probs = logits[pos].float().softmax(-1)
        best = torch.topk(probs, min(top, probs.numel()))
        candidates.append(list(zip(best.indices.tolist(), best.values.tolist())))
        filled[pos] = int(sampling(logits[pos][None]))
    return filled, candidates
