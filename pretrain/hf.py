"""Hugging Face interop for every family: our model <-> a directory `from_pretrained` loads.

    family  Hugging Face class                            mapping
    gpt     GPT2LMHeadModel                               pretrain/model/hf_gpt2.py
    bert    BertForMaskedLM / BertForPreTraining (head)   pretrain/model/hf_bert.py
    t5      T5ForConditionalGeneration                    pretrain/model/hf_t5.py

Export writes config.json and model.safetensors (save_pretrained) and the tokenizer
(tokenizer.json + tokenizer_config.json, with the family's special tokens named and, for bert
and t5, the post-processor that frames inputs as the model was trained: [CLS] ... [SEP], or
... EOS). A config a class cannot express is refused with every such setting named. Import reads
such a directory back into our `model:` keys and state dict; import -> export gives the same
tensors. transformers is imported only here and in the mapping modules' functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from data_pipeline.format import TokenizerInfo
from pretrain.config import ModelConfig
from pretrain.model import hf_bert, hf_gpt2, hf_t5

MAPPINGS = {"gpt": hf_gpt2, "bert": hf_bert, "t5": hf_t5}
MODEL_TYPES = {"gpt2": "gpt", "bert": "bert", "t5": "t5"}
"""Hugging Face model_type -> our family."""
IMPORTABLE = {"gpt": ("GPT2LMHeadModel",), "bert": ("BertForMaskedLM", "BertForPreTraining"),
              "t5": ("T5ForConditionalGeneration",)}


class InteropError(ValueError):
    """The model or directory cannot be converted; the message names what and why."""


def export_problems(cfg: ModelConfig) -> list[str]:
    return MAPPINGS[cfg.family].export_problems(cfg)


def _hf_config(model: nn.Module, tok: TokenizerInfo):
    family = model.cfg.family
    if family == "gpt":
        return hf_gpt2.gpt_to_hf_config(model, eos_token_id=tok.eos_id)
    if family == "bert":
        return hf_bert.hf_config(model, pad_token_id=tok.pad_id)
    return hf_t5.hf_config(model, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)


def _hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    if model.cfg.family == "gpt":
        return hf_gpt2.gpt_to_hf_state_dict(model)
    return MAPPINGS[model.cfg.family].to_hf_state_dict(model)


def to_hf_model(model: nn.Module, tok: TokenizerInfo):
    """The Hugging Face model (fp32, CPU, eval mode) computing what `model` computes."""
    import transformers

    cfg = model.cfg
    problems = export_problems(cfg)
    if problems:
        name = MAPPINGS[cfg.family].hf_class_name(cfg)
        raise InteropError(f"{name} cannot express this model: " + "; ".join(problems))
    hf_cfg = _hf_config(model, tok)
    hf = getattr(transformers, MAPPINGS[cfg.family].hf_class_name(cfg))(hf_cfg)
    state = {k: v.float().cpu() for k, v in _hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    buffers = {name for name, _ in hf.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise InteropError(f"export to {type(hf).__name__} does not match its layout: missing "
                           f"{missing}, unexpected {unexpected} (did transformers change it?)")
    return hf.eval()


def hf_tokenizer(tokenizer_file: str | Path, tok: TokenizerInfo, family: str):
    """A transformers fast tokenizer around our tokenizer.json, special tokens named."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(tokenizer_file))
    special = tok.special_tokens
    names: dict = {"eos_token": tok.eos_token}
    if tok.pad_id is not None:
        names["pad_token"] = next(t for t, i in special.items() if i == tok.pad_id)
    if family == "gpt":
        names["bos_token"] = tok.eos_token
    if family == "bert" and all(t in special for t in ("[CLS]", "[SEP]", "[MASK]")):
        names.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", special["[CLS]"]), ("[SEP]", special["[SEP]"])])
    if family == "t5":
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {tok.eos_token}", pair=f"$A {tok.eos_token} $B:1 {tok.eos_token}:1",
            special_tokens=[(tok.eos_token, tok.eos_id)])
    sentinels = sorted((t for t in special if t.startswith("<extra_id_")),
                       key=lambda t: int(t[len("<extra_id_"):-1]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=sentinels,
                                   **names)


def export(model: nn.Module, tok: TokenizerInfo, tokenizer_file: str | Path,
           out_dir: str | Path) -> Path:
    """Write `model` and its tokenizer as a Hugging Face directory; returns it."""
    hf = to_hf_model(model, tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(tokenizer_file, tok, model.cfg.family).save_pretrained(out)
    return out


def read_hf_dir(hf_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(our `model:` keys, our state dict) of a local Hugging Face model directory."""
    import transformers

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise InteropError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    hf_cfg = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    family = MODEL_TYPES.get(hf_cfg.model_type)
    if family is None:
        raise InteropError(f"{hf_dir}: model_type {hf_cfg.model_type!r} is not one we import "
                           f"({sorted(MODEL_TYPES)})")
    arch = (hf_cfg.architectures or [None])[0]
    if arch not in IMPORTABLE[family]:
        raise InteropError(f"{hf_dir}: architecture {arch!r}; import reads {IMPORTABLE[family]} "
                           "(a model saved with its pretraining head)")
    hf, info = getattr(transformers, arch).from_pretrained(
        hf_dir, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise InteropError(f"{hf_dir}: the weights lack {sorted(info['missing_keys'])[:8]}; "
                           f"{arch} would initialize them at random")
    state = hf.state_dict()
    mapping = MAPPINGS[family]
    try:
        keys = mapping.config_from_hf(hf.config, state)
    except ValueError as e:
        raise InteropError(f"{hf_dir}: {e}") from None
    cfg = ModelConfig.model_validate(keys)
    return keys, mapping.state_dict_from_hf(cfg, state)
