"""Pretraining objectives: the model's inputs, computed from packed samples at load time.

Every family reads the same shards through the same loader; `model.family` picks the function
that turns a batch of packed samples into the keyword arguments of the model's forward:

    gpt   CausalLM        input_ids, labels (next tokens)
    bert  MaskedLM        input_ids, labels (masked tokens) [, token_type_ids, attention_mask,
                          sentence_labels]
    t5    SpanCorruption  input_ids, decoder_input_ids, labels

Each is a pure function of the batch seeded per sample by (run seed, epoch, sample id) (see
base.py), applied by the loader in its workers (`ShardedLoader(transform=...)`), so the
exactly-once order and the resume state are those of the loader alone.
"""

from __future__ import annotations

from typing import Callable

import torch

from data_pipeline.format import TokenizerInfo
from data_pipeline.objectives.base import SpecialTokenError, sample_rng, special_ids
from data_pipeline.objectives.causal_lm import CausalLM
from data_pipeline.objectives.masked_lm import MaskedLM
from data_pipeline.objectives.span_corruption import (
    SpanCorruption,
    SpanLengths,
    compute_input_and_target_lengths,
    random_spans_noise_mask,
    span_corruption_lengths,
)
from pretrain.config import FAMILY_SPECIAL_TOKENS, Config

Objective = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def build_objective(cfg: Config, tokenizer: TokenizerInfo, where: str = "") -> Objective:
    """The objective of cfg.model.family for data with this tokenizer (the manifest's).

    Raises SpecialTokenError naming every special token the family needs and `where` (the
    data directory) lacks.
    """
    family, obj = cfg.model.family, cfg.objective
    where = f" of {where}" if where else ""
    if family == "gpt":
        return CausalLM()
    if family == "bert":
        ids = special_ids(tokenizer, family, FAMILY_SPECIAL_TOKENS["bert"], need_pad=True,
                          where=where)
        return MaskedLM(
            seq_len=cfg.data.seq_len, seed=cfg.run.seed, cls_id=ids["[CLS]"],
            sep_id=ids["[SEP]"], mask_id=ids["[MASK]"], pad_id=ids["pad"],
            eos_id=tokenizer.eos_id, special=tuple(sorted(set(tokenizer.special_tokens.values()))),
            vocab_size=tokenizer.vocab_size, sentence_head=cfg.model.sentence_head,
            mask_prob=obj.mask_prob, mask_token_prob=obj.mask_token_prob,
            random_token_prob=obj.random_token_prob,
        )
    if family == "t5":
        lengths = span_corruption_lengths(cfg.data.seq_len + 1, obj.noise_density,
                                          obj.mean_span_length)
        ids = special_ids(tokenizer, family, FAMILY_SPECIAL_TOKENS["t5"], need_pad=True,
                          sentinels=lengths.noise_spans, where=where)
        return SpanCorruption(
            lengths=lengths, seed=cfg.run.seed, eos_id=tokenizer.eos_id, pad_id=ids["pad"],
            sentinel_ids=tuple(ids[f"<extra_id_{i}>"] for i in range(lengths.noise_spans)),
        )
    raise ValueError(f"model.family={family!r} has no objective")


__all__ = [
    "CausalLM", "MaskedLM", "Objective", "SpanCorruption", "SpanLengths", "SpecialTokenError",
    "build_objective", "compute_input_and_target_lengths", "random_spans_noise_mask",
    "sample_rng", "span_corruption_lengths",
]
