"""Reading rows of variables for a batch: JSONL (one object per line) and CSV (a header row), streamed.

Used by ``tinyllm map`` and by evaluation datasets. A bad file raises :class:`~tinyllm.errors.InputFileError`
naming the file and the line, before anything is sent.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, suppress
from typing import Any, Iterator

from ..errors import InputFileError

__all__ = ["read_rows", "readable_twice"]


@contextmanager
def readable_twice(path: str) -> Iterator[str]:
    """A path to the input that can be read more than once: standard input (``-``) is first copied to a temporary file."""
    if path != "-":
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="tinyllm-map-", suffix=".input")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        yield tmp
    finally:
        with suppress(OSError):
            os.unlink(tmp)


def _lines(f: Any, shown: str) -> Iterator[str]:
    """The lines of a binary file as text (each with its ending), decoded one by one so a bad byte names its line."""
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputFileError(
                f"{shown}: line {lineno} is not UTF-8 text (byte {exc.start} of the line)", path=shown, line=lineno
            ) from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def _jsonl_rows(lines: Iterator[str], shown: str, id_field: str) -> Iterator[tuple[Any, dict]]:
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = _STRICT_JSON.decode(line)
        except ValueError as exc:
            raise InputFileError(f"{shown}: line {lineno} is not valid JSON: {exc}", path=shown, line=lineno) from exc
        if not isinstance(rec, dict):
            raise InputFileError(
                f"{shown}: line {lineno} is not a JSON object (one object of variables per line)",
                path=shown,
                line=lineno,
            )
        rid = rec.get(id_field)
        yield (rid if rid not in (None, "") else n), rec
        n += 1


def _csv_rows(lines: Iterator[str], shown: str, id_field: str) -> Iterator[tuple[Any, dict]]:
    reader = csv.reader(lines, strict=True)  # strict: a stray quote is an error, not a field that runs on
    header: list[str] | None = None
    n = 0
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"line {start}" + (f" (read on to line {reader.line_num})" if reader.line_num > start else "")
            hint = (
                "; a quote that is never closed takes the lines after it into one field"
                if reader.line_num > start
                else ""
            )
            raise InputFileError(f"{shown}: {where}: bad CSV: {exc}{hint}", path=shown, line=start) from exc
        if not fields:  # a blank line
            continue
        if header is None:
            twice = sorted({name for name in fields if fields.count(name) > 1})
            if twice:
                raise InputFileError(
                    f"{shown}: line {start}: the header names {', '.join(map(repr, twice))} more than once",
                    path=shown,
                    line=start,
                )
            header = fields
            continue
        if len(fields) != len(header):
            raise InputFileError(
                f"{shown}: line {start}: {len(fields)} field(s), but the header has {len(header)}",
                path=shown,
                line=start,
            )
        rec = dict(zip(header, fields))
        rid = rec.get(id_field)
        yield (rid if rid not in (None, "") else n), rec
        n += 1


def read_rows(path: str, shown: str, fmt: str, id_field: str) -> Iterator[tuple[Any, dict]]:
    """(id, variables) per input row, in input order, streamed. A row without an id gets its 0-based row number.

    Raises InputFileError (a ConfigError: exit 2 on the command line) for a bad file, naming the line.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read the input {shown!r}: {exc.strerror or exc}", path=shown) from exc
    with f:
        yield from (_csv_rows if fmt == "csv" else _jsonl_rows)(_lines(f, shown), shown, id_field)
