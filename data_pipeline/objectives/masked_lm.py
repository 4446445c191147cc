"""BERT's objective: sequences with [CLS]/[SEP] built from the packed samples, dynamic masking,
and sentence pairs when the model has a sentence head.

Where the segments come from. The pipeline packs documents back to back, each ending in the
EOS token, into samples of seq_len + 1 tokens (packing.py); the EOS tokens are the document
boundaries, so no extra metadata is stored. From one sample:

* sentence_head=none (RoBERTa's FULL-SENTENCES): [CLS] x[0 : T-2] [SEP], where T = seq_len
  and every EOS inside becomes [SEP], the separator between documents. Never padded.
* sentence_head=sop / nsp: the sample is split at its EOS tokens into document pieces and the
  longest piece (the first of equals), cut to T - 3 tokens, is split at a uniformly random
  point into A and B: [CLS] A [SEP] B [SEP], token types 0 for [CLS] A [SEP] and 1 for B [SEP],
  padded with [PAD] (attention_mask False) when the piece is shorter than T - 3.
  - sop (ALBERT's sentence order): with probability 1/2 A and B are swapped; label 1 = swapped.
  - nsp (BERT's next sentence): with probability 1/2 B is replaced by as many tokens from the
    longest piece of the next row of the micro-batch (another random place in the corpus);
    label 1 = B is not the continuation (Hugging Face's next_sentence_label convention). In a
    one-row batch (the last evaluation batch) that piece is the row's own, from its start.
    NSP therefore depends on the micro-batch layout: a resume keeps it (same micro_batch_size);
    sop, none and the masking depend on nothing but the sample.

Masking (Devlin et al. 2019, dynamic as in RoBERTa): of the n text tokens of a sequence (not
[CLS], [SEP], [PAD] or any other special token), round(mask_prob * n) (at least one) are
chosen uniformly without replacement; each chosen token becomes [MASK] with probability
mask_token_prob, a uniformly random non-special token with probability random_token_prob, and
stays otherwise. labels hold the original token at chosen positions and -100 elsewhere. The
random stream is the sample's (seed, epoch, sample id), so each epoch masks differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data_pipeline.objectives.base import sample_rng

IGNORE = -100
_MLM_TAG = 0x4D4C4D  # "MLM"


@dataclass(frozen=True)
class MaskedLM:
    seq_len: int
    """T: length of the model's input sequence."""
    seed: int
    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    eos_id: int
    special: tuple[int, ...]
    """Every special token id: never chosen for prediction, never drawn as a random token."""
    vocab_size: int
    """Token ids are below this (the tokenizer's size)."""
    sentence_head: str = "none"
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    _normal_ids: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        normal = np.setdiff1d(np.arange(self.vocab_size), np.array(self.special, dtype=np.int64))
        object.__setattr__(self, "_normal_ids", normal)

    # ---- segments ------------------------------------------------------------------------------
    def single(self, sample: np.ndarray) -> np.ndarray:
        """[CLS] x[:T-2] [SEP] with document boundaries (EOS) as [SEP]: [T]."""
        body = np.where(sample[: self.seq_len - 2] == self.eos_id, self.sep_id,
                        sample[: self.seq_len - 2])
        return np.concatenate([[self.cls_id], body, [self.sep_id]])

    def longest_piece(self, sample: np.ndarray) -> np.ndarray:
        """The longest run of tokens between EOS tokens, cut to T - 3."""
        bounds = np.flatnonzero(sample == self.eos_id)
        starts = np.concatenate([[0], bounds + 1])
        ends = np.concatenate([bounds, [len(sample)]])
        k = int(np.argmax(ends - starts))
        return sample[starts[k] : ends[k]][: self.seq_len - 3]

    def pair(self, piece: np.ndarray, partner: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, token types, label) of [CLS] A [SEP] B [SEP]; partner: the piece NSP draws
        its negatives from."""
        n = len(piece)
        cut = int(rng.integers(1, n)) if n >= 2 else n
        a, b = piece[:cut], piece[cut:]
        label = int(rng.random() < 0.5)
        if label and self.sentence_head == "sop":
            a, b = b, a
        elif label:  # nsp: B from elsewhere, as long as the continuation would have been
            b = partner[: n - cut]
        tokens = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
        types = np.zeros(len(tokens), dtype=np.int64)
        types[len(a) + 2 :] = 1
        return tokens, types, label

    # ---- masking -------------------------------------------------------------------------------
    def mask(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(masked tokens, labels) as described in the module docstring."""
        candidates = np.flatnonzero(~np.isin(tokens, self.special))
        labels = np.full(len(tokens), IGNORE, dtype=np.int64)
        if len(candidates) == 0:
            return tokens, labels
        k = max(1, int(round(self.mask_prob * len(candidates))))
        chosen = rng.choice(candidates, size=k, replace=False)
        labels[chosen] = tokens[chosen]
        out = tokens.copy()
        u = rng.random(k)
        to_mask = u < self.mask_token_prob
        to_random = (~to_mask) & (u < self.mask_token_prob + self.random_token_prob)
        out[chosen[to_mask]] = self.mask_id
        out[chosen[to_random]] = self._normal_ids[rng.integers(0, len(self._normal_ids),
                                                               int(to_random.sum()))]
        return out, labels

    # ---- the batch -----------------------------------------------------------------------------
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raw = batch["input_ids"].numpy()  # [M, T + 1]
        epochs, ids = batch["epochs"].tolist(), batch["sample_ids"].tolist()
        M, T = len(raw), self.seq_len
        input_ids = np.full((M, T), self.pad_id, dtype=np.int64)
        labels = np.full((M, T), IGNORE, dtype=np.int64)
        if self.sentence_head == "none":
            for i in range(M):
                rng = sample_rng(_MLM_TAG, self.seed, epochs[i], ids[i])
                input_ids[i], labels[i] = self.mask(self.single(raw[i]), rng)
            return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}

        token_types = np.zeros((M, T), dtype=np.int64)
        attention_mask = np.zeros((M, T), dtype=bool)
        sentence_labels = np.zeros(M, dtype=np.int64)
        pieces = [self.longest_piece(row) for row in raw]
        for i in range(M):
            rng = sample_rng(_MLM_TAG, self.seed, epochs[i], ids[i])
            tokens, types, sentence_labels[i] = self.pair(pieces[i], pieces[(i + 1) % M], rng)
            n = len(tokens)
            input_ids[i, :n], labels[i, :n] = self.mask(tokens, rng)
            token_types[i, :n] = types
            attention_mask[i, :n] = True
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "token_type_ids": torch.from_numpy(token_types),
            "attention_mask": torch.from_numpy(attention_mask),
            "sentence_labels": torch.from_numpy(sentence_labels),
        }
