"""Turning YAML files and pydantic validation failures into :class:`ConfigError` messages.

Every message names the file, the dotted field path and what was expected; an unknown key also
gets the closest valid key name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from moesim.errors import ConfigError, ConfigErrors
from moesim.registry import closest

M = TypeVar("M", bound=BaseModel)


MAX_FILE_BYTES = 4 * 2**20
"""Largest scenario, model or profile file read (4 MiB; the shipped ones are under 10 KiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists in a YAML or JSON configuration file."""
MAX_NODES = 100_000
"""Most values a YAML file may expand to, aliases counted at every use ("billion laughs")."""


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` that answers False, not ``OSError``, for a name too long or unreadable."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a configuration file, read with a size limit.

    Raises:
        ConfigError: missing, unreadable (a device, a name too long), over
            :data:`MAX_FILE_BYTES`, or not UTF-8 (with the byte offset).
    """
    p = Path(path)
    if not is_file(p):
        raise ConfigError(p, "", "file not found")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(p, "", f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(p, "", f"file larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(p, "", f"not UTF-8 text (byte {exc.start})") from None


try:  # libyaml's scanner and parser (PyYAML wheels bundle it): 10x faster than pure Python
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _Parser  # type: ignore[assignment]


class _Loader(Composer, _Parser, SafeConstructor, Resolver):
    """Safe loading with libyaml's parser but PyYAML's composer, which stops past
    :data:`MAX_DEPTH` levels before recursing deeper. (libyaml's own composer recurses in C:
    older PyYAML wheels crash on 100,000 nested brackets instead of raising.)"""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        Composer.__init__(self)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(text: str) -> Any:
    """Compose the node graph (depth-checked), check what its aliases expand to, and only then
    build Python objects."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise yaml.YAMLError(
                f"the document expands to more than {MAX_NODES:,} values through its aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """Values a node graph stands for once every alias is expanded (capped just past the
    limit); iterative, each shared (aliased) node counted from its own size once."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done or not children:
            total = 1 + sum(sizes[id(c)] for c in children)
            sizes[id(node)] = min(total, MAX_NODES + 1)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no Python objects) within the limits above.

    Raises:
        ConfigError: the file is missing, unreadable, too large, not UTF-8, not valid YAML
            (with line and column), nested or expanding past the limits, or not a mapping at
            the top level.
    """
    p = Path(path)
    text = read_text(p)
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(p, "", f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(p, "", f"invalid YAML: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ConfigError(p, "", f"expected a mapping of fields, got {type(data).__name__}")
    return data


def read_json(path: str | Path) -> Any:
    """Read a JSON configuration file (e.g. a Hugging Face ``config.json``) within the limits.

    Raises:
        ConfigError: as :func:`read_text`, or invalid JSON, or nested past :data:`MAX_DEPTH`.
    """
    p = Path(path)
    text = read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(p, "", f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(p, "", f"invalid JSON: nested deeper than {MAX_DEPTH} levels") from None
    if _json_depth(data) > MAX_DEPTH:
        raise ConfigError(p, "", f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    return data


def _json_depth(data: Any) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


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
