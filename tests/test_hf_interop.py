"""Hugging Face interop (pretrain/hf.py): exported models compute our logits in transformers (to
1e-4 in fp32) for every family, settings a class cannot express are refused by name, and
import -> export gives back identical tensors. Models are built from configs locally (no hub)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import ROOT

from data_pipeline.format import TokenizerInfo
from pretrain.config import ModelConfig
from pretrain.hf import InteropError, read_hf_dir, to_hf_model
from pretrain.model import build_model

transformers = pytest.importorskip("transformers")

V = 70
TOK = TokenizerInfo(sha256="test", vocab_size=V, eos_token="</s>", eos_id=1, pad_id=0,
                    special_tokens={"<pad>": 0, "</s>": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4})


def preset(name: str, **overrides) -> ModelConfig:
    data = yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text())["model"]
    return ModelConfig(**{**data, "max_seq_len": 24, **overrides})


def perturbed(cfg: ModelConfig, seed: int = 0):
    """A model whose biases and norms are off their trivial init, so they are tested too."""
    torch.manual_seed(seed)
    model = build_model(cfg, V).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return x, mask


CASES = {
    "gpt2": ("gpt", dict(n_layer=2, n_head=4, d_model=32)),
    "gpt2-relu-unscaled-untied": ("gpt", dict(n_layer=2, n_head=4, d_model=32,
                                              activation="relu", scale_attn_scores=False,
                                              tie_embeddings=False)),
    "bert-sop": ("bert-tiny", {}),
    "bert-mlm-only-untied-gelu_tanh": ("bert-tiny", dict(sentence_head="none",
                                                         tie_embeddings=False,
                                                         activation="gelu_tanh")),
    "t5-v1.1-gated": ("t5-tiny", {}),
    "t5-v1.0-relu": ("t5-tiny", dict(gated_ffn=False, activation="relu", n_decoder_layer=3,
                                     relative_buckets=16, relative_max_distance=20)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(case):
    name, overrides = CASES[case]
    cfg = ModelConfig(**overrides) if name == "gpt" else preset(name, **overrides)
    model = perturbed(cfg)
    hf = to_hf_model(model, TOK)
    x, mask = inputs()
    with torch.no_grad():
        if cfg.family == "gpt":
            ours, theirs = model(x).logits, hf(input_ids=x).logits
        elif cfg.family == "bert":
            types = torch.zeros_like(x)
            types[:, 8:] = 1
            out = model(x, token_type_ids=types, attention_mask=mask)
            hf_out = hf(input_ids=x, token_type_ids=types, attention_mask=mask)
            ours = out.logits
            theirs = getattr(hf_out, "prediction_logits", None)
            theirs = hf_out.logits if theirs is None else theirs
            if cfg.sentence_head != "none":
                torch.testing.assert_close(out.sentence_logits, hf_out.seq_relationship_logits,
                                           atol=1e-4, rtol=1e-4)
        else:
            y = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
            ours = model(x, decoder_input_ids=y, attention_mask=mask).logits
            theirs = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    assert ours.abs().max() > 0.5  # not trivially small
    # every position, padded queries included (they attend to the real keys in both)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_settings_a_class_cannot_express_are_named():
    vaswani = preset("transformer-base", n_layer=1, n_decoder_layer=1, d_model=32, n_head=4)
    with pytest.raises(InteropError) as e:
        to_hf_model(build_model(vaswani, V), TOK)
    msg = str(e.value)
    assert msg.startswith("T5ForConditionalGeneration cannot express this model")
    for key in ("model.positions='sinusoidal'", "model.norm='layernorm'",
                "model.norm_position='post'", "model.bias=true", "model.scale_attn_scores=true"):
        assert key in msg
    llama_ish = ModelConfig(n_layer=1, n_head=4, d_model=32, norm="rmsnorm", gated_ffn=True)
    with pytest.raises(InteropError, match=r"GPT2LMHeadModel cannot express .*model.norm="
                                           r"'rmsnorm'.*model.gated_ffn=true"):
        to_hf_model(build_model(llama_ish, V), TOK)
    pre_norm_bert = preset("bert-tiny", norm_position="pre")
    with pytest.raises(InteropError, match="BertForPreTraining cannot express .*post-norm"):
        to_hf_model(build_model(pre_norm_bert, V), TOK)


def _hf_model(family: str):
    torch.manual_seed(0)
    if family == "gpt":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=24, n_embd=32, n_layer=2,
                                      n_head=4, bos_token_id=1, eos_token_id=1)
        return transformers.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=48,
                                      max_position_embeddings=24, pad_token_id=0)
        return transformers.BertForPreTraining(cfg)
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_import_then_export_gives_identical_weights(family, tmp_path):
    original = _hf_model(family)
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.01 * torch.randn_like(p))  # away from the init's zeros and ones
    original.save_pretrained(tmp_path / "hf")
    keys, state = read_hf_dir(tmp_path / "hf")
    cfg = ModelConfig.model_validate(keys)
    assert cfg.family == family
    model = build_model(cfg, cfg.vocab_size)
    model.load_state_dict(state, strict=True)
    exported = to_hf_model(model, TOK).state_dict()
    want = original.state_dict()
    assert exported.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(exported[k], v), k
    if family == "bert":
        assert cfg.sentence_head == "nsp" and cfg.norm_position == "post"


def test_import_refuses_a_model_without_its_head(tmp_path):
    base = transformers.BertModel(_hf_model("bert").config)
    base.save_pretrained(tmp_path / "hf")
    with pytest.raises(InteropError, match="architecture 'BertModel'; import reads"):
        read_hf_dir(tmp_path / "hf")
