"""output_type coercion: turn a reply's content into str, bool, int, float, a label, JSON or a pydantic model.

``output_type`` may be a Python type (``str``, ``bool``, ``int``, ``float``,
``dict``, ``list``, a pydantic ``BaseModel`` subclass), one of the names
``"str" "bool" "int" "float" "json" "dict" "list"`` (as front matter gives
them), a list of allowed string labels (matched case-insensitively), a
``Literal[...]`` or an ``Enum`` class (a closed set of labels: an Enum's values
when they are all strings, else its names; the member is returned), a
container type pydantic validates (``list[str]``, ``dict[str, int]``,
``list[Model]``, ``tuple[int, int]``, ``set[str]``: through a ``TypeAdapter``), a standard
dataclass, a pydantic dataclass or a ``TypedDict`` class (a JSON object, validated by a
``TypeAdapter``: an instance of the dataclass, a plain dict for a TypedDict),
or a JSON schema (a dict, or front matter's ``output_schema:``; checked with
the ``jsonschema`` package). pydantic and jsonschema are imported only when
such a type is used, never at ``import tinyllm``.

What is requested from the server (:func:`response_format_for`):

- ``dict`` / ``"json"``: ``{"type": "json_object"}`` (JSON mode);
- a pydantic model, a dataclass or a TypedDict: ``{"type": "json_schema", ...}`` built by the
  openai SDK's structured-output helpers (strict schema, ``name`` = the class name);
- ``list``: nothing from an OpenAI-style server, because JSON mode forces a top-level
  *object*; the reply's first JSON array is used, and an object holding exactly one
  list (``{"items": [...]}``) is unwrapped. With a backend that enforces a JSON
  schema by grammar (llama.cpp, ``json_grammar=True``) an array schema is requested;
- a container type or a JSON schema: ``json_schema`` with its schema when the
  backend enforces it by grammar, or when it is an object and the backend takes
  ``json_schema`` (not strict); ``json_object`` for an object otherwise;
- ``str``, ``bool``, ``int``, ``float`` and labels: nothing; the text is parsed.
  A backend that takes a GBNF grammar (llama.cpp) gets one from
  :func:`grammar_for` instead: exactly one of the labels, an integer, a decimal
  number, or yes/no/true/false.

Parsing (:func:`parse_output`) is tolerant: JSON may sit in a code fence or
between sentences; numbers may be embedded in a sentence ("The answer is 42.");
a bool is a yes/no/true/false/positive/negative word (as TinyTroupe reads
it); a label may carry punctuation, quotes or other case. A reply that does
not fit raises :class:`OutputParseError` whose ``.raw`` holds the reply.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import re
import typing
from typing import Any, Literal

from .errors import OutputParseError

__all__ = ["normalize_output_type", "response_format_for", "grammar_for", "parse_output", "extract_json", "JsonSchema"]

_NAMES: dict[str, type] = {
    "str": str,
    "bool": bool,
    "int": int,
    "float": float,
    "json": dict,
    "dict": dict,
    "list": list,
}
_TRUE = {"true", "yes", "y", "1", "positive"}
_FALSE = {"false", "no", "n", "0", "negative"}
_YES_WORDS, _NO_WORDS = {"true", "yes", "positive"}, {"false", "no", "negative"}
_CONTAINERS = (list, dict, tuple, set, frozenset)  # generic aliases of these go through a pydantic TypeAdapter
# GBNF (llama.cpp's grammar format) for the scalar types; bounded lengths keep a small model from looping on digits
_GBNF = {
    bool: 'root ::= [Yy] "es" | [Nn] "o" | [Tt] "rue" | [Ff] "alse"',
    int: 'root ::= "-"? [0-9]{1,18}',
    float: 'root ::= "-"? [0-9]{1,15} ("." [0-9]{1,15})?',
}
# 1,234,567.5 (thousands separators) | 3.14 / 3,14 (decimal comma) / 42. | .5 ; optional exponent;
# a sign only when not glued to a word ("gpt-4" is 4)
_NUMBER = re.compile(
    r"(?:(?<!\w)[-+])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+(?:\.\d*|,\d+(?![\d,]))?|\.\d+)(?:[eE][-+]?\d+)?"
)
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\n?(.*?)```", re.S)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and hasattr(t, "model_validate") and hasattr(t, "model_json_schema")


def _is_enum(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


def _is_container(t: Any) -> bool:
    return typing.get_origin(t) in _CONTAINERS


def _is_record(t: Any) -> bool:
    """A standard dataclass, a pydantic dataclass or a ``TypedDict`` class: a JSON object validated
    by a pydantic ``TypeAdapter``."""
    import dataclasses

    if not isinstance(t, type):
        return False
    if dataclasses.is_dataclass(t):
        return True
    return typing.is_typeddict(t) or _is_typing_extensions_typeddict(t)


def _is_typing_extensions_typeddict(t: Any) -> bool:
    import sys

    te = sys.modules.get("typing_extensions")  # a TypedDict from typing_extensions exists only if it is imported
    return te is not None and te.is_typeddict(t)


class JsonSchema:
    """An output_type given as a JSON schema: a dict in code, or front matter's ``output_schema:``.

    The reply must be JSON that is valid against ``schema`` (checked with the
    ``jsonschema`` package, imported here and only here).

    Attributes:
        schema (dict): the JSON schema.
        name (str): its ``title``, or ``"output"``, reduced to the characters an
            OpenAI ``json_schema`` name allows (``[A-Za-z0-9_-]``, at most 64).

    Raises:
        OutputParseError: ``schema`` is not a valid JSON schema.
    """

    def __init__(self, schema: dict) -> None:
        from jsonschema import SchemaError, validators

        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            raise OutputParseError(
                f"the output schema is not a valid JSON schema: {exc.message}", output_type=schema
            ) from exc
        self.schema = schema
        self.name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(schema.get("title") or "output"))[:64]
        self._validator = cls(schema)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonSchema) and other.schema == self.schema

    __hash__ = None  # type: ignore[assignment]  # a dict inside: not hashable

    def __repr__(self) -> str:
        return f"JsonSchema({self.schema!r})"

    def validate(self, value: Any) -> Any:
        """``value`` itself when it is valid against the schema.

        Raises:
            OutputParseError: it is not; the message names the first problem and where (a JSON path).
        """
        from jsonschema.exceptions import best_match

        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            raise OutputParseError(
                f"reply does not fit the output schema: {error.message} (at {error.json_path})", output_type=self.schema
            )
        return value


@functools.lru_cache(maxsize=256)
def _adapter(t: Any) -> Any:
    """A pydantic ``TypeAdapter`` for a container type, with its JSON schema checked once; built once per type."""
    from pydantic import PydanticUserError, TypeAdapter  # only for such types: not at import tinyllm

    try:
        adapter = TypeAdapter(t)
        adapter.json_schema()
    except (PydanticUserError, TypeError, ValueError) as exc:
        raise OutputParseError(
            f"unsupported output_type {t!r}: pydantic cannot validate it or describe it as JSON ({exc})", output_type=t
        ) from exc
    return adapter


def _choices(kind: Any) -> tuple[tuple[str, ...], tuple[Any, ...]] | None:
    """(labels as the model writes them, the value each label stands for) of a closed set of answers, else None.

    A label tuple stands for itself; an Enum's labels are its values when all are
    strings, else its names, and stand for its members; a ``Literal``'s labels are
    its values as text, standing for the values.
    """
    if isinstance(kind, tuple):
        return kind, kind
    if _is_enum(kind):
        members = tuple(kind)
        by_value = all(isinstance(m.value, str) for m in members)
        return tuple(m.value if by_value else m.name for m in members), members
    if typing.get_origin(kind) is Literal:
        values = typing.get_args(kind)
        return tuple(str(v) for v in values), values
    return None


def _schema_of(kind: Any) -> tuple[str, dict] | None:
    """(name, JSON schema) of a JsonSchema or a container type, else None."""
    if isinstance(kind, JsonSchema):
        return kind.name, kind.schema
    if _is_container(kind):
        return re.sub(r"[^A-Za-z0-9_-]+", "_", repr(kind)).strip("_")[:64], _adapter(kind).json_schema()
    return None


def normalize_output_type(output_type: Any) -> Any:
    """Map names to types and validate.

    Args:
        output_type: a type, a type name, a list of labels, a ``Literal``, an
            Enum class, a container type, a dataclass, a TypedDict, or a JSON schema dict
            (see the module docstring).

    Returns:
        None (plain str), ``bool``/``int``/``float``/``dict``/``list``, a
        pydantic model class, a dataclass or TypedDict class, a tuple of labels (str; also for a ``Literal`` of
        strings), an Enum class, a ``Literal`` of other values, a container type
        (e.g. ``list[str]``), or a :class:`JsonSchema`.

    Raises:
        OutputParseError: an output_type tinyllm does not know, an empty Enum or
            Literal, a container type, dataclass or TypedDict pydantic cannot validate, or an
            invalid JSON schema.
    """
    if output_type is None or output_type is str:
        return None
    if isinstance(output_type, JsonSchema):
        return output_type
    if isinstance(output_type, dict):
        return JsonSchema(output_type)
    if isinstance(output_type, str):
        if output_type.lower() not in _NAMES:
            raise OutputParseError(
                f"unknown output_type {output_type!r}; use one of {sorted(_NAMES)} or a list of labels",
                output_type=output_type,
            )
        found = _NAMES[output_type.lower()]
        return None if found is str else found
    if isinstance(output_type, (list, tuple)):
        if any(isinstance(x, bool) for x in output_type):
            raise OutputParseError(
                f"labels {list(output_type)!r} contain a bool: YAML reads yes/no/on/off/true/false as booleans; "
                "quote them in the front matter, e.g. output_type: ['yes', 'no']",
                output_type=output_type,
            )
        labels = tuple(str(x) if isinstance(x, (int, float)) else x for x in output_type)
        if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            raise OutputParseError(
                "a label output_type must be a non-empty list of non-empty strings", output_type=output_type
            )
        return labels
    if output_type in (bool, int, float, dict, list) or _is_model(output_type):
        return output_type
    if _is_record(output_type):
        _adapter(output_type)  # fails now when pydantic cannot validate it
        return output_type
    if _is_enum(output_type):
        if not len(output_type):
            raise OutputParseError(
                f"the Enum {output_type.__name__} has no members to choose from", output_type=output_type
            )
        return output_type
    if typing.get_origin(output_type) is Literal:
        values = typing.get_args(output_type)
        if all(isinstance(v, str) for v in values):
            return normalize_output_type(list(values))
        return output_type
    if _is_container(output_type):
        _adapter(output_type)  # fails now when pydantic cannot validate it
        return output_type
    raise OutputParseError(f"unsupported output_type {output_type!r}", output_type=output_type)


def response_format_for(output_type: Any, *, json_schema: bool = True, json_grammar: bool = False) -> dict | None:
    """The OpenAI ``response_format`` to request for a normalized output_type, or None.

    Args:
        output_type: a value returned by :func:`normalize_output_type`.
        json_schema: the backend takes ``json_schema`` response formats; when not,
            a pydantic model asks for ``json_object`` (the reply is validated after).
        json_grammar: the backend enforces any JSON schema with a grammar
            (llama.cpp); then ``list`` asks for an array schema too.

    Returns:
        ``{"type": "json_object"}`` for ``dict``; ``{"type": "json_schema",
        "json_schema": {"name": <class name>, "schema": ..., "strict": True}}``
        for a pydantic model; for ``list`` with ``json_grammar`` a
        ``json_schema`` whose schema is ``{"type": "array"}``; for a container
        type or a :class:`JsonSchema` a ``json_schema`` (not strict) with its
        schema when ``json_grammar``, or when it describes an object and
        ``json_schema``; ``json_object`` for an object otherwise; else None.
    """
    if output_type is dict or ((_is_model(output_type) or _is_record(output_type)) and not json_schema):
        return {"type": "json_object"}
    if output_type is list and json_grammar:
        return {"type": "json_schema", "json_schema": {"name": "list", "schema": {"type": "array"}}}
    if _is_model(output_type) or _is_record(output_type):
        return copy.deepcopy(_model_response_format(output_type))  # a copy: callers may change theirs
    named = _schema_of(output_type)
    if named is not None:
        name, schema = named
        is_object = schema.get("type") == "object"
        if json_grammar or (json_schema and is_object):
            return {"type": "json_schema", "json_schema": {"name": name, "schema": copy.deepcopy(schema)}}
        if is_object:
            return {"type": "json_object"}
    return None


def grammar_for(output_type: Any) -> str | None:
    """A GBNF grammar (llama.cpp's format) that lets a model write only a fitting reply, or None.

    Args:
        output_type: a value returned by :func:`normalize_output_type`.

    Returns:
        For labels (a tuple, a ``Literal`` or an Enum): exactly one of the labels,
        as spelled; for ``int``: an optional minus and 1 to 18 digits; for
        ``float``: that with an optional fraction; for ``bool``: yes, no, true or
        false (first letter in either case). None for other types (JSON-shaped
        types are constrained by their ``response_format`` schema instead).
    """
    for simple in (bool, int, float):
        if output_type is simple:
            return _GBNF[simple]
    choices = _choices(output_type)
    if choices is None:
        return None
    # a GBNF string literal escapes like a JSON string; non-ASCII text stays as UTF-8
    return "root ::= " + " | ".join(json.dumps(label, ensure_ascii=False) for label in dict.fromkeys(choices[0]))


@functools.lru_cache(maxsize=256)
def _model_response_format(model: Any) -> dict:
    """The json_schema response_format of a pydantic model class, a dataclass or a TypedDict, built
    once per class (~0.5 ms): the openai SDK's strict schema (``openai.lib._pydantic.to_strict_json_schema``,
    what ``client.chat.completions.parse`` sends), named after the class."""
    if _is_record(model):
        try:
            from openai.lib._pydantic import to_strict_json_schema
        except ImportError:  # the SDK moved its private helper: a plain (non-strict) schema still works
            return {
                "type": "json_schema",
                "json_schema": {"name": model.__name__, "schema": _adapter(model).json_schema()},
            }
        return {
            "type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": to_strict_json_schema(_adapter(model)), "strict": True},
        }
    try:
        from openai.lib._parsing._completions import type_to_response_format_param
    except ImportError:  # the SDK moved its private helper: a plain (non-strict) schema still works
        return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema()}}
    return dict(type_to_response_format_param(model))  # type: ignore[arg-type]


def _fits(value: Any, expect: type | None) -> bool:
    if expect is None or isinstance(value, expect):
        return True
    # a list inside a one-key object: JSON mode forces an object, e.g. {"items": [...]}
    return (
        expect is list and isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list)
    )


#: where a JSON object or array can begin: "{" before a key or "}", "[" before a value or "]"
_JSON_START = re.compile(r'\{\s*["}]|\[\s*(?:[\[\]{"\-\d]|true|false|null)')
_WINDOW = 4096  # characters decoded first; a longer value is decoded again in place


def _decode_at(decoder: json.JSONDecoder, text: str, i: int) -> tuple[Any, int, int]:
    """``(value, end, cost)`` of the JSON value starting at ``text[i]``.

    The value is decoded from a window of the text first, so that a failure costs
    O(window), not O(i) (a JSONDecodeError counts the lines before its position).

    Raises:
        json.JSONDecodeError: no valid value starts there; its ``work`` attribute
            is the work done, in about one decoded character per unit.
        RecursionError: nested deeper than the interpreter's recursion limit.
    """
    window = text[i : i + _WINDOW]
    try:
        value, end = decoder.raw_decode(window)
        return value, i + end, 500 + end
    except json.JSONDecodeError as exc:
        # a failure inside the window stands whatever follows, unless the window's end caused it
        if len(window) < _WINDOW or (exc.pos < len(window) and not exc.msg.startswith("Unterminated string")):
            exc.work = 500 + 2 * exc.pos  # type: ignore[attr-defined]
            raise
    try:
        value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError as exc:
        exc.work = 500 + 2 * _WINDOW + exc.pos - i + exc.pos // 8  # type: ignore[attr-defined]
        raise
    return value, end, 500 + 2 * _WINDOW + end - i


def extract_json(text: str, expect: type | None = None) -> Any:
    """The first JSON value in ``text``: inside a ``` fence if there is one, tolerating text around it.

    Args:
        text: the reply.
        expect: ``dict`` or ``list`` to prefer the first JSON object (or array,
            or a one-key object holding an array) over values of other kinds;
            the first value of any kind is returned when none fits.

    Returns:
        The decoded value (dict or list).

    Raises:
        OutputParseError: no JSON object or array could be decoded, it is nested
            too deeply (about 1,000 levels), or the search gave up; ``.raw`` is ``text``.

    Cost: bounded, linear in ``len(text)``. A decode is tried only where an object
    or array can begin, a failure costs at most a few thousand characters' work
    (see :func:`_decode_at`), and the work of all attempts together is capped at
    about 16 characters' worth per character of ``text``: megabytes of unbalanced
    brackets fail within a fraction of a second. A reply so broken that the cap is
    reached before a value is found raises OutputParseError ("the search gave up").
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    budget = 16 * len(text) + 1_000_000  # work units: about one decoded character each; an attempt costs 500 more
    first: list[Any] = []
    too_deep = False
    for candidate in candidates:
        pos = 0
        while budget > 0 and (start := _JSON_START.search(candidate, pos)) is not None:
            i = start.start()
            pos = i + 1  # next, a value nested in this one, or after it
            try:
                value, _, work = _decode_at(decoder, candidate, i)
            except json.JSONDecodeError as exc:
                budget -= exc.work  # type: ignore[attr-defined]
                continue
            except RecursionError:
                too_deep = True
                break
            budget -= work
            if _fits(value, expect):
                return value
            if not first:
                first.append(value)
    if first:
        return first[0]
    why = (
        " (nested too deeply)" if too_deep else " (the search gave up: too large or too broken)" if budget <= 0 else ""
    )
    raise OutputParseError(f"no JSON found in the reply{why}: {text[:200]!r}", raw=text)


def _label(text: str, labels: tuple[str, ...]) -> str:
    clean = text.strip().strip(".!\"'`*").strip().lower()
    for label in labels:
        if clean == label.lower():
            return label
    found = [label for label in labels if re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text.lower())]
    # "very positive" also contains "positive": keep only labels that are not part of another one found
    found = [a for a in found if not any(a != b and a.lower() in b.lower() for b in found)]
    if len(found) == 1:
        return found[0]
    raise OutputParseError(
        f"reply {text[:200]!r} is not exactly one of {list(labels)}", raw=text, output_type=list(labels)
    )


def label_span(content: str, output_type: Any) -> tuple[int, int] | None:
    """``(start, end)`` character offsets of the label the reply ``content`` was read as, for a
    normalized label output type (a tuple of labels, a ``Literal``, an Enum); None for another
    output type or a reply that is not one label. Used for :attr:`tinyllm.Response.label_probability`."""
    choices = _choices(output_type)
    if choices is None:
        return None
    try:
        label = _label(content.strip(), choices[0])
    except OutputParseError:
        return None
    found = re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", content.lower())
    return (found.start(), found.end()) if found else None


def _bool(text: str) -> bool:
    words = re.findall(r"[a-z0-9]+", text.lower())
    if words and words[0] in _TRUE | _FALSE:
        return words[0] in _TRUE
    yes, no = _YES_WORDS.intersection(words), _NO_WORDS.intersection(words)  # "The answer is yes."
    if bool(yes) != bool(no):
        return bool(yes)
    raise OutputParseError(f"reply {text[:200]!r} is not yes/no or true/false", raw=text, output_type=bool)


def _number(text: str, output_type: type) -> int | float:
    match = _NUMBER.search(text)
    if not match:
        raise OutputParseError(f"no number in the reply {text[:200]!r}", raw=text, output_type=output_type)
    found = match.group(0)
    found = found.replace(",", "") if _THOUSANDS.match(found) else found.replace(",", ".")
    number = float(found)
    if output_type is int:
        if not number.is_integer():
            raise OutputParseError(f"reply {text[:200]!r} is not a whole number", raw=text, output_type=int)
        return int(number)
    return number


def _unwrapped(value: Any) -> Any:
    """The list inside a one-key object (``{"items": [...]}``: json_object mode forces an object), else ``value``."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        return next(iter(value.values()))
    return value


def _json_value(text: str, schema: dict) -> Any:
    """The reply as JSON: all of it when it parses (any JSON value), else the first object or array in it."""
    try:
        return json.loads(text)
    except ValueError:
        kind = schema.get("type")
        return extract_json(text, expect=dict if kind == "object" else list if kind == "array" else None)


def parse_output(content: str, output_type: Any) -> Any:
    """Coerce a reply's ``content`` to a normalized ``output_type``.

    Args:
        content: the reply's text.
        output_type: a value returned by :func:`normalize_output_type`.

    Returns:
        str (output_type None), bool, int, float, one of the labels (as
        spelled in the labels), an Enum member, a ``Literal``'s value, dict,
        list, a pydantic model instance, the value a container type's
        ``TypeAdapter`` validates, or the JSON value a :class:`JsonSchema` accepts.

    Raises:
        OutputParseError: the reply does not fit; ``.raw`` holds it.
    """
    if output_type is None:
        return content
    text = content.strip()
    try:
        choices = _choices(output_type)
        if choices is not None:
            labels, values = choices
            return values[labels.index(_label(text, labels))]
        if output_type is bool:
            return _bool(text)
        if output_type in (int, float):
            return _number(text, output_type)
        if isinstance(output_type, JsonSchema):
            return output_type.validate(_json_value(text, output_type.schema))
        if _is_record(output_type):
            return _adapter(output_type).validate_python(extract_json(text, expect=dict))
        if _is_container(output_type):
            is_dict = typing.get_origin(output_type) is dict
            value = extract_json(text, expect=dict if is_dict else list)
            return _adapter(output_type).validate_python(value if is_dict else _unwrapped(value))
        value = extract_json(text, expect=list if output_type is list else dict)
        if output_type is dict and not isinstance(value, dict):
            raise OutputParseError(f"expected a JSON object, got {type(value).__name__}", raw=content, output_type=dict)
        if output_type is list:
            value = _unwrapped(value)
            if not isinstance(value, list):
                raise OutputParseError(
                    f"expected a JSON array, got {type(value).__name__}", raw=content, output_type=list
                )
        if _is_model(output_type):
            return output_type.model_validate(value)
        return value
    except OutputParseError as exc:
        exc.raw = content
        if exc.output_type is None:
            exc.output_type = output_type
        raise
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise OutputParseError(
            f"reply does not fit {getattr(output_type, '__name__', output_type)}: {exc}",
            raw=content,
            output_type=output_type,
        ) from exc
