"""`pretrain import HF_DIR --out RUN_DIR`: continue pretraining a local Hugging Face model
(GPT2LMHeadModel, BertForMaskedLM / BertForPreTraining, T5ForConditionalGeneration).

Writes into RUN_DIR:
    init/model.safetensors   the weights in our layout (checkpoint.init_from), the same
                             weights file `pretrain checkpoint consolidate` writes
    init/tokenizer.json      the model's tokenizer (data.tokenizer.path)
    config.yaml              a run config: the base config (--config, default
                             configs/<family>-default.yaml) with the imported model, that
                             tokenizer, data.dir RUN_DIR/data, run.dir RUN_DIR and init_from
then `pretrain prepare RUN_DIR/config.yaml` tokenizes the corpus with the model's tokenizer and
`pretrain train RUN_DIR/config.yaml` starts from the imported weights (exporting the run's
checkpoint before any change gives back the same tensors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="start a run from a local Hugging Face model directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="local directory with config.json, weights and tokenizer.json")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--config", default=None,
                   help="base run config (default: configs/<family>-default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides written into the run config")


def _eos_token(hf_dir: Path, family: str, tokenizer_file: Path) -> str:
    """The token that ends documents: the model's EOS ([SEP] for BERT, which has none)."""
    from tokenizers import Tokenizer

    config = json.loads((hf_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(tokenizer_file))
    eos_id = config.get("eos_token_id")
    if family == "bert" or eos_id is None:
        for name in ("[SEP]", "</s>", "<|endoftext|>"):
            if tok.token_to_id(name) is not None:
                return name
        raise ValueError(f"{tokenizer_file} has no end-of-document token ([SEP], </s>, "
                         "<|endoftext|>); set data.tokenizer.eos_token in the run config")
    return tok.id_to_token(eos_id[0] if isinstance(eos_id, list) else eos_id)


def run(args: argparse.Namespace) -> int:
    from pretrain.config import ModelConfig
    from pretrain.config_io import ConfigError, load_config, parse_value
    from pretrain.hf import InteropError, read_hf_dir
    from pretrain.model import build_model
    from pretrain.saved_model import (
        SavedModelError, load_weights, save_weights_file, unique_state,
    )

    hf_dir, out = Path(args.hf_dir), Path(args.out).resolve()
    try:
        keys, state = read_hf_dir(hf_dir)
        tokenizer_file = hf_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise InteropError(f"{hf_dir} has no tokenizer.json (a fast tokenizer); save one "
                               "with AutoTokenizer.from_pretrained(...).save_pretrained(DIR)")
        model_cfg = ModelConfig.model_validate(keys)
        model = build_model(model_cfg, model_cfg.vocab_size)
        load_weights(model, state, str(hf_dir))
        eos = _eos_token(hf_dir, model_cfg.family, tokenizer_file)
    except (InteropError, SavedModelError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "init").mkdir(parents=True, exist_ok=True)
    save_weights_file(unique_state(model), out / "init" / "model.safetensors", model=model_cfg,
                      vocab_size=model_cfg.vocab_size, source=hf_dir.resolve())
    shutil.copyfile(tokenizer_file, out / "init" / "tokenizer.json")
    base = (Path(args.config) if args.config
            else ROOT / "configs" / f"{model_cfg.family}-default.yaml")
    run_config = {
        "defaults": [str(base.resolve())],
        "run": {"dir": str(out)},
        "model": model_cfg.model_dump(mode="json"),
        "data": {"dir": str(out / "data"),
                 "tokenizer": {"path": str(out / "init" / "tokenizer.json"), "eos_token": eos}},
        "checkpoint": {"init_from": str(out / "init" / "model.safetensors")},
    }
    for text in args.overrides:  # written into the file, so the file alone is the run
        key, eq, value = text.partition("=")
        if not eq:
            print(f"error: override {text!r} has no '='; write key=value", file=sys.stderr)
            return 2
        *parents, leaf = key.strip().split(".")
        section = run_config
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = parse_value(value)
    config_path = out / "config.yaml"
    config_path.write_text(f"# Continued pretraining of {hf_dir.resolve()} (pretrain import)\n"
                           + yaml.safe_dump(run_config, sort_keys=False))
    try:
        load_config(config_path)
    except ConfigError as e:
        print(f"error: the written {config_path} is not valid:\n{e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {hf_dir} ({model_cfg.family}, {n / 1e6:.2f}M parameters) into {out}\n"
          f"next:\n  pretrain prepare {config_path}\n  pretrain train {config_path} --nproc N")
    return 0
