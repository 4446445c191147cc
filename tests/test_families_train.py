"""End to end per family, as a user runs it: `pretrain train` on 2 gloo ranks with DeepSpeed,
then `pretrain export` and `pretrain generate` on the checkpoint, and `pretrain import` of a
Hugging Face model into a run. The exported model, in transformers, must reproduce the
validation loss the trainer logged for the same checkpoint: that checks the ZeRO shards were
merged into the right weights and that the mapping is exact."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import BERT_TINY, T5_TINY, TINY_CONFIG, losses_by_step, run_cli, train_records

from data_pipeline.format import Manifest
from data_pipeline.loader import iter_eval
from data_pipeline.objectives import build_objective
from pretrain.cli import main as cli_main
from pretrain.config_io import load_config

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def overrides(data_dir, run_dir, *extra) -> list[str]:
    return [f"data.dir={data_dir}", f"run.dir={run_dir}", "train.log_interval=1",
            "logging.progress=false", "train.micro_batch_size=4", *extra]


def hf_val_loss(hf_dir, config, data_dir, run_overrides, world=2) -> float:
    """The trainer's evaluation (same batches per rank, token-weighted) with the exported model
    in transformers, the loss computed from its logits."""
    cfg = load_config(config, run_overrides)
    manifest = Manifest.load(data_dir)
    objective = build_objective(cfg, manifest.tokenizer)
    family = cfg.model.family
    cls = {"gpt": transformers.GPT2LMHeadModel, "t5": transformers.T5ForConditionalGeneration,
           "bert": (transformers.BertForPreTraining if cfg.model.sentence_head != "none"
                    else transformers.BertForMaskedLM)}[family]
    hf = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    m = cfg.train.micro_batch_size
    n_batches = min(math.ceil(manifest.splits["val"].samples / (m * world)),
                    cfg.train.eval_batches)
    total = count = 0.0
    for rank in range(world):
        for batch in iter_eval(data_dir, "val", micro_batch_size=m, dp_rank=rank,
                               dp_size=world, max_batches=n_batches, transform=objective):
            x = batch["inputs"]
            labels = x.pop("labels")
            sentence = x.pop("sentence_labels", None)
            with torch.no_grad():
                out = hf(**x)
            logits = getattr(out, "prediction_logits", None)
            logits = out.logits if logits is None else logits
            n = (labels != -100).sum().item()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            if sentence is not None:
                loss = loss + torch.nn.functional.cross_entropy(out.seq_relationship_logits,
                                                                sentence)
            total, count = total + loss.item() * n, count + n
    return total / count


@pytest.mark.parametrize("config,tp", [(BERT_TINY, 2), (T5_TINY, 1)], ids=["bert-tp2", "t5"])
def test_family_trains_resumes_exports_and_generates(config, tp, bert_t5_data, tmp_path, capsys):
    """2 ranks: BERT as TP2 x DP1 (vocabulary-parallel MLM head and accuracy, split dropout
    streams), T5 as DP2; both ZeRO-2. Export and generate read the checkpoint of either grid."""
    # dropout and a loader worker make the resume sensitive to RNG and loader state
    common = ["parallel.zero_stage=2", "model.dropout=0.1", "data.num_workers=1",
              "optim.lr=3e-3", "optim.warmup_steps=2", "optim.decay_steps=16",
              "checkpoint.interval=8", "train.eval_interval=8", f"parallel.tensor_parallel={tp}",
              f"train.grad_accum_steps={tp}"]  # the same global batch (8) on either grid
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_cli(["train", str(config), *overrides(bert_t5_data, whole, *common),
             "train.max_steps=16", "--nproc", "2"])
    run_cli(["train", str(config), *overrides(bert_t5_data, parts, *common),
             "train.max_steps=8", "--nproc", "2"])
    proc = run_cli(["train", str(config), *overrides(bert_t5_data, parts, *common),
                    "train.max_steps=16", "--nproc", "2"])
    assert "resumed from step 8" in proc.stdout
    expected, got = losses_by_step(whole), losses_by_step(parts)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step

    records = train_records(whole)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learns
    if config == BERT_TINY:
        assert all("mlm_accuracy" in r and "sop_accuracy" in r for r in records if "loss" in r)
        assert "val_mlm_accuracy" in evals[-1] and "val_mlm_loss" in evals[-1]

    # export the checkpoint; transformers reproduces the logged validation loss
    out = tmp_path / "hf"
    assert cli_main(["export", str(whole), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in
                                                                      out.iterdir()}
    run_overrides = overrides(bert_t5_data, whole, *common, "train.max_steps=16")
    theirs = hf_val_loss(out, config, bert_t5_data, run_overrides, world=2 // tp)
    assert theirs == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    if config == BERT_TINY:
        assert tok("x = 1").input_ids[0] == tok.cls_token_id and tok.mask_token == "[MASK]"
        prompt = "def __init__(self, [MASK]):"
    else:
        assert tok("x = 1").input_ids[-1] == tok.eos_token_id
        prompt = "import <extra_id_0>\ndef <extra_id_1>(self):"
    capsys.readouterr()
    assert cli_main(["generate", str(whole), "--prompt", prompt, "--max-new-tokens", "6",
                     "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert "def " in text and "[MASK]" not in text.splitlines()[0]
    if config == T5_TINY:
        assert "<extra_id_0>" not in text.splitlines()[0] and "spans:" in text


@pytest.mark.parametrize("stage,tp", [(0, 2), (3, 1)], ids=["tp2-zero0", "dp2-zero3"])
def test_gpt_export_from_zero_stage(stage, tp, tiny_data, tmp_path, capsys):
    """2 ranks: ZeRO-3 shards the parameters themselves over them; TP2 splits every layer
    (and the tied vocabulary) between them. Export reads whole weights from either."""
    run = tmp_path / "run"
    extra = ["train.max_steps=3", "train.eval_interval=0", f"parallel.zero_stage={stage}",
             "train.eval_batches=2", f"parallel.tensor_parallel={tp}",
             # checkpoints name parameters as the unwrapped model does
             f"train.activation_checkpointing={'true' if stage == 0 else 'false'}"]
    run_cli(["train", str(TINY_CONFIG), *overrides(tiny_data, run, *extra), "--nproc", "2"])
    final = [r for r in train_records(run) if "val_loss" in r][-1]
    out = tmp_path / "hf"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    theirs = hf_val_loss(out, TINY_CONFIG, tiny_data, overrides(tiny_data, run, *extra),
                         world=2 // tp)
    assert theirs == pytest.approx(final["val_loss"], rel=1e-5)
    capsys.readouterr()
    assert cli_main(["generate", str(run), "--prompt", "def main(", "--max-new-tokens", "8",
                     "--top-k", "20", "--top-p", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("def main(")


def test_import_continues_a_hugging_face_model(bert_t5_data, tmp_path):
    """import -> a real run (2 ranks, ZeRO-2) whose single step cannot change a weight in fp32
    (lr 1e-30) -> export: the very tensors of the original."""
    manifest = Manifest.load(bert_t5_data)
    tok = manifest.tokenizer
    hf_cfg = transformers.T5Config(
        vocab_size=576, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1,
        num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id, decoder_start_token_id=tok.pad_id)
    torch.manual_seed(0)
    original = transformers.T5ForConditionalGeneration(hf_cfg)
    src = tmp_path / "hf-in"
    original.save_pretrained(src)
    shutil.copyfile(bert_t5_data / "tokenizer.json", src / "tokenizer.json")

    run = tmp_path / "run"
    assert cli_main(["import", str(src), "--out", str(run), f"data.dir={bert_t5_data}",
                     "data.seq_len=32", "train.max_steps=1", "optim.lr=1e-30", "optim.min_lr=0",
                     "optim.warmup_steps=0", "train.eval_interval=0", "train.eval_batches=1",
                     "train.micro_batch_size=2", "logging.progress=false",
                     "data.num_workers=0"]) == 0
    assert (run / "init" / "model.safetensors").is_file()
    proc = run_cli(["train", str(run / "config.yaml"), "--nproc", "2"])
    assert "starting from scratch" in proc.stdout  # no checkpoint yet: init_from's weights
    out = tmp_path / "hf-out"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    back = transformers.T5ForConditionalGeneration.from_pretrained(out).state_dict()
    for k, v in original.state_dict().items():
        assert torch.equal(back[k], v), k
