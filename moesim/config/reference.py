"""The scenario reference, generated from the pydantic models (the docs site's scenario page).

Every setting a scenario file accepts, one table per section, with its type, default and the
description the model declares, so the reference cannot drift from what is validated.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel


def reference_markdown(model: type[BaseModel] | None = None) -> str:
    """Markdown tables of every field of ``model`` (the scenario by default), a section per
    nested model, fields as dotted paths (``policies.capacity.factor``)."""
    if model is None:
        from moesim.config.scenario import Scenario

        model = Scenario
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    sections: list[tuple[str, str, list[tuple[str, str, str, str]]]] = []
    _walk(schema, "", defs, sections, schema.get("description", ""))
    out = []
    for path, doc, rows in sections:
        if not rows:
            continue
        out.append(f"### `{path}`" if path else "### Top level")
        if doc:
            out.append("\n" + " ".join(doc.split()))
        out.append("\n| setting | type | default | meaning |\n|---|---|---|---|")
        out += [f"| `{n}` | {t} | {d} | {m} |" for n, t, d, m in rows]
        out.append("")
    return "\n".join(out)


def _walk(
    node: dict[str, Any],
    path: str,
    defs: dict[str, Any],
    sections: list[tuple[str, str, list[tuple[str, str, str, str]]]],
    doc: str,
) -> None:
    rows: list[tuple[str, str, str, str]] = []
    sections.append((path, doc, rows))
    for name, prop in node.get("properties", {}).items():
        full = f"{path}.{name}" if path else name
        target = _resolve(prop, defs)
        if target is not None and "properties" in target:
            _walk(target, full, defs, sections, target.get("description", ""))
            continue
        rows.append((full, _type(prop, defs), _default(prop), _cell(prop.get("description", ""))))
        optional = _optional(prop, defs)  # a section that may be left out: its fields too
        if optional is not None and "properties" in optional:
            _walk(optional, full, defs, sections, optional.get("description", ""))


def _resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    ref = prop.get("$ref")
    if ref is None and len(prop.get("allOf", [])) == 1:
        ref = prop["allOf"][0].get("$ref")
    if ref is None:
        return None
    found: dict[str, Any] = defs[ref.rsplit("/", 1)[-1]]
    return found


def _optional(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    """The model of a ``Model | None`` field, else None."""
    options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
    if len(options) != 1 or len(prop.get("anyOf", [])) != 2:
        return None
    return _resolve(options[0], defs)


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " or ".join(_type(p, defs) for p in prop[key])
    target = _resolve(prop, defs)
    if target is not None:
        return _type(target, defs)
    kind = prop.get("type", "any")
    if kind == "array" and "items" in prop:
        return f"list of {_type(prop['items'], defs)}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"map to {_type(prop['additionalProperties'], defs)}"
    bounds = [
        f"{sym} {prop[k]}"
        for k, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="))
        if k in prop
    ]
    return str(kind) + (f" ({', '.join(bounds)})" if bounds else "")


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return "required"
    return _cell(f"`{json.dumps(prop['default'])}`")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
