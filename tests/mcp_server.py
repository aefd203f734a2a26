"""A real MCP server for the tests, written with the mcp SDK (FastMCP; ``MCPServer`` in mcp 2).

``python mcp_server.py``: over stdio. ``python mcp_server.py --http PORT``: streamable HTTP on
127.0.0.1:PORT at /mcp. Every process writes its pid to the file named by ``MCP_PID_FILE``
(one line per start), so tests can count starts and see that the process ended.
"""

from __future__ import annotations

import os
import sys

try:
    from mcp.server.mcpserver import MCPServer as FastMCP  # mcp 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP  # type: ignore[no-redef]
from pydantic import BaseModel

server = FastMCP("tinyllm-test")


class Forecast(BaseModel):
    city: str
    celsius: int


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def forecast(city: str) -> Forecast:
    """The weather in a city (structured content)."""
    return Forecast(city=city, celsius=18)


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@server.tool()
def fail(why: str) -> str:
    """Always fails."""
    raise ValueError(why)


@server.tool()
def die() -> str:
    """End the server's process at once, without an answer."""
    os._exit(3)


if __name__ == "__main__":
    pid_file = os.environ.get("MCP_PID_FILE")
    if pid_file:
        with open(pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")
    if len(sys.argv) > 2 and sys.argv[1] == "--http":
        try:
            server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))  # mcp 2
        except TypeError:  # mcp 1.x: host and port are settings
            server.settings.host, server.settings.port = "127.0.0.1", int(sys.argv[2])
            server.run("streamable-http")
    else:
        server.run("stdio")
