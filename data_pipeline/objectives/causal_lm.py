"""GPT's objective: predict every next token. A packed sample of seq_len + 1 tokens gives
inputs x[:-1] and labels x[1:], both seq_len long; nothing is random."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CausalLM:
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]  # [M, T + 1]
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
