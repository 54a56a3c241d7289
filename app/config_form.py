"""The Setup form, generated from the config schema: field specs, form values <-> config dict, problems.

`form_fields()` walks trainers.config.TrainConfig, so a field added to the schema shows up in the UI
without touching this module. Form values are a flat list in `form_fields()` order (how Gradio passes them).
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from trainers.config import TrainConfig, describe_errors

# (section key, title); "run" holds the top-level fields (name, output_dir).
SECTIONS: list[tuple[str, str]] = [
    ("run", "Run"),
    ("model", "Model"),
    ("dataset", "Dataset"),
    ("lora", "LoRA"),
    ("training", "Training"),
    ("optimizer", "Optimizer"),
    ("sampling", "Sampling"),
    ("saving", "Saving"),
    ("validation", "Validation (dataset.validation's images)"),
    ("health", "Optimizer warnings"),
    ("flux", "Flux (model.family flux or flux2)"),
]
RUN_SECTION = "run"

# "optional_number" is typed into a textbox: an empty box means None (a number widget cannot be empty).
Kind = Literal[
    "checkbox", "dropdown", "number", "optional_number", "text", "lines", "choices", "numbers", "scalar"
]


@dataclass(frozen=True)
class FieldSpec:
    """One form field: where it lives in the config, which widget shows it, and its help text."""

    key: str  # dotted config key, e.g. "training.max_steps" or "name"
    section: str  # a SECTIONS key
    name: str  # the field name inside its section
    kind: Kind
    info: str
    default: Any  # None when the field has no default (required)
    required: bool
    optional: bool  # None is a valid value (an empty widget means None)
    integer: bool = False  # number fields: int rather than float
    choices: tuple[str, ...] = ()

    @property
    def elem_id(self) -> str:
        """HTML id of the widget, e.g. "field-training-max_steps"."""
        return f"field-{self.section}-{self.name}"


# ---------------------------------------------------------------- schema -> specs
def form_fields(root: type[BaseModel] = TrainConfig) -> list[FieldSpec]:
    """Every leaf field of the schema, in schema order, grouped by section."""
    specs: list[FieldSpec] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in root.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested.append((name, field.annotation))
        else:
            specs.append(_spec(RUN_SECTION, name, name, field))
    for section, model in nested:
        specs += [
            _spec(section, f"{section}.{name}", name, field) for name, field in model.model_fields.items()
        ]
    order = [key for key, _ in SECTIONS]
    return sorted(specs, key=lambda spec: order.index(spec.section))


def _spec(section: str, key: str, name: str, field: Any) -> FieldSpec:
    annotation = field.annotation
    args = typing.get_args(annotation)
    optional = _is_union(annotation) and type(None) in args
    core = _without_none(annotation)
    default = _default(field)
    kind, integer, choices = _widget(core)
    if kind == "number" and optional:
        kind = "optional_number"
    info = field.description or ""
    return FieldSpec(
        key=key,
        section=section,
        name=name,
        kind=kind,
        info=_with_hint(info, kind, default),
        default=default,
        required=field.is_required(),
        optional=optional,
        integer=integer,
        choices=choices,
    )


def _widget(annotation: Any) -> tuple[Kind, bool, tuple[str, ...]]:
    """(kind, integer, choices) of a type with None already removed."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "checkbox", False, ()
    if annotation is int or annotation is float:
        return "number", annotation is int, ()
    if annotation is str:
        return "text", False, ()
    if origin is Literal:
        return "dropdown", False, tuple(str(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        if typing.get_origin(item) is Literal:
            return "choices", False, tuple(str(a) for a in typing.get_args(item))
        return "lines", False, ()
    if origin is tuple:
        return "numbers", False, ()
    return "scalar", False, ()  # unions such as int | float | Literal["auto"]


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _without_none(annotation: Any) -> Any:
    if not _is_union(annotation):
        return annotation
    rest = [a for a in typing.get_args(annotation) if a is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 (built at run time)


def _default(field: Any) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return None


def _with_hint(info: str, kind: Kind, default: Any) -> str:
    """The schema's description plus how to type the value, and the default where it helps."""
    hints = {
        "lines": "One per line.",
        "numbers": "Comma-separated numbers.",
        "scalar": "A number, or one of the words named.",
        "optional_number": "Empty: not set.",
    }
    parts = [info] if info else []
    if kind in hints:
        parts.append(hints[kind])
    if not info and default is not None and kind != "checkbox":
        parts.append(f"Default: {_show(default)}.")
    elif not info and kind == "checkbox":
        parts.append(f"Default: {'on' if default else 'off'}.")
    return " ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "none"
    return str(value)


# ---------------------------------------------------------------- config -> form values
def values_from_config(data: dict[str, Any] | BaseModel, specs: list[FieldSpec] | None = None) -> list[Any]:
    """Widget values for a (possibly partial) config dict or a TrainConfig; missing fields get defaults."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="python")
    specs = specs or form_fields()
    return [to_widget(spec, _lookup(data, spec)) for spec in specs]


def _lookup(data: dict[str, Any], spec: FieldSpec) -> Any:
    node: Any = data
    for part in spec.key.split("."):
        if not isinstance(node, dict) or part not in node:
            return spec.default
        node = node[part]
    return node


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value as its widget shows it (lists as lines, tuples as "a, b", None as empty)."""
    if spec.kind == "lines":
        return "\n".join(str(v) for v in value or [])
    if spec.kind == "numbers":
        return ", ".join(_number_text(v) for v in value or [])
    if spec.kind == "choices":
        return [str(v) for v in value or []]
    if spec.kind in ("text", "scalar", "optional_number"):
        return "" if value is None else _number_text(value) if isinstance(value, float) else str(value)
    if spec.kind == "checkbox":
        return bool(value)
    return value


def _number_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- form values -> config
def config_dict_from_values(
    values: list[Any], specs: list[FieldSpec] | None = None
) -> tuple[dict, list[str]]:
    """(nested config dict, problems of values that could not be read); pydantic checks the rest."""
    specs = specs or form_fields()
    if len(values) != len(specs):
        raise ValueError(f"expected {len(specs)} form values, got {len(values)}")
    data: dict[str, Any] = {}
    problems = []
    for spec, raw in zip(specs, values):
        try:
            value = from_widget(spec, raw)
        except ValueError as error:
            problems.append(f"{spec.key}: {error}")
            continue
        if value is _OMIT:
            continue
        node = data
        *parents, leaf = spec.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data, problems


_OMIT = object()  # leave the key out, so pydantic reports a required field as missing


def from_widget(spec: FieldSpec, raw: Any) -> Any:
    """A widget value as the config value; raises ValueError with a message for text it cannot read."""
    if spec.kind == "checkbox":
        return bool(raw)
    if spec.kind == "choices":
        return list(raw or [])
    if spec.kind in ("number", "optional_number"):
        return _number(spec, raw)
    text = "" if raw is None else str(raw).strip()
    if spec.kind == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if spec.kind == "numbers":
        return [_parse_float(part) for part in text.split(",") if part.strip()]
    if not text and (spec.optional or spec.kind == "scalar"):
        return None
    if not text and spec.required:
        return _OMIT
    if spec.kind == "scalar":
        return parse_scalar(text)
    return text if spec.kind == "text" else raw


def _number(spec: FieldSpec, raw: Any) -> Any:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None  # pydantic names the field if it needs a number
    value = _parse_float(raw) if isinstance(raw, str) else raw
    if spec.integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _parse_float(text: Any) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise ValueError(f"{str(text).strip()!r} is not a number") from None


def parse_scalar(text: str) -> int | float | str:
    """ "100" -> 100, "0.25" -> 0.25, "1e-8" -> 1e-08, anything else (e.g. "auto") -> the text."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, int | float) and not isinstance(value, bool) else text


def validate_values(
    values: list[Any], specs: list[FieldSpec] | None = None
) -> tuple[TrainConfig | None, list[str]]:
    """(validated config, []) or (None, problems), each problem "section.field: message"."""
    data, problems = config_dict_from_values(values, specs)
    if problems:
        return None, problems
    return validate_dict(data)


def validate_dict(data: dict[str, Any]) -> tuple[TrainConfig | None, list[str]]:
    """(validated config, []) or (None, problems) for a nested config dict."""
    try:
        return TrainConfig.model_validate(data), []
    except ValidationError as error:
        return None, describe_errors(error, TrainConfig)


# ---------------------------------------------------------------- problems by section
_LEADING_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


def problem_section(problem: str) -> str:
    """The SECTIONS key a problem line belongs to (by its leading "section.field" or "section:")."""
    match = _LEADING_KEY.match(problem)
    section = match.group(1) if match else ""
    return section if section in dict(SECTIONS) else RUN_SECTION


def problems_by_section(problems: list[str]) -> dict[str, list[str]]:
    """Problem lines grouped by section; every section has a (maybe empty) list."""
    grouped: dict[str, list[str]] = {key: [] for key, _ in SECTIONS}
    for problem in problems:
        grouped[problem_section(problem)].append(problem)
    return grouped


def problems_for_field(problems: list[str], key: str) -> list[str]:
    """Problem lines about one dotted key."""
    return [p for p in problems if p.startswith(f"{key}:")]


# ---------------------------------------------------------------- presets and TOML files
def list_presets(presets_dir: Path) -> dict[str, Path]:
    """Preset name (file stem) -> path of each presets/*.toml, sorted by name."""
    folder = Path(presets_dir)
    return {path.stem: path for path in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def read_toml(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(config dict, []) or ({}, [problem]) for a TOML file."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8")), []
    except tomllib.TOMLDecodeError as error:
        return {}, [f"{path}: not valid TOML ({error})"]
    except (OSError, UnicodeDecodeError) as error:
        return {}, [f"{path}: cannot read ({error})"]


_TOML_POSITION = re.compile(r"\(at line \d+, column \d+\)|\(at end of document\)")


def read_config_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(config dict, []) or ({}, [problem]) for a TOML file typed or uploaded into the UI.

    Unlike read_toml, a problem never quotes the file (a key, a value, a line of it): whoever typed the
    path learns only that it is not a config, and where its TOML breaks.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return {}, [f"{path}: not UTF-8 text; save it as UTF-8"]
    except OSError as error:
        return {}, [f"{path}: cannot be read ({error.strerror or type(error).__name__})"]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        position = _TOML_POSITION.search(str(error))
        return {}, [f"{path}: not valid TOML {position.group(0) if position else ''}".rstrip()]
    unknown = unknown_key_count(data)
    if unknown:
        return {}, [
            f"{path}: not a ppsf-trainer config ({unknown} key(s) that are not config fields); "
            "compare it with a preset"
        ]
    return data, []


def unknown_key_count(data: dict[str, Any], model: type[BaseModel] = TrainConfig) -> int:
    """How many keys of `data` (at any depth) are not fields of `model`, a section given as a non-table
    counting as one."""
    count = 0
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            count += 1
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            count += unknown_key_count(value, field.annotation) if isinstance(value, dict) else 1
    return count


# ---------------------------------------------------------------- the form kept in the browser
def form_snapshot(values: list[Any] | tuple, specs: list[FieldSpec]) -> dict[str, Any]:
    """The form as {dotted key: widget value}, as the browser keeps it (output_dir is the UI's, not kept)."""
    return {spec.key: value for spec, value in zip(specs, values) if spec.key != "output_dir"}


def restorable_values(saved: Any, specs: list[FieldSpec]) -> dict[str, Any]:
    """The entries of a kept form that still fit today's fields: known keys, values of the widget's type
    (a field since added keeps its default; a renamed one, a dropdown choice that went away, or anything
    a page could have put there are dropped)."""
    if not isinstance(saved, dict):
        return {}
    by_key = {spec.key: spec for spec in specs if spec.key != "output_dir"}
    return {key: value for key, value in saved.items() if key in by_key and _fits(by_key[key], value)}


def _fits(spec: FieldSpec, value: Any) -> bool:
    if spec.kind == "checkbox":
        return isinstance(value, bool)
    if spec.kind == "dropdown":
        return value in spec.choices
    if spec.kind == "choices":
        return isinstance(value, list) and all(item in spec.choices for item in value)
    if spec.kind == "number":
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    return isinstance(value, str)
