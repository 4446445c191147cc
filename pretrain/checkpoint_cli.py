"""`pretrain checkpoint ...`: offline tools for checkpoints of any process grid.

    pretrain checkpoint consolidate SRC [--out FILE] [--hf DIR] [--dtype fp32|bf16|fp16]
        the whole model's weights from a checkpoint written by any grid, as one safetensors
        file (names as in the unsplit model, model config in the header), and optionally as a
        Hugging Face GPT2LMHeadModel directory
    pretrain checkpoint convert SRC OUT_RUN_DIR [--tensor-parallel N]
        a copy of the checkpoint with every tensor whole (the "universal" layout: no trace of the
        grid that wrote it) as the latest checkpoint of OUT_RUN_DIR; `pretrain train CONFIG
        run.dir=OUT_RUN_DIR` resumes from it on any grid. --tensor-parallel checks that the
        model splits over N ranks.

SRC is a run directory (its latest complete checkpoint), its checkpoints/ directory, or one
step-NNNNNNNN directory. Only checkpoints with the COMPLETE marker are read. Everything runs in
one process without a process group (DCP's no_dist mode) and holds the whole state in memory:
the weights for consolidate, weights and Adam moments for convert.

Resuming on another grid does not need convert: a run started on a new grid reads any
checkpoint directly (pretrain/sharded_state.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

from data_pipeline.format import atomic_write_text
from pretrain.checkpoint import MARKER, TAG_RE, TRAIN_STATE, CheckpointManager
from pretrain.config import ModelConfig
from pretrain.sharded_state import ENGINE_STATE, STATE_DIR, read_saved_shapes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIED = {"lm_head.weight": "wte.weight"}  # omitted from the file when the model ties them

# DCP warns that it runs without a process group: here that is the point.
warnings.filterwarnings("ignore", message=r".*torch.distributed is disabled, unavailable",
                        category=UserWarning)


class CheckpointToolError(RuntimeError):
    pass


def find_checkpoint(src: str | Path) -> Path:
    """The complete step directory `src` names (a run dir, checkpoints/ or step-N)."""
    src = Path(src)
    if TAG_RE.match(src.name):
        if not (src / MARKER).is_file():
            raise CheckpointToolError(f"{src} has no {MARKER} marker: an interrupted save; "
                                      "use an earlier checkpoint")
        return src
    run_dir = src.parent if src.name == "checkpoints" else src
    mgr = CheckpointManager(run_dir, keep_last=1, rank=0, world_size=1)
    step = mgr.latest_step()
    if step is None:
        raise CheckpointToolError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return mgr.dir / f"step-{step:08d}"


def load_whole(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint whose key starts with `prefix`, whole (fp32)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state_dir = ckpt / STATE_DIR
    if not state_dir.is_dir():
        raise CheckpointToolError(f"{ckpt} has no {STATE_DIR}/ directory: not a checkpoint of "
                                  "this version")
    shapes = read_saved_shapes(state_dir)
    state = {k: torch.zeros(s, dtype=torch.float32) for k, s in sorted(shapes.items())
             if k.startswith(prefix)}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(state_dir)), no_dist=True)
    return state


def consolidate(src: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the whole model's weights of checkpoint `src` to the safetensors file `out`."""
    from safetensors.torch import save_file

    ckpt = find_checkpoint(src)
    train_state = json.loads((ckpt / TRAIN_STATE).read_text())
    weights = {k[len("model."):]: v.to(DTYPES[dtype]).contiguous()
               for k, v in load_whole(ckpt, "model.").items()}
    meta = {"format": "pt", "model_config": json.dumps(train_state["model"]),
            "vocab_size": str(train_state["vocab_size"]), "step": str(train_state["step"]),
            "source": str(ckpt)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(weights, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def load_consolidated(path: str | Path) -> torch.nn.Module:
    """The model in a consolidated file, built from the config in its header (eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pretrain.model import build_model

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    cfg = ModelConfig.model_validate(json.loads(meta["model_config"]))
    model = build_model(cfg, int(meta["vocab_size"]))
    weights = load_file(str(path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (TIED.get(k) in weights and cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointToolError(f"{path} does not match a {cfg.family} model with its "
                                  f"config: missing {missing}, unexpected {unexpected}")
    return model.float().eval()


def convert(src: str | Path, out_run_dir: str | Path, tensor_parallel: int | None = None) -> Path:
    """Copy checkpoint `src` with every tensor whole into OUT_RUN_DIR/checkpoints/step-N."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from pretrain.config import Config, tensor_parallel_problems

    ckpt = find_checkpoint(src)
    train_state = json.loads((ckpt / TRAIN_STATE).read_text())
    if tensor_parallel is not None:
        cfg = Config(model=ModelConfig.model_validate(train_state["model"]))
        cfg.model.vocab_size = train_state["vocab_size"]
        cfg.parallel.tensor_parallel = tensor_parallel
        problems = [f"{k}: {m}" for k, m in tensor_parallel_problems(cfg)
                    if k != "parallel.sequence_parallel"]
        if problems:
            raise CheckpointToolError(f"{ckpt} cannot run with tensor_parallel="
                                      f"{tensor_parallel}: " + "; ".join(problems))
    step_dir = Path(out_run_dir) / "checkpoints" / ckpt.name
    if step_dir.exists():
        raise CheckpointToolError(f"{step_dir} exists: choose another output run directory")
    tmp = step_dir.with_name(f".{ckpt.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / STATE_DIR).mkdir(parents=True)
    state = load_whole(ckpt)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp / STATE_DIR)), no_dist=True)
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


# ----------------------------------------------------------------------------- command line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="consolidate or convert checkpoints of any grid",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("consolidate", help="whole weights as one safetensors file")
    c.add_argument("src", help="run directory, its checkpoints/ or a step-N directory")
    c.add_argument("--out", help="output file (default: <run dir>/model-step-N.safetensors)")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    c.add_argument("--hf", metavar="DIR", help="also write a Hugging Face model directory")
    v = actions.add_parser("convert", help="copy with whole tensors, loadable by any grid")
    v.add_argument("src", help="run directory, its checkpoints/ or a step-N directory")
    v.add_argument("out_run_dir", help="run directory to hold the converted checkpoint")
    v.add_argument("--tensor-parallel", type=int, default=None,
                   help="check that the model splits over this many tensor-parallel ranks")


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "consolidate":
            ckpt = find_checkpoint(args.src)
            default = ckpt.parent.parent / f"model-{ckpt.name}.safetensors"
            out = consolidate(ckpt, args.out or default, args.dtype)
            print(f"wrote {out}")
            if args.hf:
                from pretrain.model.hf_gpt2 import gpt_to_hf

                gpt_to_hf(load_consolidated(out)).save_pretrained(args.hf)
                print(f"wrote {args.hf}")
        else:
            out = convert(args.src, args.out_run_dir, args.tensor_parallel)
            print(f"wrote {out}")
    except CheckpointToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
