"""`pretrain checkpoint ...`: offline tools for checkpoints of any process grid.

    pretrain checkpoint consolidate SRC [--out FILE] [--dtype fp32|bf16|fp16] [--hf DIR]
        the whole model's weights from a checkpoint written by any grid (TP x DP, ZeRO 0-3) as
        one safetensors weights file (names as in the unsplit model, model config in the
        header; checkpoint.init_from reads it), and with --hf also as a Hugging Face directory
        with the tokenizer (what `pretrain export` writes)
    pretrain checkpoint convert SRC OUT_RUN_DIR [--tensor-parallel N]
        a copy of the checkpoint with every tensor whole (no trace of the grid that wrote it) as
        the latest checkpoint of OUT_RUN_DIR; `pretrain train CONFIG run.dir=OUT_RUN_DIR`
        resumes from it on any grid. --tensor-parallel checks that the model splits over N
        ranks.

SRC is a run directory (its latest complete checkpoint), its checkpoints/ directory, or one
step-NNNNNNNN directory. Only checkpoints with the COMPLETE marker are read. Everything runs in
one process without a process group and holds the whole state in memory: the weights for
consolidate, weights and Adam moments for convert.

Resuming on another grid does not need convert: a run started on a new grid reads any
checkpoint directly (pretrain/sharded_state.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="consolidate or convert checkpoints of any grid",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="kind", required=True)
    c = actions.add_parser("consolidate", help="whole weights as one safetensors file")
    c.add_argument("src", help="run directory, its checkpoints/ or a step-N directory")
    c.add_argument("--out", help="output file (default: <run dir>/model-step-N.safetensors)")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    c.add_argument("--hf", metavar="DIR", help="also write a Hugging Face model directory")
    c.add_argument("--data-dir", default=None,
                   help="with --hf: where the run's tokenizer is now (default: its data.dir)")
    v = actions.add_parser("convert", help="copy with whole tensors, loadable by any grid")
    v.add_argument("src", help="run directory, its checkpoints/ or a step-N directory")
    v.add_argument("out_run_dir", help="run directory to hold the converted checkpoint")
    v.add_argument("--tensor-parallel", type=int, default=None,
                   help="check that the model splits over this many tensor-parallel ranks")


def convert(src: str | Path, out_run_dir: str | Path, tensor_parallel: int | None = None) -> Path:
    """Copy checkpoint `src` with every tensor whole into OUT_RUN_DIR/checkpoints/step-N."""
    from data_pipeline.format import atomic_write_text
    from pretrain.checkpoint import MARKER, TRAIN_STATE
    from pretrain.config import Config, ModelConfig, tensor_parallel_problems
    from pretrain.saved_model import SavedModelError, find_step_dir
    from pretrain.sharded_state import ENGINE_STATE, STATE_DIR, read_whole, write_whole

    ckpt = find_step_dir(src)
    if not (ckpt / STATE_DIR).is_dir():
        raise SavedModelError(f"{ckpt} has no {STATE_DIR}/ directory: not a checkpoint of this "
                              "version")
    train_state = json.loads((ckpt / TRAIN_STATE).read_text())
    if tensor_parallel is not None:
        cfg = Config(model=ModelConfig.model_validate(train_state["model"]))
        cfg.model.vocab_size = train_state["vocab_size"]
        cfg.parallel.tensor_parallel = tensor_parallel
        problems = [f"{k}: {m}" for k, m in tensor_parallel_problems(cfg)
                    if k != "parallel.sequence_parallel"]
        if problems:
            raise SavedModelError(f"{ckpt} cannot run with tensor_parallel={tensor_parallel}: "
                                  + "; ".join(problems))
    step_dir = Path(out_run_dir) / "checkpoints" / ckpt.name
    if step_dir.exists():
        raise SavedModelError(f"{step_dir} exists: choose another output run directory")
    tmp = step_dir.with_name(f".{ckpt.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / STATE_DIR).mkdir(parents=True)
    write_whole(read_whole(ckpt / STATE_DIR), tmp / STATE_DIR)
    engine_state = json.loads((ckpt / ENGINE_STATE).read_text())
    engine_state["converted_from"] = {"path": str(ckpt), "grid": engine_state.get("grid")}
    atomic_write_text(tmp / ENGINE_STATE, json.dumps(engine_state, indent=2))
    for name in (TRAIN_STATE, "config.yaml"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, tmp / name)
    # per-rank RNG files belong to the grid that wrote them: not copied (streams are reseeded)
    tmp.rename(step_dir)
    marker = {"step": train_state["step"], "converted_from": str(ckpt)}
    atomic_write_text(step_dir / MARKER, json.dumps(marker))
    atomic_write_text(step_dir.parent / "latest", ckpt.name)
    return step_dir


def run(args: argparse.Namespace) -> int:
    from pretrain.hf import InteropError, export
    from pretrain.saved_model import SavedModelError, consolidate, find_step_dir, load_trained

    try:
        if args.kind == "consolidate":
            ckpt = find_step_dir(args.src)
            default = ckpt.parent.parent / f"model-{ckpt.name}.safetensors"
            out = consolidate(ckpt, args.out or default, args.dtype)
            print(f"wrote {out}")
            if args.hf:
                saved = load_trained(ckpt, args.data_dir)
                export(saved.model, saved.tokenizer, saved.tokenizer_file, args.hf)
                print(f"wrote {args.hf}")
        else:
            print(f"wrote {convert(args.src, args.out_run_dir, args.tensor_parallel)}")
    except (SavedModelError, InteropError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
