"""Config loading: `defaults:` composition, typed overrides, provenance and every error path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pretrain.config import Config
from pretrain.config_io import (
    README_BEGIN,
    README_END,
    ConfigError,
    compose_config,
    config_reference_markdown,
    load_config,
    resolved_dict,
    save_resolved,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
FRAGMENTS = sorted(p for p in CONFIGS.rglob("*.yaml")
                   if p.parent != CONFIGS and p.parent.name != "sweeps")  # sweeps: test_sweep.py


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path, overrides=(), world_size=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, world_size)
    return info.value.problems


@pytest.fixture(autouse=True)
def elsewhere(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a directory that holds no test file, so messages name files by absolute path."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A small valid run config (its own defaults chain) in a temporary directory."""
    write(tmp_path / "models/m.yaml", "model:\n  n_layer: 2\n  d_model: 64\n  max_seq_len: 64\n")
    return write(
        tmp_path / "run.yaml",
        "defaults: [models/m]\n"
        "data:\n"
        "  seq_len: 32\n"
        "train:\n"
        "  micro_batch_size: 8\n",
    )


# ------------------------------------------------------------------ composition and overrides


def test_defaults_merge_in_order_then_file_then_overrides(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "model: {n_layer: 1, d_model: 32}\noptim: {lr: 0.5}\n")
    write(tmp_path / "sub/b.yaml",
          "defaults: [../a]\nmodel: {n_layer: 2}\ndata: {sources: [x, y]}\n")
    write(tmp_path / "c.yaml", "model: {n_layer: 3}\ndata: {sources: [z]}\n")
    top = write(
        tmp_path / "top.yaml", "defaults: [sub/b.yaml, c]\nmodel: {n_head: 2}\noptim: {lr: 1e-3}\n"
    )
    data, sources = compose_config(top, ["model.n_layer=5"])
    # a < b < c < top < command line; dicts merge, lists replace.
    assert data["model"] == {"n_layer": 5, "d_model": 32, "n_head": 2}
    assert data["data"] == {"sources": ["z"]}
    assert data["optim"]["lr"] == 0.001 and isinstance(data["optim"]["lr"], float)  # YAML 1.2 float
    assert sources["model.n_layer"] == "command line"
    assert sources["model.d_model"] == f"{tmp_path / 'a.yaml'}:1"
    assert sources["data.sources"] == f"{tmp_path / 'c.yaml'}:2"
    assert sources["optim.lr"] == f"{tmp_path / 'top.yaml'}:3"
    assert sources["model.n_head"] == f"{tmp_path / 'top.yaml'}:2"


def test_replacing_a_subtree_forgets_its_old_sources(tmp_path: Path) -> None:
    top = write(tmp_path / "t.yaml", "model:\n  attention: {dropout: 0.1}\n  n_layer: 1\n")
    data, sources = compose_config(top, ["model.attention={}"])  # an empty mapping merges: no-op
    assert data["model"]["attention"] == {"dropout": 0.1}
    data, sources = compose_config(top, ["model.attention=null"])  # a scalar replaces the subtree
    assert data["model"] == {"attention": None, "n_layer": 1}
    assert sources == {"model.attention": "command line", "model.n_layer": f"{top}:3"}


def test_overrides_are_typed(base: Path) -> None:
    write(base.parent / "models/m.yaml",
          "model: {n_layer: 2, d_model: 64, max_seq_len: 64, d_ff: 99}\n")
    cfg = load_config(
        base,
        [
            "train.max_steps=20",
            "checkpoint.interval=5",
            "run.dir=runs/x",
            "optim.betas=[0.9,0.99]",
            "data.sources=[a.txt,b.txt]",
            "model.d_ff=null",
            "optim.lr=3e-4",
            "train.activation_checkpointing=true",
            "run.name=[not yaml",
            "checkpoint.interval=7",  # later wins
        ],
    )
    assert cfg.train.max_steps == 20 and cfg.checkpoint.interval == 7
    assert cfg.run.dir == "runs/x"
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.sources == ["a.txt", "b.txt"]
    assert cfg.model.d_ff is None
    assert cfg.optim.lr == 3e-4
    assert cfg.train.activation_checkpointing is True
    assert cfg.run.name == "[not yaml"
    assert cfg.model.n_layer == 2 and cfg.data.seq_len == 32  # untouched keys keep file values


def test_resolved_round_trip(base: Path, tmp_path: Path) -> None:
    cfg = load_config(base, ["optim.betas=[0.8,0.9]", "run.name=r"])
    d = resolved_dict(cfg)
    assert json.loads(json.dumps(d)) == d and d["optim"]["betas"] == [0.8, 0.9]
    out = tmp_path / "deep/dir/config.yaml"
    save_resolved(cfg, out)
    assert yaml.safe_load(out.read_text()) == d
    assert load_config(out) == cfg


# ------------------------------------------------------------------ errors


def test_unknown_key_in_file_names_file_line_and_suggestion(base: Path) -> None:
    write(base, base.read_text() + "  max_stpes: 10\n")
    [p] = problems(base)
    assert p == f"train.max_stpes: unknown key; did you mean train.max_steps? [{base}:6]"


def test_unknown_key_on_command_line(base: Path) -> None:
    assert problems(base, ["optim.learning_rat=1"]) == [
        "optim.learning_rat: unknown key; valid keys of optim: lr, min_lr, weight_decay, betas, "
        "eps, schedule, warmup_steps, decay_steps, grad_clip [command line]"
    ]
    [p] = problems(base, ["modle.n_layer=3"])
    assert p == "modle: unknown key; did you mean model? [command line]"
    [p] = problems(base, ["train.seq_len=3"])  # the name exists in another section
    assert p == "train.seq_len: unknown key; did you mean data.seq_len? [command line]"
    [p] = problems(base, ["data.tokenizer.vocab=3"])
    assert p == ("data.tokenizer.vocab: unknown key; did you mean data.tokenizer.vocab_size? "
                 "[command line]")


def test_wrong_type_out_of_range_and_bad_choice(base: Path) -> None:
    ps = problems(base, ["model.n_layer=abc", "parallel.zero_stage=4", "parallel.backend=mpi",
                         "optim.betas=[0.9,x]", "model.attention.dropout=1.0"])
    assert ps == [
        "model.n_layer: Input should be a valid integer, unable to parse string as an integer, "
        "got 'abc' [command line]",
        "model.attention.dropout: Input should be less than 1, got 1.0 [command line]",
        "parallel.zero_stage: Input should be less than or equal to 3, got 4 [command line]",
        "parallel.backend: Input should be 'auto', 'gloo' or 'nccl', got 'mpi' [command line]",
        "optim.betas[1]: Input should be a valid number, unable to parse string as a number, "
        "got 'x' [command line]",
    ]


def test_error_in_file_names_file_and_line(base: Path) -> None:
    write(base.parent / "models/m.yaml", "model:\n  n_layer: 0\n  positions: rotary\n")
    m = base.parent / "models/m.yaml"
    assert problems(base) == [
        f"model.n_layer: Input should be greater than or equal to 1, got 0 [{m}:2]",
        f"model.positions: Input should be 'learned', 'sinusoidal' or 'relative', got 'rotary' "
        f"[{m}:3]",
    ]


def test_missing_files(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yaml") == [f"config file not found: {tmp_path / 'nope.yaml'}"]
    write(tmp_path / "models/gpt.yaml", "{}")
    top = write(tmp_path / "top.yaml", "defaults:\n  - models/gpt\n  - models/gtp\n")
    assert problems(top) == [
        f"config file not found: {tmp_path / 'models/gtp.yaml'} (listed in defaults at "
        f"{top}:3); did you mean {tmp_path / 'models/gpt.yaml'}?"
    ]


def test_defaults_cycle_is_an_error_but_shared_includes_are_fine(tmp_path: Path) -> None:
    write(tmp_path / "common.yaml", "run: {seed: 7}\n")
    write(tmp_path / "a.yaml", "defaults: [common, b]\n")
    write(tmp_path / "b.yaml", "defaults: [common, a]\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert problems(a) == [f"defaults cycle: {a} -> {b} -> {a} (listed in defaults at {b}:1)"]
    write(tmp_path / "b.yaml", "defaults: [common]\nrun: {seed: 8}\n")
    assert load_config(a).run.seed == 8


def test_malformed_yaml(tmp_path: Path) -> None:
    dup = write(tmp_path / "dup.yaml", "train:\n  max_steps: 1\n  max_steps: 2\n")
    [p] = problems(dup)
    assert p.startswith(f"{dup}: not valid YAML: ")
    assert "duplicate key 'max_steps' (first given on line 2)" in p
    assert "line 3" in p
    bad = write(tmp_path / "bad.yaml", "train: [1\n")
    [p] = problems(bad)
    assert p.startswith(f"{bad}: not valid YAML: ")
    lst = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert problems(lst) == [f"{lst}: must be a mapping of sections, got [1, 2]"]
    entry = write(tmp_path / "entry.yaml", "defaults:\n  - 1\n")
    assert problems(entry) == [f"{entry}:2: defaults entries must be file paths, got 1"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    [p] = problems(binary)
    assert p.startswith(f"{binary}: cannot read: ")


def test_all_problems_are_reported_together(base: Path) -> None:
    write(base, base.read_text() + "  grad_acum_steps: 2\n  precision: fp8\n")
    with pytest.raises(ConfigError) as info:
        load_config(base, ["train.max_steps", "train..x=1", "optim.lr=-1"])
    ps = info.value.problems
    assert ps == [
        "override 'train.max_steps' has no '='; write key=value, e.g. train.max_steps=20",
        "override 'train..x=1': malformed key 'train..x'; expected dotted names such as optim.lr "
        "or data.tokenizer.vocab_size",
        "optim.lr: Input should be greater than 0, got -1 [command line]",
        f"train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16', got 'fp8' [{base}:7]",
        f"train.grad_acum_steps: unknown key; did you mean train.grad_accum_steps? [{base}:6]",
    ]
    text = str(info.value)
    assert text.splitlines() == [
        f"invalid config {base} with overrides ['train.max_steps', 'train..x=1', 'optim.lr=-1']: "
        "5 problems",
        *(f"  - {p}" for p in ps),
    ]
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert again.problems == ps and str(again) == text


def test_cross_field_problems_carry_provenance(base: Path) -> None:
    ps = problems(base, ["model.n_head=5", "optim.min_lr=1"])
    assert ps == [
        "model.n_head: must divide model.d_model=64, got 5 [command line]",
        "optim.min_lr: 1.0 is above optim.lr=0.001 [command line]",
    ]
    [p] = problems(base, ["model.max_seq_len=16"])
    assert p == (f"data.seq_len: 32 exceeds model.max_seq_len=16; lower data.seq_len or raise "
                 f"model.max_seq_len [{base}:3]")
    [p] = problems(base, ["data.tokenizer.eos_token=<eos>"])
    assert p.startswith("data.tokenizer.eos_token: '<eos>' is not in")
    assert p.endswith("[command line]")


def test_batch_rule_with_world_size(base: Path) -> None:
    over = ["train.global_batch_size=32", "train.grad_accum_steps=2"]
    assert load_config(base, over, world_size=2).train.global_batch_size == 32  # 8 x 2 x 2
    assert load_config(base, over).train.global_batch_size == 32  # world size unknown: no check
    assert problems(base, over, world_size=4) == [
        "train.global_batch_size: 32 != micro_batch_size 8 x grad_accum_steps 2 x data-parallel "
        "size 4 = 64; change one of them or leave global_batch_size unset [command line]"
    ]


# ------------------------------------------------------------------ the shipped configs


def test_shipped_configs_exist() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}
    assert {"gpt-default.yaml", "gpt-tiny.yaml", "models/gpt-tiny.yaml",
            "models/gpt-small-cpu.yaml", "models/gpt2-small.yaml", "models/gpt2-medium.yaml",
            "data/stdlib.yaml", "bert-tiny.yaml", "t5-tiny.yaml", "bert-default.yaml",
            "t5-default.yaml", "models/bert-base.yaml", "models/t5-base.yaml",
            "models/transformer-base.yaml", "data/stdlib-bert.yaml", "data/stdlib-t5.yaml",
            "optim/adamw-cosine.yaml", "logging/default.yaml",
            *(f"parallel/zero{s}.yaml" for s in range(4))} <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_configs_load_cleanly(path: Path) -> None:
    cfg = load_config(path, world_size=1)
    assert cfg.train.micro_batch_size >= 1
    _, sources = compose_config(path)
    assert all(src.rpartition(":")[2].isdigit() for src in sources.values())  # every key located


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_fragments_are_valid_keys(path: Path) -> None:
    data, _ = compose_config(path)
    assert data and "defaults" not in data
    Config.model_validate(data)  # types and names; cross-field checks need a whole run


def test_default_run_is_the_make_pretrain_run() -> None:
    cfg = load_config(CONFIGS / "gpt-default.yaml")
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.max_seq_len) == (
        4, 256, 4, 128)
    assert (cfg.data.sources, cfg.data.dir, cfg.data.seq_len, cfg.data.tokenizer.vocab_size) == (
        ["stdlib"], "data/stdlib", 128, 8192)
    assert cfg.parallel.zero_stage == 2 and cfg.run.dir == "runs/gpt-default"
    assert (cfg.train.max_steps, cfg.train.micro_batch_size, cfg.checkpoint.interval,
            cfg.train.eval_interval) == (800, 8, 200, 200)
    tiny = load_config(CONFIGS / "gpt-tiny.yaml")
    assert (tiny.model.n_layer, tiny.model.d_model, tiny.data.seq_len, tiny.data.dir,
            tiny.data.tokenizer.vocab_size) == (2, 64, 32, "data/tiny", 512)
    for stage in range(4):
        assert load_config(CONFIGS / f"parallel/zero{stage}.yaml").parallel.zero_stage == stage


def _gpt2_parameters(cfg: Config, vocab: int) -> int:
    """Parameters of a GPT-2 shaped model with tied embeddings and biases."""
    m, d = cfg.model, cfg.model.d_model
    ff = m.d_ff or 4 * d
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d)
    return vocab * d + m.max_seq_len * d + m.n_layer * block + 2 * d


@pytest.mark.parametrize(
    "name, published", [("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168)]
)
def test_gpt2_shapes_match_the_published_models(name: str, published: int) -> None:
    data, _ = compose_config(CONFIGS / f"models/{name}.yaml")
    cfg = Config.model_validate(data)
    assert cfg.model.vocab_size == 50304  # 50257 padded to a multiple of 64
    # Hugging Face's gpt2 / gpt2-medium parameter counts, with GPT-2's unpadded 50257 tokens.
    assert _gpt2_parameters(cfg, 50257) == published


@pytest.mark.parametrize("name, published", [
    ("bert-base", 110_106_428),     # HF BertForPreTraining(BertConfig()): bert-base-uncased
    ("t5-base", 222_903_552),       # HF T5ForConditionalGeneration of t5-base
    ("t5-v1_1-base", 247_577_856),  # google/t5-v1_1-base (gated-GELU, untied head)
])
def test_encoder_presets_match_the_published_models(name: str, published: int) -> None:
    import torch

    from pretrain.model import build_model

    data, _ = compose_config(CONFIGS / f"models/{name}.yaml")
    cfg = Config.model_validate(data).model
    with torch.device("meta"):
        model = build_model(cfg, cfg.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == published  # tied tensors once


# ------------------------------------------------------------------ README


def test_readme_reference_is_up_to_date() -> None:
    text = (CONFIGS / "README.md").read_text()
    generated = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert generated.strip() == config_reference_markdown().strip(), (
        "configs/README.md is stale: run `python -m pretrain.config_io --update-readme`"
    )
    for example in ("train.max_steps=20", "checkpoint.interval=5", "run.dir=runs/x", "defaults:"):
        assert example in text


def test_reference_lists_every_key_with_type_default_and_docstring() -> None:
    ref = config_reference_markdown()
    assert "### `data.tokenizer`" in ref and "### `model.attention`" in ref
    assert ("| `zero_stage` | int, >= 0, <= 3 | `2` | DeepSpeed ZeRO stage: 0 none, 1 optimizer "
            "states, 2 + gradients, 3 + parameters sharded over data-parallel ranks. |") in ref
    assert '| `backend` | "auto" \\| "gloo" \\| "nccl" | `"auto"` |' in ref
    rows = [line for line in ref.splitlines() if line.startswith("| `")]
    fields = sum(len(type(s).model_fields) for s in _all_sections(Config()))
    assert len(rows) == fields


def _all_sections(model: BaseModel):
    for value in dict(model).values():
        if isinstance(value, BaseModel):
            yield value
            yield from _all_sections(value)
