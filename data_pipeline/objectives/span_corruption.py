"""T5's objective: span corruption (Raffel et al. 2020, section 3.1.4), at load time.

Each packed sample of L = seq_len + 1 tokens is corrupted as a whole:

    tokens   x1 x2 x3 x4 x5 x6 x7 x8 x9            noise: x3 x4, x8
    inputs   x1 x2 <extra_id_0> x5 x6 x7 <extra_id_1> x9 EOS
    labels   <extra_id_0> x3 x4 <extra_id_1> x8 EOS
    decoder_input_ids   PAD <extra_id_0> x3 x4 <extra_id_1> x8     (labels shifted right)

round(L * noise_density) tokens are noise, in round(noise / mean_span_length) spans; the noise
and the non-noise tokens are each split into that many non-empty spans uniformly at random
and interleaved, starting with non-noise (T5's random_spans_noise_mask). Because the counts
depend on L only, every sample gives inputs and labels of the same lengths,

    inputs = L - noise + spans + 1,   labels = noise + spans + 1,

so nothing is truncated and nothing padded. `compute_input_and_target_lengths` answers the
reverse question of the T5 code base: how many raw tokens give encoder inputs of a chosen
length (set data.seq_len to that minus one). The random stream is the sample's (seed, epoch,
sample id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.objectives.base import sample_rng

_SPAN_TAG = 0x5350414E  # "SPAN"


@dataclass(frozen=True)
class SpanLengths:
    raw: int
    """Tokens corrupted per sample (L)."""
    noise_tokens: int
    noise_spans: int
    inputs: int
    """Encoder input length: non-noise tokens, one sentinel per span, EOS."""
    targets: int
    """Decoder length: one sentinel per span, the noise tokens, EOS."""


def span_corruption_lengths(raw_len: int, noise_density: float,
                            mean_span_length: float) -> SpanLengths:
    """The counts of span corruption of `raw_len` tokens (as T5's random_spans_noise_mask)."""
    if raw_len < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {raw_len}")
    noise = min(max(int(round(raw_len * noise_density)), 1), raw_len - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    spans = min(spans, raw_len - noise)  # every noise span follows a non-empty non-noise span
    return SpanLengths(raw=raw_len, noise_tokens=noise, noise_spans=spans,
                       inputs=raw_len - noise + spans + 1, targets=noise + spans + 1)


def compute_input_and_target_lengths(inputs_length: int, noise_density: float,
                                     mean_span_length: float) -> tuple[int, int]:
    """(raw tokens, target length) for encoder inputs of at most `inputs_length` tokens: the
    largest raw length whose corrupted inputs fit (the T5 code base's helper of this name)."""
    raw = inputs_length
    while span_corruption_lengths(raw + 1, noise_density, mean_span_length).inputs <= inputs_length:
        raw += 1
    return raw, span_corruption_lengths(raw, noise_density, mean_span_length).targets


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of n_items into n_segments non-empty parts."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def random_spans_noise_mask(lengths: SpanLengths, rng: np.random.Generator) -> np.ndarray:
    """Bool [raw]: True at the noise tokens (the spans that are removed into the labels)."""
    noise_len = _random_segmentation(lengths.noise_tokens, lengths.noise_spans, rng)
    keep_len = _random_segmentation(lengths.raw - lengths.noise_tokens, lengths.noise_spans, rng)
    mask = np.zeros(lengths.raw, dtype=bool)
    pos = 0
    for keep, noise in zip(keep_len, noise_len):
        pos += keep
        mask[pos : pos + noise] = True
        pos += noise
    return mask


def replace_spans(tokens: np.ndarray, spans: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """tokens with every run of `spans` replaced by the next sentinel (the others kept)."""
    starts = spans & ~np.concatenate([[False], spans[:-1]])
    out = np.where(starts, 0, tokens)
    out[starts] = sentinels[: int(starts.sum())]
    return out[~spans | starts]


@dataclass(frozen=True)
class SpanCorruption:
    lengths: SpanLengths
    seed: int
    eos_id: int
    pad_id: int
    """Also the decoder's start token, as in T5."""
    sentinel_ids: tuple[int, ...]
    """<extra_id_0>, <extra_id_1>, ...: at least lengths.noise_spans of them."""

    def corrupt(self, tokens: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one sample, EOS-terminated."""
        noise = random_spans_noise_mask(self.lengths, rng)
        sentinels = np.asarray(self.sentinel_ids, dtype=np.int64)
        inputs = np.append(replace_spans(tokens, noise, sentinels), self.eos_id)
        labels = np.append(replace_spans(tokens, ~noise, sentinels), self.eos_id)
        return inputs, labels

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raw = batch["input_ids"].numpy()  # [M, L]
        if raw.shape[1] != self.lengths.raw:
            raise ValueError(f"span corruption was set up for samples of {self.lengths.raw} "
                             f"tokens, got {raw.shape[1]}")
        epochs, ids = batch["epochs"].tolist(), batch["sample_ids"].tolist()
        M = len(raw)
        inputs = np.empty((M, self.lengths.inputs), dtype=np.int64)
        labels = np.empty((M, self.lengths.targets), dtype=np.int64)
        for i in range(M):
            rng = sample_rng(_SPAN_TAG, self.seed, epochs[i], ids[i])
            inputs[i], labels[i] = self.corrupt(raw[i].astype(np.int64), rng)
        decoder_input_ids = np.concatenate([np.full((M, 1), self.pad_id), labels[:, :-1]], axis=1)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "decoder_input_ids": torch.from_numpy(decoder_input_ids)}
