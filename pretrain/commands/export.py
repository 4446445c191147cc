"""`pretrain export CHECKPOINT --out DIR`: a checkpoint of any process grid (TP x DP, ZeRO 0-3)
as a Hugging Face directory (config.json, model.safetensors, tokenizer files) that transformers'
from_pretrained loads: GPT2LMHeadModel, BertForMaskedLM / BertForPreTraining or
T5ForConditionalGeneration."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                       description=__doc__)
    p.add_argument("checkpoint", help="run directory (its latest checkpoint) or "
                                      "checkpoints/step-N directory")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--data-dir", default=None,
                   help="where the run's tokenizer is now (default: the run's data.dir)")


def run(args: argparse.Namespace) -> int:
    from pretrain.hf import MAPPINGS, InteropError, export
    from pretrain.saved_model import SavedModelError, load_trained

    try:
        saved = load_trained(args.checkpoint, args.data_dir)
        out = export(saved.model, saved.tokenizer, saved.tokenizer_file, args.out)
    except (InteropError, SavedModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cls = MAPPINGS[saved.config.model.family].hf_class_name(saved.config.model)
    print(f"exported {saved.step_dir} to {out} as {cls}; load it with\n"
          f"  transformers.{cls}.from_pretrained({str(out)!r})\n"
          f"  transformers.AutoTokenizer.from_pretrained({str(out)!r})")
    return 0
