"""output_type coercion: turn a reply's content into str, bool, int, float, a label, JSON or a pydantic model.

``output_type`` may be a Python type (``str``, ``bool``, ``int``, ``float``,
``dict``, ``list``, a pydantic ``BaseModel`` subclass), one of the names
``"str" "bool" "int" "float" "json" "dict" "list"`` (as front matter gives
them), or a list of allowed string labels.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import OutputParseError

__all__ = ["normalize_output_type", "response_format_for", "parse_output", "extract_json"]

_NAMES: dict[str, type] = {"str": str, "bool": bool, "int": int, "float": float, "json": dict, "dict": dict, "list": list}
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and hasattr(t, "model_validate") and hasattr(t, "model_json_schema")


def normalize_output_type(output_type: Any) -> Any:
    """Map names to types and validate. Returns a type, a tuple of labels, or None (plain str).

    Raises:
        OutputParseError: an output_type tinyllm does not know.
    """
    if output_type is None or output_type is str:
        return None
    if isinstance(output_type, str):
        if output_type.lower() not in _NAMES:
            raise OutputParseError(f"unknown output_type {output_type!r}; use one of {sorted(_NAMES)} or a list of labels", output_type=output_type)
        found = _NAMES[output_type.lower()]
        return None if found is str else found
    if isinstance(output_type, (list, tuple)):
        if not output_type or not all(isinstance(x, str) and x.strip() for x in output_type):
            raise OutputParseError("a label output_type must be a non-empty list of non-empty strings", output_type=output_type)
        return tuple(output_type)
    if output_type in (bool, int, float, dict, list) or _is_model(output_type):
        return output_type
    raise OutputParseError(f"unsupported output_type {output_type!r}", output_type=output_type)


def response_format_for(output_type: Any) -> dict | None:
    """The OpenAI ``response_format`` to request for a normalized output_type, or None.

    ``dict`` -> ``{"type": "json_object"}``; a pydantic model -> ``json_schema``
    built by the openai SDK's structured-output helper (strict schema).
    """
    if output_type is dict:
        return {"type": "json_object"}
    if _is_model(output_type):
        from openai.lib._parsing._completions import type_to_response_format_param

        return dict(type_to_response_format_param(output_type))  # type: ignore[arg-type]
    return None


def extract_json(text: str) -> Any:
    """The first JSON value in ``text``: inside a ``` fence if there is one, tolerating text around it.

    Raises:
        OutputParseError: no JSON value could be decoded.
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for i, ch in enumerate(candidate):
            if ch in "{[":
                try:
                    return decoder.raw_decode(candidate, i)[0]
                except json.JSONDecodeError:
                    continue
    raise OutputParseError(f"no JSON found in the reply: {text[:200]!r}", raw=text)


def _label(text: str, labels: tuple[str, ...]) -> str:
    clean = text.strip().strip(".!\"'`*").strip().lower()
    for label in labels:
        if clean == label.lower():
            return label
    found = [label for label in labels if re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text.lower())]
    if len(found) == 1:
        return found[0]
    raise OutputParseError(f"reply {text[:200]!r} is not exactly one of {list(labels)}", raw=text, output_type=list(labels))


def parse_output(content: str, output_type: Any) -> Any:
    """Coerce a reply's ``content`` to a normalized ``output_type``.

    Returns:
        str (output_type None), bool, int, float, one of the labels, dict, list,
        or a pydantic model instance.

    Raises:
        OutputParseError: the reply does not fit; ``.raw`` holds it.
    """
    if output_type is None:
        return content
    text = content.strip()
    try:
        if isinstance(output_type, tuple):
            return _label(text, output_type)
        if output_type is bool:
            words = re.findall(r"[a-z0-9]+", text.lower())
            if words and words[0] in _TRUE | _FALSE:
                return words[0] in _TRUE
            raise OutputParseError(f"reply {text[:200]!r} is not yes/no or true/false", raw=content, output_type=bool)
        if output_type in (int, float):
            match = _NUMBER.search(text)
            if not match:
                raise OutputParseError(f"no number in the reply {text[:200]!r}", raw=content, output_type=output_type)
            number = float(match.group(0).replace(",", "."))
            if output_type is int:
                if not number.is_integer():
                    raise OutputParseError(f"reply {text[:200]!r} is not a whole number", raw=content, output_type=int)
                return int(number)
            return number
        value = extract_json(text)
        if output_type is dict and not isinstance(value, dict):
            raise OutputParseError(f"expected a JSON object, got {type(value).__name__}", raw=content, output_type=dict)
        if output_type is list:
            if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
                value = next(iter(value.values()))  # {"items": [...]}: json_object mode forces an object
            if not isinstance(value, list):
                raise OutputParseError(f"expected a JSON array, got {type(value).__name__}", raw=content, output_type=list)
        if _is_model(output_type):
            return output_type.model_validate(value)
        return value
    except OutputParseError as exc:
        exc.raw = content
        raise
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise OutputParseError(f"reply does not fit {getattr(output_type, '__name__', output_type)}: {exc}", raw=content, output_type=output_type) from exc
