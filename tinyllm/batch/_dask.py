"""Batches on a Dask cluster (the ``dask`` extra): the executor behind ``tinyllm map --dask``.

Dask is imported only here, and only when a cluster is asked for. Any
``concurrent.futures.Executor`` works with :meth:`tinyllm.LLMCall.map` and
:class:`tinyllm.Runner`; this module only opens one from an address:

- ``local:N``: a ``distributed.LocalCluster`` of N worker processes bound to
  127.0.0.1 (its dashboard on a free loopback port), closed at the end;
- anything else: the address of a running scheduler (``tcp://host:8786``), as
  ``distributed.Client`` takes it; the cluster is left running.
"""

from __future__ import annotations

import concurrent.futures
import re
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import ConfigError

__all__ = ["dask_executor"]

_LOCAL = re.compile(r"local:(\d+)")


@contextmanager
def dask_executor(address: str, *, connect_timeout: float = 30.0) -> Iterator[tuple[concurrent.futures.Executor, int]]:
    """``(executor, worker threads)`` for a Dask cluster, while inside the ``with`` block.

    Args:
        address: ``local:N`` (N >= 1 worker processes on 127.0.0.1) or a scheduler address.
        connect_timeout: seconds to wait for the scheduler.

    Yields:
        the client's ``get_executor()``, and the number of threads of all workers (at least 1),
        to size how many tasks to keep pending.

    Raises:
        ConfigError: dask[distributed] is not installed, ``local:N`` has N < 1, or the
            scheduler cannot be reached within ``connect_timeout``.
    """
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError("--dask needs Dask: pip install 'tinyllm[dask]' (dask[distributed])") from exc
    local = _LOCAL.fullmatch(address.strip())
    cluster = None
    try:
        if local is not None:
            n = int(local.group(1))
            if n < 1:
                raise ConfigError(f"--dask local:N needs N >= 1 worker processes, got {address!r}")
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
            )
            target: Any = cluster
        elif address.strip().startswith("local:"):
            raise ConfigError(f"--dask local:N takes a number of worker processes, got {address!r}")
        else:
            target = address.strip()
        try:
            client = distributed.Client(target, timeout=connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {address!r} within {connect_timeout:g} s: {exc}"
            ) from exc
        try:
            threads = max(1, sum(client.nthreads().values()))
            yield client.get_executor(), threads
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
