"""The ``tinyllm`` command: list, render and call prompt templates; map a prompt over a file.

Subcommands: ``prompts`` (and ``prompts show``), ``new``, ``render``, ``call``, ``chat``, ``map``, ``batches status|fetch|cancel``,
``tokens``, ``cache stats|clear``, ``config``, ``logs`` (and ``logs show|stats``), ``plugins``, ``eval``, ``ui``, one module
per command group; the root group and the shared options are in ``_common``.
``call`` and ``map`` write every call to the call log unless ``--no-log`` or
``LOG_CALLS=false``. ``python -m tinyllm`` is the same.

Exit codes: 0 success; 1 an API or output error (for ``map``: any row that
ended in error); 2 bad usage (unknown template, missing variable, bad file,
bad ``--var``, bad configuration); 130 interrupted. A failure prints one line,
``error: ...``, on stderr; ``--debug`` adds the traceback.

The commands parse arguments and print; the work is done by the public API.
"""

from __future__ import annotations

from . import batches, cache, call, config, logs, plugins, prompts, ui  # noqa: F401  (each registers its commands on `cli`)
from . import map as _map  # noqa: F401
from . import eval as _eval  # noqa: F401
from ._common import cli

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tinyllm`` console script and ``python -m tinyllm``."""
    cli.main(args=argv, prog_name="tinyllm")
