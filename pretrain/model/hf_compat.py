"""What a Hugging Face export can express: the checks every family's exporter shares.

Hugging Face's BERT, GPT-2 and T5 classes have dense attention and one residual stream. A model
built with a long-context kernel or reversible layers computes a different function, so
exporting its weights into those classes would produce a model that loads and silently gives
other outputs. Each family's `export_problems` (hf_gpt2.py, hf_bert.py, hf_t5.py) adds these
shared problems to its own, and its exporters call `require_hf_expressible` first, which refuses
with every reason at once. (transformers' own Longformer and Reformer models are different
architectures: encoder only, or axial positions and other LSH details, so they are no target
either.)
"""

from __future__ import annotations

from collections.abc import Sequence

from pretrain.config import ModelConfig


def hf_export_problems(cfg: ModelConfig) -> list[str]:
    """Why a model built from `cfg` has no Hugging Face equivalent in any family (empty: none
    of these reasons)."""
    problems = []
    if cfg.attention.kind != "dense":
        problems.append(
            f"model.attention.kind={cfg.attention.kind!r}: Hugging Face's BERT/GPT-2/T5 classes "
            "have dense attention only"
        )
    if cfg.reversible:
        problems.append(
            "model.reversible=true: reversible layers keep two residual streams, Hugging Face's "
            "classes one"
        )
    return problems


def require_hf_expressible(target: str, problems: Sequence[str]) -> None:
    """Raise ValueError naming every problem (a family's export_problems) that keeps `target`
    (e.g. "GPT2LMHeadModel") from expressing the model."""
    if problems:
        raise ValueError(
            f"{target} cannot express this model, so it is not exported: " + "; ".join(problems)
            + ". Export needs a configuration that class computes (model.attention.kind=dense "
            "and model.reversible=false among others; model.ff_chunk_size is fine: it does not "
            "change the function)."
        )
