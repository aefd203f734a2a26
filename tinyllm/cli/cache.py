"""``tinyllm cache stats|clear``: the reply cache (pickle file or Redis)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import click

from ._common import CLIError, _dumps, cli


@cli.group()
def cache() -> None:
    """Inspect or clear the API reply cache (CACHE_FILE_NAME, or Redis with REDIS_URL)."""


def _cache_file_option(f: Callable) -> Callable:
    return click.option(
        "--file", "file", type=click.Path(dir_okay=False), help="The cache file (default: the CACHE_FILE_NAME setting)."
    )(f)


def _cache_path(file: str | None) -> Path:
    from ..config import get_config

    return Path(os.path.abspath(os.path.expanduser(file or get_config().cache_file_name)))


def _redis_cache(file: str | None) -> Any:
    """The Redis cache the settings select (CACHE_BACKEND, REDIS_URL) unless --file names a file, else None.

    Raises CLIError when Redis fails."""
    from ..cache._store import cache_backend
    from ..config import get_config

    cfg = get_config()
    if file is not None or cache_backend(cfg) != "redis":
        return None
    from ..cache._redis import shared_redis_cache

    try:
        cache = shared_redis_cache(cfg)
        cache.len()  # fails now, not half-way through the output
    except OSError as exc:
        raise CLIError(str(exc)) from exc
    return cache


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@cache.command("stats")
@_cache_file_option
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def cache_stats(file: str | None, as_json: bool) -> None:
    """Show the cache's entries, size, and the hits and misses of every process that used it."""
    from ..cache._store import MAGIC, MAGIC_V1, PickleCache

    shared = _redis_cache(file)
    if shared is not None:
        info = shared.stats()
        if as_json:
            click.echo(_dumps(info))
            return
        click.echo(f"redis:   {info['path']}")
        click.echo(f"entries: {info['entries']}")
        click.echo(f"size:    {_size(info['size_bytes'])} (JSON values)")
        click.echo(f"hits:    {info['hits']}   misses: {info['misses']}   (all processes and machines)")
        return
    path = _cache_path(file)
    if path.exists():
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) not in (MAGIC, MAGIC_V1):  # opening it as a cache would convert or initialise it
                raise CLIError(
                    f"{str(path)!r} is not a tinyllm cache file (a TinyTroupe cache is converted "
                    "the first time a call uses it)"
                )
        c = PickleCache(path)
        try:
            info = c.stats()
        finally:
            c.close()
    else:
        info = {"entries": 0, "size_bytes": 0, "hits": 0, "misses": 0, "path": str(path)}
    if as_json:
        click.echo(_dumps({**info, "exists": path.exists()}))
        return
    click.echo(f"file:    {info['path']}{'' if path.exists() else ' (does not exist yet)'}")
    click.echo(f"entries: {info['entries']}")
    click.echo(f"size:    {_size(info['size_bytes'])}")
    click.echo(f"hits:    {info['hits']}   misses: {info['misses']}   (all processes, counted when each exits)")


@cache.command("clear")
@_cache_file_option
def cache_clear(file: str | None) -> None:
    """Remove every entry from the cache (the file, or with REDIS_URL this cache's Redis keys)."""
    from ..cache._store import PickleCache

    shared = _redis_cache(file)
    if shared is not None:
        n = shared.len()
        shared.clear()
        click.echo(f"cleared {n} entries from {shared.path}")
        return
    path = _cache_path(file)
    if not path.exists():
        click.echo(f"no cache file at {path}; nothing to clear")
        return
    c = PickleCache(path)
    try:
        n = len(c)
        c.clear()
    finally:
        c.close()
    click.echo(f"cleared {n} entries from {path}")
