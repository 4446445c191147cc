"""What a Hugging Face export can express: one check for every family's exporter.

Hugging Face's BERT, GPT-2 and T5 classes have dense attention and one residual stream. A model
built with a long-context kernel or reversible layers computes a different function, so
exporting its weights into those classes would produce a model that loads and silently gives
other outputs. Exporters call `require_hf_expressible` first and refuse with every reason at
once. (transformers' own Longformer and Reformer models are different architectures: encoder
only, or axial positions and other LSH details, so they are no target either.)
"""

from __future__ import annotations

from pretrain.config import ModelConfig


def hf_export_problems(cfg: ModelConfig) -> list[str]:
    """Why a model built from `cfg` has no Hugging Face equivalent (empty: it has one)."""
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


def require_hf_expressible(cfg: ModelConfig, target: str) -> None:
    """Raise ValueError naming every setting that `target` (e.g. "GPT2LMHeadModel") cannot
    express."""
    problems = hf_export_problems(cfg)
    if problems:
        raise ValueError(
            f"cannot export this model to Hugging Face {target}: " + "; ".join(problems)
            + ". Only models with model.attention.kind=dense and model.reversible=false export "
            "(model.ff_chunk_size is fine: it does not change the function)."
        )
