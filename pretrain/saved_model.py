"""A trained model outside training: the one place that reads trained weights back.

* From a checkpoint written by any process grid (tensor-parallel degree, data-parallel size,
  ZeRO stage 0-3): the checkpoint holds every tensor whole-model-named (sharded_state.py), so
  the weights are read whole in this process, without DeepSpeed or a process group
  (`checkpoint_weights`). `load_trained` adds the config and the tokenizer: `pretrain export`,
  `pretrain generate`.
* From a weights file: safetensors, one tensor per parameter named as in the unsplit model (a
  tied matrix stored once), the model config and vocabulary size in its header. Written by
  `pretrain checkpoint consolidate` (`consolidate`) and `pretrain import`; read by
  checkpoint.init_from (`load_weights_file`, into the whole model before tensor parallelism
  splits it) and `model_from_weights_file`.

A checkpoint is named by its step directory (runs/x/checkpoints/step-00000100), by the
checkpoints directory or by the run directory (then its latest complete checkpoint). Its
config.yaml gives the model and the data directory, whose tokenizer.json must be the one the
run trained with (train_state.json records its sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from data_pipeline.format import Manifest, TokenizerInfo, sha256_file
from pretrain.checkpoint import MARKER, TAG_RE, TRAIN_STATE, CheckpointManager
from pretrain.config import Config, ModelConfig
from pretrain.model import build_model
from pretrain.sharded_state import STATE_DIR, read_whole

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SavedModelError(ValueError):
    """A checkpoint, weights file or tokenizer that cannot be used; the message says why."""


@dataclass
class SavedModel:
    model: nn.Module
    """On CPU, fp32, eval mode."""
    config: Config
    tokenizer: TokenizerInfo
    tokenizer_file: Path
    step_dir: Path


# ----------------------------------------------------------------------------- checkpoints


def find_step_dir(path: str | Path) -> Path:
    """The complete checkpoint that `path` names (see module docstring)."""
    path = Path(path)
    if TAG_RE.match(path.name) or (path / TRAIN_STATE).is_file():
        if not (path / MARKER).is_file():
            raise SavedModelError(f"{path} is an incomplete checkpoint (no {MARKER} marker): "
                                  "its save did not finish; use an earlier one")
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    latest = CheckpointManager(run_dir, 1, 0, 1).latest_step()
    if latest is None:
        raise SavedModelError(f"no complete checkpoint at {path}: give a run directory or a "
                              "checkpoints/step-N directory")
    return run_dir / "checkpoints" / f"step-{latest:08d}"


def checkpoint_weights(step_dir: str | Path) -> dict[str, Tensor]:
    """The whole model's weights (fp32, CPU) in checkpoint `step_dir`, named as in the unsplit
    model; a tied matrix appears once (`load_weights` fills its other names)."""
    step_dir = Path(step_dir)
    if not (step_dir / STATE_DIR).is_dir():
        if any(step_dir.glob("mp_rank_*_model_states.pt")):
            raise SavedModelError(
                f"{step_dir} holds DeepSpeed's own checkpoint files, written before checkpoints "
                "became independent of the process grid; read it with the version that wrote it")
        raise SavedModelError(f"{step_dir} has no {STATE_DIR}/ directory: not a checkpoint")
    return {k[len("model."):]: v for k, v in read_whole(step_dir / STATE_DIR, "model.").items()}


def load_trained(path: str | Path, data_dir: str | Path | None = None) -> SavedModel:
    """Model, config and tokenizer of the checkpoint at `path`. data_dir overrides where the
    tokenizer is looked for (default: the run's data.dir)."""
    step_dir = find_step_dir(path)
    state = json.loads((step_dir / TRAIN_STATE).read_text())
    cfg = Config.model_validate(yaml.safe_load((step_dir / "config.yaml").read_text()))
    data = Path(data_dir) if data_dir is not None else Path(cfg.data.dir)
    try:
        manifest = Manifest.load(data)
    except (FileNotFoundError, ValueError) as e:
        raise SavedModelError(f"{e}\nThe tokenizer of {step_dir} is looked for in the run's "
                              f"data.dir {data}; pass the directory it moved to.") from None
    tok_file = data / manifest.tokenizer.file
    want = state.get("tokenizer_sha256")
    if want is not None and sha256_file(tok_file) != want:
        raise SavedModelError(f"{tok_file} is not the tokenizer {step_dir} was trained with "
                              f"(sha256 {want[:12]}...)")
    model = build_model(cfg.model, state["vocab_size"])
    load_weights(model, checkpoint_weights(step_dir), str(step_dir))
    return SavedModel(model.eval(), cfg, manifest.tokenizer, tok_file, step_dir)


# ----------------------------------------------------------------------------- state dicts


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with each tensor once, under its first name (the name checkpoints
    use: a tied output head is stored as the embedding)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


def load_weights(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Copy `state` into `model`; every tensor must be given with its shape, a tied one under
    any of its names."""
    names_of: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(name)
    full = dict(state)
    for names in names_of.values():
        given = [n for n in names if n in state]
        for n in names:
            if given and n not in full:
                full[n] = state[given[0]]
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:
        raise SavedModelError(f"the weights in {where} do not fit the model config: "
                              f"{str(e).splitlines()[0]} ...\n{e}") from None


# ----------------------------------------------------------------------------- weights files


def save_weights_file(state: dict[str, Tensor], path: str | Path, *, model: ModelConfig,
                      vocab_size: int, dtype: str = "fp32", **meta: str) -> Path:
    """Write `state` (a tensor per unsplit-model name, each once) as a safetensors weights file
    with the model config, vocabulary size and `meta` in its header; atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    header = {"format": "pt", "model_config": json.dumps(model.model_dump(mode="json")),
              "vocab_size": str(vocab_size), **{k: str(v) for k, v in meta.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def _read_weights_file(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SavedModelError(f"{what}: {path} does not exist (write one with `pretrain import "
                              "HF_DIR` or `pretrain checkpoint consolidate RUN_DIR`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        return {k: v.float() for k, v in load_file(str(path)).items()}, header
    except (SafetensorError, OSError) as e:
        raise SavedModelError(f"{what}: {path} is not a safetensors weights file: {e}") from None


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Fill the whole (unsplit) `model` from a weights file (checkpoint.init_from)."""
    state, _ = _read_weights_file(path, "checkpoint.init_from")
    load_weights(model, state, f"checkpoint.init_from={path}")


def model_from_weights_file(path: str | Path) -> nn.Module:
    """The model in a weights file, built from the config in its header (fp32, eval mode)."""
    state, header = _read_weights_file(path, "weights file")
    if "model_config" not in header:
        raise SavedModelError(f"{path} has no model config in its header: build the model "
                              "yourself and use load_weights_file")
    cfg = ModelConfig.model_validate(json.loads(header["model_config"]))
    model = build_model(cfg, int(header["vocab_size"]))
    load_weights(model, state, str(path))
    return model.float().eval()


def consolidate(src: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the whole model's weights of checkpoint `src` (any grid) as the weights file
    `out`; `pretrain checkpoint consolidate`."""
    step_dir = find_step_dir(src)
    train_state = json.loads((step_dir / TRAIN_STATE).read_text())
    model = ModelConfig.model_validate(train_state["model"])
    return save_weights_file(checkpoint_weights(step_dir), out, model=model,
                             vocab_size=train_state["vocab_size"], dtype=dtype,
                             step=train_state["step"], source=step_dir)
