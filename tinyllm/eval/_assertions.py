"""Assertions: what a case checks in a reply. Names follow promptfoo's where one exists.

Each is a mapping ``{type, value, threshold, weight}``; a type prefixed ``not-`` is negated
(passes when the plain one fails; score ``1 - score``). String values (also inside lists and
mappings) holding ``{{`` or ``{%`` are Jinja templates over the case's variables, rendered in
tinyllm's sandbox when graded.

=================  ==========================================================================
type               passes when
=================  ==========================================================================
equals             the typed value equals ``value`` (strings compared without surrounding
                   whitespace; a non-string value is also compared as its JSON text)
contains           the reply's text contains ``value``; ``icontains``: ignoring case
contains-any/all   it contains any / all of the strings of ``value`` (``icontains-any/all``)
starts-with        the text starts with ``value`` (after leading whitespace)
regex              ``re.search(value, text)`` finds a match
is-json            the text is JSON (and fits the JSON schema ``value``, if given)
json-schema        the typed value (or the text as JSON) fits the JSON schema ``value``
output-type        the reply parsed as the prompt's output_type
python             ``value`` names ``module:function``, called as ``f(output, value, vars, response)``;
                   it returns a bool, a score in [0, 1] (passes at ``threshold``, default 0.5),
                   a ``(bool, reason)`` pair or a mapping ``{pass, score, reason}``
cost               the call cost at most ``threshold`` USD (unknown price: fails)
latency            the call took at most ``threshold`` seconds
finish-reason      the reply's finish_reason equals ``value`` (``stop``, ``length``, ``tool_calls``)
tool-called        the model asked for the tool ``value`` (a name, or ``{name, arguments}``: the
                   arguments must include those given)
similar            the cosine similarity of the embeddings (the cell's client, EMBEDDING_MODEL) of
                   the text and ``value`` is at least ``threshold`` (default 0.8)
llm-rubric         the judge model grades the text against the rubric ``value``: its verdict's
                   ``pass`` (and ``score >= threshold`` when a threshold is given)
=================  ==========================================================================
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ._model import AssertionResult

__all__ = ["TYPES", "Assertion", "Reply", "parse_assertion"]

TYPES = (
    "equals",
    "contains",
    "icontains",
    "contains-any",
    "contains-all",
    "icontains-any",
    "icontains-all",
    "starts-with",
    "regex",
    "is-json",
    "json-schema",
    "output-type",
    "python",
    "cost",
    "latency",
    "finish-reason",
    "tool-called",
    "similar",
    "llm-rubric",
)
_NEEDS_VALUE = {
    "equals",
    "contains",
    "icontains",
    "contains-any",
    "contains-all",
    "icontains-any",
    "icontains-all",
    "starts-with",
    "regex",
    "json-schema",
    "python",
    "finish-reason",
    "tool-called",
    "similar",
    "llm-rubric",
}
_NEEDS_THRESHOLD = {"cost", "latency"}
_KEYS = ("type", "value", "threshold", "weight")
DEFAULT_SIMILAR = 0.8  # cosine similarity `similar` needs when no threshold is given (promptfoo's default)
DEFAULT_PYTHON = 0.5  # the score a `python` function's number needs to pass when no threshold is given


@dataclass
class Reply:
    """What the assertions of one cell look at.

    ``output``: the reply's text (None: no reply); ``value``: the typed value; ``parsed``: the
    reply fit the output_type (``parse_error`` says why not); ``vars``: the case's variables;
    ``response``: the :class:`~tinyllm.Response`; ``sender``: the client (for embeddings);
    ``judge``: ``judge(rubric, output, vars) -> {"pass", "score", "reason"}`` or None.
    """

    output: str | None
    value: Any
    parsed: bool
    parse_error: str | None
    vars: dict
    response: Any
    sender: Any
    judge: Callable[[str, str, dict], dict] | None = None


def _templated(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, list):
        return any(_templated(v) for v in value)
    if isinstance(value, dict):
        return any(_templated(v) for v in value.values())
    return False


def _render(value: Any, variables: dict) -> Any:
    from ..prompts._templates import render_string

    if isinstance(value, str):
        return render_string(value, variables, name="<assertion value>") if _templated(value) else value
    if isinstance(value, list):
        return [_render(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _render(v, variables) for k, v in value.items()}
    return value


def _import_function(spec: str, where: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: a python assertion's value is 'module:function', not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r} for the python assertion: {exc}") from exc
    except AttributeError:
        raise ConfigError(f"{where}: {module_name!r} has no {attr!r} for the python assertion") from None
    if not callable(target):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return target


@dataclass(frozen=True)
class Assertion:
    """One parsed assertion (see the module docstring for the types).

    Attributes: ``type`` as written, ``kind`` without ``not-``, ``negate``, ``value`` (may be a
    template), ``threshold`` (float or None), ``weight`` (float >= 0), ``where`` (for messages).
    """

    type: str
    kind: str
    negate: bool
    value: Any = None
    threshold: float | None = None
    weight: float = 1.0
    where: str = ""

    def as_spec(self) -> dict[str, Any]:
        """The mapping it was written as (for fingerprints and the report)."""
        out = {"type": self.type, "value": self.value, "threshold": self.threshold, "weight": self.weight}
        return {k: v for k, v in out.items() if v is not None}

    def check(self, reply: Reply) -> AssertionResult:
        """Grade ``reply``.

        Raises:
            TemplateError: a templated value does not render for the case's variables.
            OutputParseError: the judge's reply cannot be read (an error cell, never a pass).
            Exception: whatever a ``python`` function or the embeddings request raises (an error cell).
        """
        value = _render(self.value, reply.vars)
        passed, score, reason = _CHECKS[self.kind](self, value, reply)
        if self.negate:
            passed, score, reason = not passed, 1.0 - score, f"not ({reason})"
        return AssertionResult(self.type, bool(passed), float(score), reason, self.weight)


def parse_assertion(spec: Any, where: str) -> Assertion:
    """An :class:`Assertion` from its mapping.

    Raises:
        ConfigError: not a mapping, an unknown type (naming the closest one), a missing or
            malformed value or threshold, an unknown key, a ``python`` function that cannot be imported.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: an assertion is a mapping {{type: ..., value: ...}}, not {spec!r}")
    for key in spec:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            raise ConfigError(
                f"{where}: unknown assertion key {key!r}"
                + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(_KEYS)}")
            )
    name = spec.get("type")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: the assertion has no 'type' (one of {', '.join(TYPES)})")
    negate = name.startswith("not-")
    kind = name[4:] if negate else name
    if kind not in TYPES:
        known = [*TYPES, *(f"not-{t}" for t in TYPES)]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(TYPES)} (each also as not-TYPE)"
        raise ConfigError(f"{where}: unknown assertion type {name!r}{hint}")
    value: Any = spec.get("value")
    if kind in _NEEDS_VALUE and value is None:
        raise ConfigError(f"{where}: the {name} assertion needs a 'value'")
    threshold = spec.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise ConfigError(f"{where}: 'threshold' must be a number >= 0, not {threshold!r}")
    if kind in _NEEDS_THRESHOLD and threshold is None:
        raise ConfigError(
            f"{where}: the {name} assertion needs a 'threshold' ({'USD' if kind == 'cost' else 'seconds'})"
        )
    weight = spec.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where}: 'weight' must be a number >= 0, not {weight!r}")
    templated = _templated(value)
    if kind in ("contains-any", "contains-all", "icontains-any", "icontains-all"):
        if isinstance(value, str) and not templated:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not templated and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: the {name} assertion's value is a list of strings")
    elif kind in (
        "contains",
        "icontains",
        "starts-with",
        "regex",
        "finish-reason",
        "similar",
        "llm-rubric",
    ) and not isinstance(value, str):
        raise ConfigError(f"{where}: the {name} assertion's value must be a string, not {value!r}")
    if kind == "regex" and not templated:
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{where}: the regex {value!r} does not compile: {exc}") from exc
    if kind in ("json-schema", "is-json") and value is not None and not templated:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: the {name} assertion's value must be a JSON schema (a mapping)")
        from jsonschema import SchemaError, validators

        try:
            validators.validator_for(value).check_schema(value)
        except SchemaError as exc:
            raise ConfigError(f"{where}: the JSON schema of {name} is invalid: {exc.message}") from exc
    if kind == "tool-called" and not (
        isinstance(value, str)
        or (
            isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and isinstance(value.get("arguments", {}), dict)
        )
    ):
        raise ConfigError(
            f"{where}: the tool-called assertion's value is a tool name or {{name: ..., arguments: {{...}}}}"
        )
    if kind == "python":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: the python assertion's value is 'module:function'")
        _import_function(value, where)  # refused now, before anything is sent
    if kind == "similar" and threshold is not None and threshold > 1:
        raise ConfigError(f"{where}: a similar threshold is a cosine similarity in [0, 1], not {threshold!r}")
    return Assertion(name, kind, negate, value, None if threshold is None else float(threshold), float(weight), where)


# --------------------------------------------------------------------------- #
# The checks: (assertion, rendered value, reply) -> (passed, score, reason)
# --------------------------------------------------------------------------- #

Result = tuple[bool, float, str]


def _yes(ok: bool, reason: str) -> Result:
    return bool(ok), 1.0 if ok else 0.0, reason


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _text(reply: Reply) -> str:
    return reply.output or ""


def _equals(a: Assertion, expected: Any, reply: Reply) -> Result:
    if not reply.parsed:
        return _yes(
            False, f"the reply did not parse as the output type ({reply.parse_error}); expected {_short(expected)}"
        )
    actual = reply.value
    if hasattr(actual, "model_dump"):
        actual = actual.model_dump(mode="json")
    if isinstance(actual, str) and isinstance(expected, str):
        ok = actual.strip() == expected.strip()
    else:
        ok = actual is expected if isinstance(actual, bool) or isinstance(expected, bool) else actual == expected
        if not ok and isinstance(expected, str):  # a typed value against a string (a CSV column): its JSON text
            ok = json.dumps(actual, ensure_ascii=False) == expected.strip() or str(actual) == expected.strip()
    return _yes(ok, f"expected {_short(expected)}, got {_short(actual)}")


def _contains(a: Assertion, value: Any, reply: Reply) -> Result:
    text, needle = _text(reply), str(value)
    if a.kind == "icontains":
        return _yes(needle.lower() in text.lower(), f"{_short(text)} contains {_short(needle)} (any case)")
    return _yes(needle in text, f"{_short(text)} contains {_short(needle)}")


def _contains_many(a: Assertion, value: Any, reply: Reply) -> Result:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    text = _text(reply)
    fold = a.kind.startswith("i")
    found = [v for v in items if (v.lower() in text.lower() if fold else v in text)]
    if a.kind.endswith("-any"):
        return _yes(bool(found), f"{_short(text)} contains any of {items}" + (f" (found {found})" if found else ""))
    missing = [v for v in items if v not in found]
    return (
        bool(not missing),
        len(found) / len(items) if items else 1.0,
        f"{_short(text)} contains all of {items}" + (f" (missing {missing})" if missing else ""),
    )


def _starts_with(a: Assertion, value: Any, reply: Reply) -> Result:
    text = _text(reply).lstrip()
    return _yes(text.startswith(str(value)), f"{_short(text)} starts with {_short(value)}")


def _regex(a: Assertion, value: Any, reply: Reply) -> Result:
    try:
        found = re.search(str(value), _text(reply))
    except re.error as exc:
        raise ConfigError(f"{a.where}: the regex {value!r} does not compile: {exc}") from exc
    return _yes(found is not None, f"{_short(_text(reply))} matches /{value}/")


def _schema_errors(instance: Any, schema: dict) -> str | None:
    from jsonschema import validators

    cls = validators.validator_for(schema)
    error = next(iter(cls(schema).iter_errors(instance)), None)
    if error is None:
        return None
    path = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" at /{path}" if path else "")


def _as_json(reply: Reply) -> tuple[bool, Any, str]:
    try:
        return True, json.loads(_text(reply)), ""
    except ValueError as exc:
        return False, None, f"not JSON: {exc}"


def _is_json(a: Assertion, schema: Any, reply: Reply) -> Result:
    ok, data, why = _as_json(reply)
    if not ok:
        return _yes(False, f"{_short(_text(reply))} is {why}")
    if schema is not None:
        problem = _schema_errors(data, schema)
        if problem:
            return _yes(False, f"JSON, but it does not fit the schema: {problem}")
    return _yes(True, "the reply is JSON" + (" fitting the schema" if schema is not None else ""))


def _json_schema(a: Assertion, schema: Any, reply: Reply) -> Result:
    value = reply.value
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if not (reply.parsed and isinstance(value, (dict, list))):
        ok, value, why = _as_json(reply)
        if not ok:
            return _yes(False, f"{_short(_text(reply))} is {why}")
    problem = _schema_errors(value, schema)
    return _yes(problem is None, "fits the schema" if problem is None else f"does not fit the schema: {problem}")


def _output_type(a: Assertion, value: Any, reply: Reply) -> Result:
    return _yes(
        reply.parsed,
        "the reply parsed as the output type"
        if reply.parsed
        else f"the reply did not parse as the output type: {reply.parse_error}",
    )


def _python(a: Assertion, value: Any, reply: Reply) -> Result:
    fn = _import_function(str(value), a.where)
    got = fn(reply.output, reply.value, reply.vars, reply.response)
    threshold = a.threshold if a.threshold is not None else DEFAULT_PYTHON
    if isinstance(got, AssertionResult):
        return got.passed, got.score, got.reason
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], bool):
        return _yes(got[0], str(got[1]))
    if isinstance(got, dict):
        if "pass" not in got and "score" not in got:
            raise ConfigError(f"{a.where}: {value} returned a mapping without 'pass' or 'score': {got!r}")
        score = float(got.get("score", 1.0 if got.get("pass") else 0.0))
        passed = bool(got["pass"]) if "pass" in got else score >= threshold
        return passed, score, str(got.get("reason", f"{value} -> {got!r}"))
    if isinstance(got, bool):
        return _yes(got, f"{value} returned {got}")
    if isinstance(got, (int, float)) and math.isfinite(got) and 0 <= got <= 1:
        return got >= threshold, float(got), f"{value} scored {got:.3g} (needs {threshold:g})"
    raise ConfigError(
        f"{a.where}: {value} must return a bool, a score in [0, 1], (bool, reason) or "
        f"{{pass, score, reason}}; it returned {got!r}"
    )


def _cost(a: Assertion, value: Any, reply: Reply) -> Result:
    cost = getattr(reply.response, "cost", None)
    if cost is None:
        return _yes(False, f"the cost is unknown (no price for the model); needs <= ${a.threshold:g}")
    return _yes(cost <= (a.threshold or 0.0), f"cost ${cost:.6g}, needs <= ${a.threshold:g}")


def _latency(a: Assertion, value: Any, reply: Reply) -> Result:
    latency = getattr(reply.response, "latency", None)
    if latency is None:
        return _yes(False, "no latency (no complete reply)")
    return _yes(latency <= (a.threshold or 0.0), f"took {latency:.3f} s, needs <= {a.threshold:g} s")


def _finish_reason(a: Assertion, value: Any, reply: Reply) -> Result:
    got = getattr(reply.response, "finish_reason", None)
    return _yes(got == value, f"finish_reason {got!r}, expected {value!r}")


def _tool_calls(reply: Reply) -> list[tuple[str | None, Any]]:
    """(name, arguments) of every tool call the model asked for during the call (name None when the reply lacks it)."""
    out: list[tuple[str | None, Any]] = []
    response = reply.response
    for call in getattr(response, "tool_calls", None) or []:
        out.append((call.name, getattr(call, "arguments", None)))
    message = getattr(response, "message", None) or {}
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = fn.get("arguments")
        out.append((fn.get("name"), args))
    return out


def _tool_called(a: Assertion, value: Any, reply: Reply) -> Result:
    name = value if isinstance(value, str) else value["name"]
    wanted = {} if isinstance(value, str) else (value.get("arguments") or {})
    calls = _tool_calls(reply)
    for got_name, args in calls:
        if got_name == name and all(isinstance(args, dict) and args.get(k) == v for k, v in wanted.items()):
            return _yes(True, f"called {name}({json.dumps(args, ensure_ascii=False, default=str)})")
    seen = ", ".join(f"{n}({json.dumps(x, ensure_ascii=False, default=str)})" for n, x in calls) or "no tool"
    return _yes(
        False, f"expected a call of {name}" + (f" with {wanted}" if wanted else "") + f"; the model called {seen}"
    )


def _similar(a: Assertion, value: Any, reply: Reply) -> Result:
    threshold = a.threshold if a.threshold is not None else DEFAULT_SIMILAR
    text = _text(reply)
    if not text.strip():
        return _yes(False, "the reply is empty")
    first, second = reply.sender.get_embeddings([text, str(value)])
    dot = sum(x * y for x, y in zip(first, second))
    norm = math.sqrt(sum(x * x for x in first)) * math.sqrt(sum(y * y for y in second))
    cosine = dot / norm if norm else 0.0
    return cosine >= threshold, max(0.0, min(1.0, cosine)), f"cosine similarity {cosine:.3f}, needs {threshold:g}"


def _rubric(a: Assertion, rubric: Any, reply: Reply) -> Result:
    if reply.judge is None:
        raise ConfigError(f"{a.where}: llm-rubric needs a judge: set JUDGE_MODEL (and JUDGE_API_TYPE)")
    verdict = reply.judge(str(rubric), _text(reply), reply.vars)
    passed, score = verdict["pass"], verdict["score"]
    if a.threshold is not None:
        passed = passed and score >= a.threshold
    return bool(passed), score, f"judge: {verdict['reason']} (score {score:.2f})"


_CHECKS: dict[str, Callable[[Assertion, Any, Reply], Result]] = {
    "equals": _equals,
    "contains": _contains,
    "icontains": _contains,
    "contains-any": _contains_many,
    "contains-all": _contains_many,
    "icontains-any": _contains_many,
    "icontains-all": _contains_many,
    "starts-with": _starts_with,
    "regex": _regex,
    "is-json": _is_json,
    "json-schema": _json_schema,
    "output-type": _output_type,
    "python": _python,
    "cost": _cost,
    "latency": _latency,
    "finish-reason": _finish_reason,
    "tool-called": _tool_called,
    "similar": _similar,
    "llm-rubric": _rubric,
}
