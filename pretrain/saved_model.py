"""A trained model outside training: read back from a checkpoint of any ZeRO stage, with its
config and tokenizer (for `pretrain export` and `pretrain generate`), and weights files in
safetensors (written by `pretrain import`, read by checkpoint.init_from).

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
from torch import nn

from data_pipeline.format import Manifest, TokenizerInfo, sha256_file
from pretrain.checkpoint import MARKER, TRAIN_STATE, CheckpointManager, consolidated_state_dict
from pretrain.config import Config
from pretrain.model import build_model


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


def find_step_dir(path: str | Path) -> Path:
    """The complete checkpoint that `path` names (see module docstring)."""
    path = Path(path)
    if (path / TRAIN_STATE).is_file():
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
    load_weights(model, consolidated_state_dict(step_dir), str(step_dir))
    return SavedModel(model.eval(), cfg, manifest.tokenizer, tok_file, step_dir)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`; every parameter must be given, with its shape."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SavedModelError(f"the weights in {where} do not fit the model config: "
                              f"{str(e).splitlines()[0]} ...\n{e}") from None


def save_weights_file(model: nn.Module, path: str | Path) -> None:
    """safetensors of the model's state (a tied tensor stored once)."""
    from safetensors.torch import save_model

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Fill `model` from a safetensors file written by save_weights_file (checkpoint.init_from)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise SavedModelError(f"checkpoint.init_from: {path} does not exist (write it with "
                              "`pretrain import HF_DIR`)")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise SavedModelError(f"checkpoint.init_from: {path} does not fit the model config: "
                              f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
