"""Training or loading the tokenizer, and the settings that make encoding lossless.

The trained tokenizer is a byte-level BPE (GPT-2 style): the ByteLevel pre-tokenizer maps every
byte to one of 256 visible characters, so with all 256 in the initial alphabet any text encodes
without unknown tokens, and the ByteLevel decoder maps them back: decode(encode(text)) == text.
No normalizer, `add_prefix_space=False` (no space is invented before the first word), and the
special tokens take ids 0..k-1 in the configured order, followed by the T5 sentinels
<extra_id_0>, <extra_id_1>, ... that data.tokenizer.sentinel_tokens asks for. Each model family
finds the tokens it needs by name in the manifest (data_pipeline/objectives).

`encode_special_tokens = True` (not stored in tokenizer.json; `for_encoding` sets it) makes a
literal "<|endoftext|>" inside a document encode as ordinary text, so only the EOS the pipeline
appends is an EOS. Decode with `skip_special_tokens=False` to see the EOS tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.format import TokenizerInfo
from data_pipeline.sources import DataError
from pretrain.config import TokenizerConfig

MAX_RUN = 1024
"""Longest run of non-whitespace (or whitespace) characters that the tokenizer sees whole."""
# Unicode White_Space (what \s means to the pre-tokenizer's regex), all below U+3001.
_WHITESPACE = np.zeros(0x3002, dtype=bool)
_WHITESPACE[[0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
             0x2029, 0x202F, 0x205F, 0x3000]] = True
_PROBE = "def f(x):\n\treturn x  # caf\u00e9 \u4e2d\u6587 \U0001f600 <|endoftext|>\r\n  \ufffd"


def for_encoding(tok: Tokenizer) -> Tokenizer:
    """Encode special-token strings inside documents as plain text (see module docstring)."""
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(
    batches: Iterable[list[str]], tcfg: TokenizerConfig, progress: bool = False
) -> Tokenizer:
    """Byte-level BPE trained on `batches` of documents (lists of texts)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tcfg.vocab_size,
        min_frequency=tcfg.min_frequency,
        special_tokens=tcfg.all_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(batches, trainer)
    return for_encoding(tok)


def split_long_runs(text: str, max_run: int = MAX_RUN) -> list[str]:
    """`text` cut into pieces in which no run of non-whitespace (or whitespace) characters is
    longer than `max_run`; [text] itself when none is (the usual case, decided in numpy).

    Why: the byte-level pre-tokenizer makes such a run (a 50 MB line of base64 or minified
    code, a file of blanks) one "word", and BPE training is quadratic in a word's length (a
    200,000-character word took 15 s, 2 MB would take about an hour), encoding linear but
    memory-hungry (5.6 GB for a 50 MB word). Pieces encode independently and decode back to
    exactly `text`; only the tokens at the cuts inside such runs differ from encoding it whole.
    """
    if len(text) <= max_run:
        return [text]
    code = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # [n]
    space = _WHITESPACE[np.minimum(code, len(_WHITESPACE) - 1)]  # [n] bool
    edges = np.concatenate(([0], np.flatnonzero(space[1:] != space[:-1]) + 1, [len(code)]))
    lengths = np.diff(edges)  # [runs]
    long = np.flatnonzero(lengths > max_run)
    if len(long) == 0:
        return [text]
    cuts = np.concatenate([np.arange(edges[i] + max_run, edges[i + 1], max_run) for i in long])
    bounds = [0, *cuts.tolist(), len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def load_tokenizer(tcfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer.json at tcfg.path, checked to know the EOS token."""
    path = Path(os.path.expanduser(tcfg.path or ""))
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for missing/invalid files
        raise DataError(
            f"data.tokenizer.path: cannot load {path} as a Hugging Face tokenizer.json: {e}"
        ) from None
    if tok.token_to_id(tcfg.eos_token) is None:
        raise DataError(
            f"data.tokenizer.eos_token {tcfg.eos_token!r} is not in the vocabulary of {path}; "
            "set data.tokenizer.eos_token to one of its tokens"
        )
    return for_encoding(tok)


def round_trips(tok: Tokenizer, text: str = _PROBE) -> bool:
    ids = tok.encode(text, add_special_tokens=False).ids
    return tok.decode(ids, skip_special_tokens=False) == text


def id_bound(tok: Tokenizer) -> int:
    """One more than the largest token id (the vocabulary size a model needs)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(tok: Tokenizer) -> str:
    return "uint16" if id_bound(tok) <= 2**16 else "uint32"


def tokenizer_info(tok: Tokenizer, tcfg: TokenizerConfig, sha256: str) -> TokenizerInfo:
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    special = {t: tok.token_to_id(t) for t in tcfg.all_special_tokens()
               if tok.token_to_id(t) is not None}
    special = {**added, **special}
    pad = next((i for t, i in special.items() if "pad" in t.lower()), None)
    return TokenizerInfo(
        sha256=sha256,
        vocab_size=id_bound(tok),
        eos_token=tcfg.eos_token,
        eos_id=tok.token_to_id(tcfg.eos_token),
        pad_id=pad,
        special_tokens=dict(sorted(special.items(), key=lambda kv: kv[1])),
    )


def batched(texts: Iterable[str], max_bytes: int, batch: int = 256) -> Iterator[list[str]]:
    """Batches of texts holding at most `max_bytes` UTF-8 bytes in all; the last text is cut.
    Texts with overlong runs arrive as their pieces (split_long_runs)."""
    left, out = max_bytes, []
    for text in texts:
        if left <= 0:
            break
        size = len(text.encode("utf-8"))
        if size > left:
            text = text.encode("utf-8")[:left].decode("utf-8", "ignore")
            size = left
        out += split_long_runs(text)
        left -= size
        if len(out) >= batch:
            yield out
            out = []
    if out:
        yield out
