"""What every objective shares: per-sample random streams and finding the special tokens.

An objective is a pure function of a loader batch (data_pipeline/loader.py): it reads the
packed samples `input_ids` [M, seq_len + 1] and, for randomness, only the (epoch, sample id)
of each row and the run seed. So the inputs of a sample are fixed by (seed, epoch, sample),
fresh every epoch, independent of ranks, workers and batch layout, and a resumed run sees
exactly the inputs of an uninterrupted one. The loader applies it in its worker processes.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.format import TokenizerInfo


def sample_rng(tag: int, seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The random stream of one sample in one epoch. `tag` keeps objectives' streams apart."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [tag, int(seed), int(epoch), int(sample_id)])))


class SpecialTokenError(ValueError):
    """The tokenizer lacks a special token the model family needs."""


def _fix(family: str) -> str:
    preset = {"bert": "data/stdlib-bert", "t5": "data/stdlib-t5"}.get(family, "data/stdlib")
    return (f"Prepare the data with a tokenizer that has them (data.tokenizer.special_tokens and "
            f"data.tokenizer.sentinel_tokens, e.g. the preset configs/{preset}.yaml) and run "
            "`pretrain prepare` again, or point data.dir at data prepared for this family.")


def special_ids(tokenizer: TokenizerInfo, family: str, names: tuple[str, ...],
                *, need_pad: bool, sentinels: int = 0, where: str = "") -> dict[str, int]:
    """Ids of `names` (plus "pad" and "sentinels") in the tokenizer; SpecialTokenError naming
    everything that is missing, otherwise."""
    have = tokenizer.special_tokens
    missing = [n for n in names if n not in have]
    ids = {n: have[n] for n in names if n in have}
    if need_pad:
        if tokenizer.pad_id is None:
            missing.append("a padding token (a special token whose name contains 'pad')")
        else:
            ids["pad"] = tokenizer.pad_id
    sentinel_ids = [have.get(f"<extra_id_{i}>") for i in range(sentinels)]
    if None in sentinel_ids:
        found = sum(i is not None for i in sentinel_ids)
        missing.append(f"{sentinels} sentinel tokens <extra_id_0>..<extra_id_{sentinels - 1}> "
                       f"(found {found})")
    if missing:
        raise SpecialTokenError(
            f"model.family={family} needs special tokens that the tokenizer{where} lacks: "
            f"{'; '.join(missing)}. It has {sorted(have)}. {_fix(family)}")
    ids.update({f"<extra_id_{i}>": t for i, t in enumerate(sentinel_ids)})
    return ids
