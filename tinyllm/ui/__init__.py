"""The local workbench page, ``tinyllm ui``: prompts, their editor with live rendering and token
counts, Run and Compare streamed from the chosen clients, evaluations, and the call log.

A Starlette app (uvicorn, sse-starlette) whose pages are rendered on the server by Jinja, with
htmx shipped in the package (``static/``): it works with no network. It needs the ``ui`` extra
(``pip install 'tinyllm[ui]'``); ``import tinyllm`` never imports it.

Public: :func:`create_app` (the ASGI app) and :func:`serve` (run it with uvicorn).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["LOOPBACK", "create_app", "serve"]

LOOPBACK = "127.0.0.1"


def _need_extra() -> None:
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tinyllm ui needs the ui extra ({exc.name} is missing): pip install 'tinyllm[ui]'") from exc


def create_app(**kwargs: Any) -> Any:
    """The workbench as an ASGI app; see :func:`tinyllm.ui._app.create_app` for the arguments.

    Raises:
        ConfigError: the ``ui`` extra is not installed, or a non-loopback host without a token.
    """
    _need_extra()
    from ._app import create_app as make

    return make(**kwargs)


def serve(
    *,
    host: str = LOOPBACK,
    port: int = 8765,
    prompts_dirs: list[str] | tuple[str, ...] = (),
    token: str | None = None,
    log_db: str | None = None,
    eval_db: str | None = None,
    on_ready: Any = None,
) -> None:
    """Serve the workbench with uvicorn until interrupted (Ctrl-C).

    Args:
        host: the address to listen on (default 127.0.0.1); any other needs ``token``.
        port: the TCP port (0: a free one; the chosen one is passed to ``on_ready``).
        prompts_dirs, log_db, eval_db: see :func:`create_app`.
        token: the access token (``?token=`` in the first URL opened), or None on loopback.
        on_ready: called with the port (int) once the server listens.

    Raises:
        ConfigError: see :func:`create_app`; OSError: the port is taken.
    """
    _need_extra()
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    app = create_app(prompts_dirs=prompts_dirs, host=host, port=port, token=token, log_db=log_db, eval_db=eval_db)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets: Any = None) -> None:
            await original(sockets=sockets)
            on_ready(port)

        server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
