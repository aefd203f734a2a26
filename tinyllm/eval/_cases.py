"""Test cases: ``NAME.tests.yaml`` beside a template, a ``tests:`` list in its front matter, or cases given in code.

A tests file is a YAML list of cases (or a mapping with a ``tests:`` list). A case is a mapping:

- ``vars``: the template variables (a mapping);
- ``expected``: shorthand for ``{type: equals, value: ...}`` on the typed value;
- ``assert``: a list of assertions (see :mod:`tinyllm.eval._assertions`);
- ``dataset``: a CSV (header row) or JSONL file, one case per row, the columns over ``vars``;
  relative to the tests file's folder (then the working directory); assertion values that hold
  ``{{ }}`` are templates over each row's variables;
- ``description``, ``id`` (default ``NAME#N``, N counted from 1; ``NAME#N:ROW`` for a dataset row,
  ROW its ``id`` column or its 0-based row number), ``threshold`` (the case passes when the
  weighted score of its assertions reaches it; default: every assertion must hold).

Bad files raise :class:`~tinyllm.errors.InputFileError` naming the file and line, before anything is sent.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputFileError
from ._assertions import Assertion, parse_assertion

__all__ = ["CASE_KEYS", "Case", "CaseSource", "case_sources", "tests_file_for"]

CASE_KEYS = ("description", "vars", "expected", "assert", "dataset", "id", "threshold")


@dataclass(frozen=True)
class Case:
    """One test case, ready to run.

    Attributes:
        id: unique within the prompt; pairs cells across versions, models and runs.
        vars: the template variables (``dict``).
        assertions: the checks of the reply (``list[Assertion]``); their string values may be
            templates over ``vars`` (rendered when graded).
        description: for the report, or None.
        threshold: the weighted score in [0, 1] the case needs, or None (every assertion must hold).
    """

    id: str
    vars: dict
    assertions: tuple[Assertion, ...]
    description: str | None = None
    threshold: float | None = None


@dataclass
class CaseSource:
    """One case as written (a file's entry, a front-matter entry or one given in code), expanded by :meth:`cases`."""

    base_id: str
    where: str  # "FILE, line N" for messages
    vars: dict = field(default_factory=dict)
    assertions: tuple[Assertion, ...] = ()
    description: str | None = None
    threshold: float | None = None
    dataset: str | None = None  # an absolute path
    dataset_shown: str | None = None
    explicit_id: bool = False

    def cases(self) -> Iterator[Case]:
        """The cases of this entry: itself, or one per row of its dataset (streamed).

        Raises:
            InputFileError: the dataset is malformed (file and line named).
        """
        if self.dataset is None:
            yield Case(self.base_id, dict(self.vars), self.assertions, self.description, self.threshold)
            return
        from ..batch._readers import read_rows

        fmt = "csv" if self.dataset.lower().endswith(".csv") else "jsonl"
        for row_id, row in read_rows(self.dataset, self.dataset_shown or self.dataset, fmt, "id"):
            yield Case(
                f"{self.base_id}:{row_id}", {**self.vars, **row}, self.assertions, self.description, self.threshold
            )


def tests_file_for(prompt: Any, prompts_dir: Any = None) -> Path | None:
    """The tests file of a loaded prompt: ``NAME.tests.yaml`` (or ``.yml``) beside its system
    template, else the first on the template search path; None when there is none."""
    from ..prompts._templates import search_path

    base = prompt.system_path.name
    head, sep, _ = base.rpartition(".system.")
    stem = head if sep and head else base
    dirs = [prompt.system_path.parent, *search_path(prompts_dir)]
    for d in dirs:
        for ext in ("yaml", "yml"):
            p = Path(d) / f"{stem}.tests.{ext}"
            if p.is_file():
                return p
    return None


def _loader() -> type:
    from ..prompts._templates import _yaml_loader

    return _yaml_loader()  # YAML 1.2 booleans, no aliases: the front matter's rules


def _load_file(path: Path) -> list[tuple[int, Any]]:
    """(line, entry) per case of a tests file."""
    import yaml

    shown = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise InputFileError(f"cannot read the tests file {shown!r}: {exc.strerror or exc}", path=shown) from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{shown}: not UTF-8 text (byte {exc.start})", path=shown) from exc
    loader_cls = _loader()
    try:
        node = yaml.compose(text, Loader=loader_cls)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or exc
        raise InputFileError(
            f"{shown}: {'line ' + str(line) + ': ' if line else ''}invalid YAML: {problem}", path=shown, line=line
        ) from exc
    if node is None:
        return []
    if isinstance(node, yaml.MappingNode):
        items = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if "tests" not in items:
            raise InputFileError(
                f"{shown}: line {node.start_mark.line + 1}: a tests file is a list of cases "
                "(or a mapping with a 'tests:' list)",
                path=shown,
                line=node.start_mark.line + 1,
            )
        node = items["tests"]
    if not isinstance(node, yaml.SequenceNode):
        raise InputFileError(
            f"{shown}: line {node.start_mark.line + 1}: expected a list of cases ('- vars: ...')",
            path=shown,
            line=node.start_mark.line + 1,
        )
    out = []
    for item in node.value:
        loader = loader_cls("")
        try:
            out.append((item.start_mark.line + 1, loader.construct_document(item)))
        except yaml.YAMLError as exc:
            line = item.start_mark.line + 1
            raise InputFileError(f"{shown}: line {line}: {exc}", path=shown, line=line) from exc
        finally:
            loader.dispose()
    return out


def _source(entry: Any, base_id: str, where: str, folder: Path | None, path: str, line: int | None) -> CaseSource:
    """Validate one case mapping into a CaseSource. Raises InputFileError naming ``where``."""

    def bad(message: str) -> InputFileError:
        return InputFileError(f"{where}: {message}", path=path, line=line)

    if not isinstance(entry, dict):
        raise bad(f"a case must be a mapping (vars:, assert:, ...), not {type(entry).__name__}")
    for key in entry:
        if key not in CASE_KEYS:
            close = difflib.get_close_matches(str(key), CASE_KEYS, n=1)
            raise bad(
                f"unknown case key {key!r}"
                + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(CASE_KEYS)}")
            )
    variables = entry.get("vars") or {}
    if not isinstance(variables, dict) or not all(isinstance(k, str) for k in variables):
        raise bad("'vars' must be a mapping of variable names to values")
    specs = entry.get("assert") or []
    if not isinstance(specs, list):
        raise bad("'assert' must be a list of assertions ({type: ..., value: ...})")
    assertions = []
    if "expected" in entry:
        assertions.append(parse_assertion({"type": "equals", "value": entry["expected"]}, f"{where} (expected)"))
    for i, spec in enumerate(specs):
        try:
            assertions.append(parse_assertion(spec, f"{where}, assert[{i}]"))
        except ConfigError as exc:
            raise InputFileError(str(exc), path=path, line=line) from exc
    description = entry.get("description")
    if description is not None and not isinstance(description, str):
        raise bad("'description' must be a string")
    threshold = entry.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1
    ):
        raise bad(f"'threshold' must be a number in [0, 1], not {threshold!r}")
    case_id = entry.get("id")
    if case_id is not None and not isinstance(case_id, (str, int)):
        raise bad("'id' must be a string or a number")
    dataset = entry.get("dataset")
    found = shown = None
    if dataset is not None:
        if not isinstance(dataset, str) or not dataset:
            raise bad("'dataset' must be the path of a .csv or .jsonl file")
        candidates = [Path(os.path.expanduser(dataset))]
        if folder is not None and not candidates[0].is_absolute():
            candidates.insert(0, folder / dataset)
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise bad(f"the dataset {dataset!r} is not a file (looked in {', '.join(str(c) for c in candidates)})")
        found, shown = str(hit.resolve()), str(hit)
    if not assertions:
        raise bad("the case checks nothing: give 'expected:' or an 'assert:' list")
    return CaseSource(
        str(case_id) if case_id is not None else base_id,
        where,
        dict(variables),
        tuple(assertions),
        description,
        None if threshold is None else float(threshold),
        found,
        shown,
        case_id is not None,
    )


def case_sources(
    short_name: str, prompt: Any, tests_file: Path | None, given: Iterable[Any] | None = None
) -> list[CaseSource]:
    """The case entries of a prompt: ``given`` (dicts as in a tests file, or :class:`Case`) when not None,
    else the front matter's ``tests:`` then the tests file's.

    Raises:
        InputFileError: a malformed tests file or entry (file and line), two cases with one id.
    """
    out: list[CaseSource] = []
    if given is not None:
        for i, entry in enumerate(given, 1):
            if isinstance(entry, Case):
                out.append(
                    CaseSource(
                        entry.id,
                        f"case {entry.id!r}",
                        dict(entry.vars),
                        tuple(entry.assertions),
                        entry.description,
                        entry.threshold,
                        explicit_id=True,
                    )
                )
            else:
                out.append(_source(entry, f"{short_name}#{i}", f"cases[{i - 1}]", None, "", None))
    else:
        n = 0
        front = prompt.front_matter.get("tests")
        if front is not None:
            origin = str(prompt.system_path)
            if not isinstance(front, list):
                raise InputFileError(f"{origin}: front matter 'tests' must be a list of cases", path=origin)
            for i, entry in enumerate(front):
                n += 1
                out.append(
                    _source(
                        entry,
                        f"{short_name}#{n}",
                        f"{origin}, front matter tests[{i}]",
                        prompt.system_path.parent,
                        origin,
                        None,
                    )
                )
        if tests_file is not None:
            shown = str(tests_file)
            for line, entry in _load_file(tests_file):
                n += 1
                out.append(_source(entry, f"{short_name}#{n}", f"{shown}, line {line}", tests_file.parent, shown, line))
    ids: dict[str, str] = {}
    for src in out:
        if src.base_id in ids:
            raise InputFileError(
                f"{src.where}: the case id {src.base_id!r} is already used at {ids[src.base_id]}", path=src.where
            )
        ids[src.base_id] = src.where
    return out
