"""Load-time objectives (data_pipeline/objectives): BERT's masking and sentence pairs, T5's span
corruption. Statistics over many samples match the configured parameters; the inputs are a
pure function of (seed, epoch, sample), so a resumed loader gives the same batches; a tokenizer
without the family's special tokens is refused, naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BERT_TINY, T5_TINY
from shards import make_dataset

from data_pipeline.format import TokenizerInfo
from data_pipeline.loader import ShardedLoader
from data_pipeline.objectives import (
    MaskedLM,
    SpanCorruption,
    SpecialTokenError,
    build_objective,
    compute_input_and_target_lengths,
    span_corruption_lengths,
)
from pretrain.config_io import ConfigError, load_config

VOCAB = 500
SPECIAL = {"<|endoftext|>": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
           **{f"<extra_id_{i}>": 5 + i for i in range(40)}}
EOS, PAD, CLS, SEP, MASK = 0, 1, 2, 3, 4
FIRST_TEXT = 5 + 40  # ids below are special


def tokenizer(special=SPECIAL) -> TokenizerInfo:
    return TokenizerInfo(sha256="test", vocab_size=VOCAB, eos_token="<|endoftext|>", eos_id=EOS,
                         pad_id=special.get("[PAD]"), special_tokens=special)


def objective(config, *overrides):
    cfg = load_config(config, list(overrides))
    return build_objective(cfg, tokenizer())


def raw_batch(n: int, length: int, seed: int = 0, eos_every: int | None = None,
              epoch: int = 0) -> dict[str, torch.Tensor]:
    """n packed samples of text tokens (and EOS every `eos_every` tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_TEXT, VOCAB, size=(n, length))
    if eos_every:
        ids[:, eos_every::eos_every] = EOS
    return {"input_ids": torch.from_numpy(ids), "sample_ids": torch.arange(n),
            "epochs": torch.full((n,), epoch), "positions": torch.arange(n)}


def originals(out: dict) -> torch.Tensor:
    """The unmasked tokens: labels where predicted, the input elsewhere."""
    return torch.where(out["labels"] != -100, out["labels"], out["input_ids"])


# ---- BERT: masking -------------------------------------------------------------------------------
def test_masking_statistics_match_the_parameters():
    obj = objective(BERT_TINY, "model.sentence_head=none", "data.seq_len=128",
                    "model.max_seq_len=128")
    batch = raw_batch(1500, 129)
    out = obj(batch)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.shape == labels.shape == (1500, 128)
    # [CLS] x[:126] [SEP]: 126 text tokens, round(0.15 * 126) = 19 chosen in every sequence
    assert (ids[:, 0] == CLS).all() and (ids[:, -1] == SEP).all()
    assert torch.equal(originals(out)[:, 1:-1], batch["input_ids"][:, :126])
    chosen = labels != -100
    assert (chosen.sum(1) == 19).all()
    assert not chosen[:, [0, -1]].any()  # specials are never predicted
    masked = (ids == MASK) & chosen
    replaced = chosen & (ids != MASK) & (ids != labels)
    kept = chosen & (ids == labels)
    total = chosen.sum().item()  # 28500
    assert masked.sum().item() / total == pytest.approx(0.8, abs=0.015)
    assert replaced.sum().item() / total == pytest.approx(0.1, abs=0.01)
    assert kept.sum().item() / total == pytest.approx(0.1, abs=0.01)
    assert (ids[replaced] >= FIRST_TEXT).all()  # random tokens are never special
    # every text position is chosen equally often (~15%)
    rate = chosen[:, 1:-1].float().mean(0)
    assert rate.min() > 0.11 and rate.max() < 0.19


def test_masking_is_fresh_per_epoch_and_deterministic():
    obj = objective(BERT_TINY, "model.sentence_head=none")
    a, b = obj(raw_batch(64, 33)), obj(raw_batch(64, 33))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = obj(raw_batch(64, 33, epoch=1))
    assert not torch.equal(a["labels"], c["labels"])
    # a row's masking depends on its (epoch, sample id) only, not its place in the batch
    batch = raw_batch(64, 33)
    perm = torch.randperm(64)
    shuffled = obj({k: v[perm] for k, v in batch.items()})
    assert torch.equal(shuffled["input_ids"], a["input_ids"][perm])
    other_seed = objective(BERT_TINY, "model.sentence_head=none", "run.seed=1")(batch)
    assert not torch.equal(other_seed["labels"], a["labels"])


# ---- BERT: sentence pairs ------------------------------------------------------------------------
def _segments(row_ids, row_types, row_mask):
    ids = row_ids[row_mask]
    seps = (ids == SEP).nonzero().flatten().tolist()
    assert ids[0] == CLS and len(seps) == 2 and seps[1] == len(ids) - 1
    types = row_types[row_mask]
    assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 :] == 1).all()
    return ids[1 : seps[0]], ids[seps[0] + 1 : -1]


def test_sentence_order_pairs():
    obj = objective(BERT_TINY, "model.sentence_head=sop")
    batch = raw_batch(800, 33, eos_every=11)  # EOS at 11 and 22: pieces of 11, 10, 10 tokens
    out = obj(batch)
    unmasked = originals(out)
    labels = out["sentence_labels"]
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.06)
    for i in range(800):
        a, b = _segments(unmasked[i], out["token_type_ids"][i], out["attention_mask"][i])
        piece = batch["input_ids"][i, :11]  # the longest piece
        first, second = (b, a) if labels[i] else (a, b)
        assert torch.equal(torch.cat([first, second]), piece)
        assert len(a) >= 1 and len(b) >= 1
        assert not out["attention_mask"][i, len(piece) + 3 :].any()  # padding after
        assert (out["input_ids"][i, len(piece) + 3 :] == PAD).all()


def test_next_sentence_pairs_take_negatives_from_another_row():
    obj = objective(BERT_TINY, "model.sentence_head=nsp")
    batch = raw_batch(400, 33)  # one document: the piece is its first T - 3 = 29 tokens
    out = obj(batch)
    unmasked, labels = originals(out), out["sentence_labels"]
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.08)
    for i in range(400):
        a, b = _segments(unmasked[i], out["token_type_ids"][i], out["attention_mask"][i])
        piece = batch["input_ids"][i, :29]
        assert torch.equal(a, piece[: len(a)])
        if labels[i]:  # not next: as many tokens from the start of the next row's piece
            assert torch.equal(b, batch["input_ids"][(i + 1) % 400, : 29 - len(a)])
        else:
            assert torch.equal(b, piece[len(a) :])


# ---- T5: span corruption -------------------------------------------------------------------------
def test_t5_lengths_are_those_of_the_paper():
    # T5's compute_input_and_target_lengths(512, 0.15, 3) = (568, 114)
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    lengths = span_corruption_lengths(568, 0.15, 3.0)
    assert (lengths.inputs, lengths.targets, lengths.noise_tokens, lengths.noise_spans) == (
        512, 114, 85, 28)


def _spans(row: list[int], sentinels: set[int]) -> list[list[int]]:
    """The runs after each sentinel (up to the next sentinel or the end)."""
    out: list[list[int]] = []
    for t in row:
        if t in sentinels:
            out.append([])
        elif out:
            out[-1].append(t)
    return out


def test_span_corruption_statistics_and_reconstruction():
    obj = objective(T5_TINY, "data.seq_len=128", "model.max_seq_len=128",
                    "data.tokenizer.sentinel_tokens=40")
    assert isinstance(obj, SpanCorruption)
    lengths = obj.lengths  # 129 tokens: 19 noise in 6 spans
    assert (lengths.noise_tokens, lengths.noise_spans, lengths.inputs, lengths.targets) == (
        19, 6, 129 - 19 + 6 + 1, 19 + 6 + 1)
    batch = raw_batch(1000, 129)
    out = obj(batch)
    inputs, labels, dec = out["input_ids"], out["labels"], out["decoder_input_ids"]
    assert inputs.shape == (1000, lengths.inputs) and labels.shape == (1000, lengths.targets)
    assert (inputs[:, -1] == EOS).all() and (labels[:, -1] == EOS).all()
    assert torch.equal(dec[:, 1:], labels[:, :-1]) and (dec[:, 0] == PAD).all()
    sentinels = list(obj.sentinel_ids)
    noise_rate = torch.zeros(129)
    span_lengths = []
    for i in range(1000):
        x, y = inputs[i, :-1].tolist(), labels[i, :-1].tolist()
        assert [t for t in x if t in sentinels] == sentinels[:6]  # in order, once each
        assert [t for t in y if t in sentinels] == sentinels[:6]
        assert x[0] not in sentinels  # a noise span never starts the sample
        spans = _spans(y, set(sentinels))
        span_lengths += [len(s) for s in spans]
        assert all(spans)  # no empty span
        rebuilt, k = [], 0
        for t in x:  # put the spans back
            if t in sentinels:
                noise_rate[len(rebuilt) : len(rebuilt) + len(spans[k])] += 1
                rebuilt += spans[k]
                k += 1
            else:
                rebuilt.append(t)
        assert rebuilt == batch["input_ids"][i].tolist()
    assert np.mean(span_lengths) == pytest.approx(19 / 6)
    noise_rate /= 1000
    assert noise_rate.mean().item() == pytest.approx(19 / 129)
    # as in T5, the spans alternate kept / noise starting with kept and ending with noise: the
    # first token is always kept, the last always noise, and in between noise is spread evenly
    assert noise_rate[0] == 0 and noise_rate[-1] == 1
    assert noise_rate[20:100].min() > 0.09 and noise_rate[20:100].max() < 0.2
    again = obj(batch)
    assert torch.equal(again["input_ids"], inputs)
    assert not torch.equal(obj(raw_batch(1000, 129, epoch=1))["labels"], labels)


# ---- through the loader: resume gives the same batches -------------------------------------------
@pytest.mark.parametrize("config", [BERT_TINY, T5_TINY], ids=["bert", "t5"])
def test_resumed_loader_gives_the_same_inputs(config, tmp_path):
    make_dataset(tmp_path, {"train": [7, 12, 5, 9], "val": [4]}, seq_len=32, vocab_size=VOCAB)
    obj = objective(config, "data.tokenizer.sentinel_tokens=8")
    kw = dict(micro_batch_size=4, seed=3, num_workers=1, transform=obj)
    whole = ShardedLoader(tmp_path, **kw)
    it = iter(whole)
    batches = [next(it) for _ in range(12)]  # past the end of the first epoch (33 samples)
    it.close()
    part = ShardedLoader(tmp_path, **kw)
    it = iter(part)
    [next(it) for _ in range(5)]
    state = part.state_dict()
    it.close()
    resumed = ShardedLoader(tmp_path, **kw)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for expected in batches[5:]:
        got = next(it)
        assert got["inputs"].keys() == expected["inputs"].keys()
        for k, v in expected["inputs"].items():
            assert torch.equal(got["inputs"][k], v), k
    it.close()
    # the same sample in the next epoch gets other inputs (position p and p + 33)
    assert batches[0]["epochs"].tolist() == [0] * 4
    assert batches[8]["epochs"].tolist() == [0, 1, 1, 1]


# ---- the tokenizer must carry the family's tokens ------------------------------------------------
def test_missing_special_tokens_are_named():
    gpt_tokens = {"<|endoftext|>": 0, "<|pad|>": 1}
    cfg = load_config(BERT_TINY)
    with pytest.raises(SpecialTokenError) as e:
        build_objective(cfg, tokenizer(gpt_tokens), "data/stdlib")
    msg = str(e.value)
    assert "[CLS]" in msg and "[SEP]" in msg and "[MASK]" in msg and "data/stdlib" in msg
    assert "configs/data/stdlib-bert.yaml" in msg
    cfg = load_config(T5_TINY)
    with pytest.raises(SpecialTokenError, match=r"2 sentinel tokens .*found 0"):
        build_objective(cfg, tokenizer(gpt_tokens))
    assert isinstance(build_objective(load_config(BERT_TINY), tokenizer()), MaskedLM)


def test_config_refuses_a_tokenizer_without_the_family_tokens():
    with pytest.raises(ConfigError) as e:
        load_config(BERT_TINY, ["data.tokenizer.special_tokens=['<|endoftext|>','[CLS]']"])
    assert "data.tokenizer.special_tokens: model.family=bert needs [SEP], [MASK], a padding" \
        in str(e.value)
    with pytest.raises(ConfigError, match=r"data.tokenizer.sentinel_tokens: span corruption of "
                                          r"data.seq_len \+ 1 = 33 tokens makes 2 spans"):
        load_config(T5_TINY, ["data.tokenizer.sentinel_tokens=1"])
    with pytest.raises(ConfigError) as e:
        load_config(BERT_TINY, ["model.positions=relative", "model.n_decoder_layer=2"])
    assert "model.positions" in str(e.value) and "model.n_decoder_layer" in str(e.value)
