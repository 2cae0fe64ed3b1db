"""Turning YAML files and pydantic validation failures into :class:`ConfigError` messages.

Every message names the file, the dotted field path and what was expected; an unknown key also
gets the closest valid key name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from moesim.errors import ConfigError, ConfigErrors
from moesim.registry import closest

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Raises:
        ConfigError: the file is missing, is not valid YAML (with line and column) or is not a
            mapping at the top level.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "", "file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(p, "", f"invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(p, "", f"expected a mapping of fields, got {type(data).__name__}")
    return data


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names at ``loc`` inside ``model`` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (
            isinstance(current, type) and issubclass(current, BaseModel)
        ):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation, part)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any, tag: Any) -> Any:
    """The BaseModel inside an annotation (unwrapping Optional/Union, tagged by ``tag``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _message(err: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """(field path, message) for one pydantic error dict."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = ".".join(str(p) for p in loc if not _is_union_tag(p))
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if not _is_union_tag(p))
        valid = _field_names(model, parent)
        hint = closest(str(loc[-1]), valid)
        listing = f"; valid keys: {', '.join(valid)}" if valid else ""
        return path, f"unknown key '{loc[-1]}'{hint}{listing}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f", got {got!r}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return path, f"{msg}{shown}"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        "[" in part or part.endswith("Policy") or part.endswith("Spec")
    )


def validate(model: type[M], data: Any, file: str | Path | None, prefix: str = "") -> M:
    """Validate ``data`` against ``model`` or raise :class:`ConfigErrors` naming every problem.

    Args:
        model: The pydantic model class.
        data: Parsed YAML (usually a dict).
        file: File the data came from, for messages.
        prefix: Dotted path of ``data`` inside a larger document, for messages.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            path, msg = _message(dict(err), model)
            full = ".".join(p for p in (prefix, path) if p)
            errors.append(ConfigError(file, full, msg))
        raise ConfigErrors(errors) from None
