"""Load a run configuration: YAML files composed with `defaults:`, dotted overrides, clear errors.

    cfg = load_config("configs/gpt-default.yaml", ["train.max_steps=20", "run.dir=runs/x"])

Composition: a file may list other files under a top-level `defaults:` key (paths relative to
that file, `.yaml` optional). They are merged in order, recursively, then the file itself on top,
then the command-line overrides in order. Mappings merge key by key; lists and scalars replace.

Every key remembers where it was last set (`configs/x.yaml:12` or `command line`), so each
problem (unknown key, wrong type, value out of range, inconsistent fields) is reported with its
dotted key, its origin and what is allowed, all problems at once in one ConfigError.

    python -m pretrain.config_io CONFIG [key=value ...] [--world-size N]  # print resolved YAML
    python -m pretrain.config_io --update-readme                          # regenerate reference
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import re
import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from data_pipeline.format import atomic_write_text
from pretrain.config import Config, validate_config

COMMAND_LINE = "command line"
README = Path(__file__).resolve().parents[1] / "configs" / "README.md"
README_BEGIN = "<!-- BEGIN GENERATED REFERENCE: python -m pretrain.config_io --update-readme -->"
README_END = "<!-- END GENERATED REFERENCE -->"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ConfigError(ValueError):
    """Every problem found in a configuration; str() lists them one per line."""

    def __init__(self, problems: Sequence[str], context: str = "invalid configuration") -> None:
        self.problems = list(problems)
        self.context = context
        super().__init__(self.problems, context)  # args re-create the error when unpickled

    def __str__(self) -> str:
        n = len(self.problems)
        lines = [f"{self.context}: {n} problem{'' if n == 1 else 's'}"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


# ---------------------------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, plus: `1e-3` is a float (YAML 1.2; PyYAML alone reads a string), and a key
    given twice in one mapping is an error instead of the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag != "tag:yaml.org,2002:str":  # `<<` merge keys, numbers...
                continue
            key = key_node.value
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first[key]})",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """An override's value as YAML (`20` int, `[0.9,0.99]` list, `null` None); else the string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _display(path: Path) -> str:
    """`path` relative to the working directory when it is below it (shorter messages)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _line_numbers(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of the key, for every key of nested mappings; `key[i]` -> line
    of a list's i-th item."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_line_numbers(value_node, key + "."))
            if isinstance(value_node, yaml.SequenceNode):
                for i, item in enumerate(value_node.value):
                    lines[f"{key}[{i}]"] = item.start_mark.line + 1
    return lines


def _leaves(value: Any, key: str) -> Iterator[str]:
    """Dotted keys of the values that setting `key` to `value` sets (mappings are not values)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}")
    else:
        yield key


def _merge(
    base: dict, over: dict, sources: dict[str, str], origin: Any, prefix: str = ""
) -> None:
    """Deep-merge `over` into `base` in place; `origin(dotted_key)` says where a value is from."""
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, sources, origin, key + ".")
            continue
        for old in [s for s in sources if s == key or s.startswith(key + ".")]:
            del sources[old]
        base[k] = copy.deepcopy(v)
        for leaf in _leaves(v, key):
            sources[leaf] = origin(leaf)


class _Composer:
    """Reads a config file and its `defaults:` recursively into one dict plus provenance."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.sources: dict[str, str] = {}
        self.problems: list[str] = []

    def file(self, path: Path, chain: tuple[Path, ...] = (), included_at: str = "") -> None:
        path = path.resolve()
        where = f" (listed in defaults at {included_at})" if included_at else ""
        if path in chain:
            cycle = " -> ".join(_display(p) for p in (*chain[chain.index(path):], path))
            self.problems.append(f"defaults cycle: {cycle}{where}")
            return
        if not path.is_file():
            what = "config path is not a file" if path.exists() else "config file not found"
            self.problems.append(f"{what}: {_display(path)}{where}{_near(path)}")
            return
        name = _display(path)
        try:
            loader = _Loader(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            self.problems.append(f"{name}: cannot read{where}: {e}")
            return
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        except yaml.YAMLError as e:
            self.problems.append(f"{name}: not valid YAML{where}: {e}")
            return
        finally:
            loader.dispose()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problems.append(f"{name}: must be a mapping of sections, got {_short(data)}")
            return
        lines = _line_numbers(node) if node is not None else {}
        defaults = data.pop("defaults", None) or []
        if isinstance(defaults, str):
            defaults = [defaults]
        for i, entry in enumerate(defaults if isinstance(defaults, list) else [defaults]):
            at = f"{name}:{lines.get(f'defaults[{i}]', lines.get('defaults', '?'))}"
            if not isinstance(entry, str) or not entry:
                self.problems.append(f"{at}: defaults entries must be file paths, got {entry!r}")
                continue
            sub = path.parent / entry
            if not sub.is_file() and sub.suffix not in (".yaml", ".yml"):
                sub = sub.with_name(sub.name + ".yaml")
            self.file(sub, (*chain, path), at)
        _merge(self.data, data, self.sources, lambda k: f"{name}:{lines.get(k, '?')}")

    def overrides(self, overrides: Sequence[str]) -> None:
        for text in overrides:
            key, eq, value = text.partition("=")
            key = key.strip()
            if not eq:
                self.problems.append(
                    f"override {text!r} has no '='; write key=value, e.g. train.max_steps=20"
                )
            elif not _KEY.fullmatch(key):
                self.problems.append(
                    f"override {text!r}: malformed key {key!r}; expected dotted names such as "
                    "optim.lr or data.tokenizer.vocab_size"
                )
            else:
                nested: Any = parse_value(value)
                for part in reversed(key.split(".")):
                    nested = {part: nested}
                _merge(self.data, nested, self.sources, lambda k: COMMAND_LINE)


def _near(path: Path) -> str:
    """`; did you mean x.yaml?` from the YAML files next to a missing one, or nothing."""
    if not path.parent.is_dir():
        return ""
    names = [p.name for p in path.parent.glob("*.yaml")]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"; did you mean {_display(path.parent / close[0])}?" if close else ""


def compose_config(
    path: str | os.PathLike, overrides: Sequence[str] = ()
) -> tuple[dict, dict[str, str]]:
    """The merged, not yet validated dict and, per dotted key, where it was set.

    Raises ConfigError for missing or unreadable files, `defaults` cycles and malformed overrides.
    """
    composer = _Composer()
    composer.file(Path(path))
    composer.overrides(overrides)
    if composer.problems:
        raise ConfigError(composer.problems, f"cannot load config {path}")
    return composer.data, composer.sources


# ---------------------------------------------------------------------------------------------
# Validation and error messages


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field's type (`Model` or `Model | None`), None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return next((a for a in get_args(annotation) if _section_class(a)), None)
    return None


def _sections(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, section class) of every section under `model`, depth first."""
    for name, field in model.model_fields.items():
        sub = _section_class(field.annotation)
        if sub is not None:
            yield f"{prefix}{name}", sub
            yield from _sections(sub, f"{prefix}{name}.")


def all_keys() -> list[str]:
    """Every valid dotted key (sections included)."""
    keys = [name for name in Config.model_fields]
    for section, model in _sections():
        keys += [f"{section}.{name}" for name in model.model_fields]
    return keys


def _source(sources: dict[str, str], key: str) -> str:
    """Where `key` (or the value containing it, or a value inside it) was set."""
    k = key
    while k:
        if k in sources:
            return sources[k]
        k = k.rpartition(".")[0]
    inside = [src for s, src in sources.items() if s.startswith(key + ".")]
    return inside[0] if inside else "default value"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_key_hint(parent: type[BaseModel], name: str, key: str) -> str:
    siblings = list(parent.model_fields)
    prefix = key.rpartition(".")[0]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    elsewhere = [k for k in all_keys() if k.rpartition(".")[2] == name]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere)}?"
    return f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(siblings)}"


def _describe(error: dict, sources: dict[str, str]) -> str:
    """One pydantic error as `dotted.key: what is wrong, got X [origin]`."""
    model: type[BaseModel] | None = Config
    parent: type[BaseModel] = Config
    names: list[str] = []
    shown = ""
    for part in error["loc"]:
        if isinstance(part, int):  # index into a list or tuple value
            shown += f"[{part}]"
            model = None
        elif model is not None:  # a key; strings below a value are pydantic's union-member tags
            parent = model
            names.append(part)
            shown += ("." if shown else "") + part
            field = model.model_fields.get(part)
            model = _section_class(field.annotation) if field else None
    key = ".".join(names)
    origin = _source(sources, key)
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; {_unknown_key_hint(parent, names[-1], key)} [{origin}]"
    return f"{shown}: {error['msg']}, got {_short(error['input'])} [{origin}]"


def load_config(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
) -> Config:
    """Compose, override and validate a run config; ConfigError lists every problem found.

    `world_size` (number of processes), when known, enables the batch-size checks.
    """
    composer = _Composer()
    composer.file(Path(path))
    composer.overrides(overrides)
    problems = composer.problems
    context = f"invalid config {path}" + (f" with overrides {list(overrides)}" if overrides else "")
    try:
        cfg = Config.model_validate(composer.data)
    except ValidationError as e:
        problems += [_describe(err, composer.sources) for err in e.errors(include_url=False)]
        raise ConfigError(problems, context) from None
    if not problems:
        problems += [
            f"{key}: {message} [{_source(composer.sources, key)}]"
            for key, message in validate_config(cfg, world_size)
        ]
    if problems:
        raise ConfigError(problems, context)
    return cfg


def resolved_dict(cfg: Config) -> dict:
    """Every key with its final value, as plain JSON-able types (tuples become lists)."""
    return cfg.model_dump(mode="json")


def resolved_yaml(cfg: Config) -> str:
    return yaml.safe_dump(resolved_dict(cfg), sort_keys=False, default_flow_style=False)


def save_resolved(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); load_config reads it back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved configuration: every key with its final value.\n"
    atomic_write_text(path, header + resolved_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# Reference documentation (configs/README.md)

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))


def _bounds(metadata: Iterable[Any]) -> list[str]:
    """`>= 1`, `< 1.0`, ... from pydantic field metadata (constraints, or FieldInfos holding
    them)."""
    out = []
    for m in metadata:
        if isinstance(m, FieldInfo):
            out += _bounds(m.metadata)
        out += [f"{sym} {getattr(m, attr)}" for cls, attr, sym in _BOUNDS if isinstance(m, cls)]
    return out


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Annotated:  # e.g. Annotated[int, Field(ge=1)] -> "int >= 1"
        return " ".join([_type_name(args[0]), *_bounds(args[1:])])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def config_reference_markdown() -> str:
    """A markdown table per section: key, type (with allowed range), default, description."""
    out: list[str] = []
    for section, model in _sections():
        parent, _, name = section.rpartition(".")
        owner = dict(_sections()).get(parent, Config)
        about = owner.model_fields[name].description
        out += [f"### `{section}`", ""] + ([_cell(about), ""] if about else [])
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            if _section_class(field.annotation) is not None:
                kind, default = "section", f"see `{section}.{key}`"
            else:
                bounds = _bounds(field.metadata)
                kind = ", ".join([_type_name(field.annotation), *bounds])
                default = f"`{json.dumps(field.default)}`"
            out.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | "
                       f"{_cell(field.description or '')} |")
        out.append("")
    return "\n".join(out)


def update_readme(path: str | os.PathLike) -> bool:
    """Replace the generated part of `path` between the markers; True if it changed."""
    text = Path(path).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path}: markers {README_BEGIN!r} ... {README_END!r} not found")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    new = f"{head}{README_BEGIN}\n\n{config_reference_markdown()}\n{README_END}{tail}"
    if new != text:
        atomic_write_text(path, new)
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.config_io",
        description="Print a resolved config, or regenerate the reference in configs/README.md.",
    )
    parser.add_argument("config", nargs="?", help="YAML run config, e.g. configs/gpt-default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--world-size", type=int, default=None, help="check batches for N ranks")
    parser.add_argument("--update-readme", nargs="?", const=str(README), metavar="README",
                        help="rewrite the reference in README (default: configs/README.md)")
    args = parser.parse_intermixed_args(argv)
    if args.update_readme:
        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: {'updated' if changed else 'already up to date'}")
        return 0
    if not args.config:
        parser.error("give a config file or --update-readme")
    try:
        cfg = load_config(args.config, args.overrides, args.world_size)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(resolved_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
