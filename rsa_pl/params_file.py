"""Reading params.yaml against the schema of rsa_pl/config.py, every problem reported at once.

The YAML is read as YAML 1.2 reads floats (1e-5 is a number), validated section by section,
and every problem of the file, field errors and cross-field rules alike, is collected with its
dotted key path into one ParamsError, e.g. `train_safety.risk.mu: must be in (0, 1] for cvar,
got 1.5`; an unknown key comes with the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rsa_pl.config import Params, Problem, Section, nested_section

__all__ = ["ParamsError", "load_params", "parse_params"]


class ParamsError(ValueError):
    """Invalid params: every problem with its dotted key path."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [
            f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
            for path, message in self.problems
        ]
        return "\n".join(lines)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float, as YAML 1.2 does (YAML 1.1 reads a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _model_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that the key path loc leads to, or None."""
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            return None
        model = nested_section(field.annotation)
    return model


def _unknown_key_message(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    parent = _model_at(model, loc[:-1])
    valid = list(parent.model_fields) if parent else []
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key; {hint}"


def _describe(model: type[BaseModel], error: Mapping[str, Any]) -> Problem:
    loc = tuple(error["loc"])
    path = ".".join(str(part) for part in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return path, _unknown_key_message(model, loc)
    if kind == "missing":
        return path, "missing (every key is required; params have no hidden defaults)"
    message = error["msg"][0].lower() + error["msg"][1:]
    return path, f"{message}, got {error['input']!r}"


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _cross_field_problems(section: Section, prefix: str) -> list[Problem]:
    problems = [(_join(prefix, path), message) for path, message in section.cross_field_problems()]
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, Section):
            problems += _cross_field_problems(value, _join(prefix, name))
    return problems


def _validate(model: type[Section], raw: Any, prefix: str) -> tuple[Section | None, list[Problem]]:
    """Validate raw as model; return it (or None) and every problem found, with full key paths.

    When fields fail, the nested sections are still validated on their own for their
    cross-field rules, so one run reports as much as can be known.
    """
    try:
        section = model.model_validate(raw)
    except ValidationError as error:
        problems = [(_join(prefix, path), message) for path, message in (_describe(model, e) for e in error.errors())]
        if isinstance(raw, Mapping):
            for name, field in model.model_fields.items():
                nested = nested_section(field.annotation)
                if nested is not None and isinstance(raw.get(name), Mapping):
                    problems += _validate(nested, raw[name], _join(prefix, name))[1]
        return None, list(dict.fromkeys(problems))  # nested field problems come twice
    return section, _cross_field_problems(section, prefix)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raises ParamsError listing every problem."""
    if not isinstance(raw, Mapping):
        raise ParamsError(source, [("", f"must be a mapping of sections, got {type(raw).__name__}")])
    params, problems = _validate(Params, raw, "")
    if problems or params is None:
        raise ParamsError(source, problems)
    return params  # type: ignore[return-value]


def load_params(path: str | Path) -> Params:
    """Read and validate a params.yaml file; raises ParamsError with every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(str(path), [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ParamsError(str(path), [("", f"cannot read: {error}")]) from None
    try:
        raw = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f"line {where.line + 1}: " if where is not None else ""
        raise ParamsError(str(path), [("", f"{line}invalid YAML: {getattr(error, 'problem', error)}")]) from None
    return parse_params(raw, str(path))
