"""Settings: built-in defaults < package config.ini < ./config.ini < .env < environment < configure().

Settings are read at call time, never bound at import: :func:`get_config`
returns a :class:`Config` snapshot, rebuilt (each file read once) only when a
file's modification time, the environment, the working directory or the
configure() overrides changed, so a call costs a few microseconds.

``config.ini`` uses the section ``[OpenAI]`` (TinyTroupe's layout). Each key
``KEY`` can be overridden by the environment variable ``TINYLLM_KEY`` (from the
process environment or ``./.env``) and by ``configure(key=value)``.

Secrets (API keys, endpoints) come only from the environment or ``.env``; they
are kept in :attr:`Config.secrets` and masked in every ``repr``.
"""

from __future__ import annotations

import configparser
import functools
import copy
import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._fork import fresh_locks_in_child
from .errors import ConfigError

__all__ = ["Config", "configure", "clear_overrides", "get_config", "SECRET_NAMES", "KEYS"]

ENV_PREFIX = "TINYLLM_"
SECTION = "OpenAI"


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_mapping(text: str) -> dict[str, str]:
    """``{"gpt-4o": "dep"}`` as JSON, or ``gpt-4o=dep, gpt-4o-mini=dep2``."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"expected model=deployment, got {part.strip()!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


_PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_write_per_mtok")


def _check_prices(value: Any) -> dict[str, dict[str, float]]:
    """``{model: {input_per_mtok, output_per_mtok[, cached_input_per_mtok, cache_write_per_mtok]}}`` with numbers >= 0 (USD)."""
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object {model: {input_per_mtok, output_per_mtok}}")
    out: dict[str, dict[str, float]] = {}
    for model, price in value.items():
        if not isinstance(price, dict) or not {"input_per_mtok", "output_per_mtok"} <= price.keys():
            raise ValueError(f"the price of {model!r} needs input_per_mtok and output_per_mtok")
        unknown = set(price) - set(_PRICE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown key(s) {sorted(unknown)} in the price of {model!r}; known: {', '.join(_PRICE_KEYS)}"
            )
        numbers = {}
        for key, number in price.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
                raise ValueError(f"{model!r} {key} must be a number >= 0, got {number!r}")
            numbers[key] = float(number)
        out[str(model)] = numbers
    return out


def _parse_prices(text: str) -> dict[str, dict[str, float]]:
    return _check_prices(json.loads(text))


def _parse_paths(text: str) -> list[str]:
    return [p for p in text.split(os.pathsep) if p.strip()]


def _nonneg(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= 0:  # also refuses nan
            raise ValueError(f"must be >= 0, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _str(text: str) -> str:
    return text.strip()


def _choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in names:
            raise ValueError(f"expected one of {', '.join(names)}")
        return value

    return parse


def _setting(default: Any, parse: Callable[[str], Any], doc: str = "") -> Any:
    """A :class:`Config` field: its built-in default, the parser of its text form, what it means."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"parse": parse, "doc": doc})
    return field(default=default, metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True)
class Config:
    """The effective settings: typed, immutable (a frozen dataclass).

    Read a setting as ``cfg.max_attempts`` or ``cfg["MAX_ATTEMPTS"]``; :meth:`source`
    tells where a value came from (``"default"``, a file path, ``".env"``,
    ``"environment"``, ``"configure()"`` or ``"client"``). Secrets are in
    :attr:`secrets` (``dict[str, str]``) and never shown by ``repr``.
    :meth:`replace` derives the settings of a client built with its own values.
    A setting that is None is not set: a model parameter left unset is not sent,
    and the server's default applies.
    """

    api_type: str | None = _setting(
        None,
        lambda s: s.strip().lower() or None,
        "client: openai, ollama, azure, llamacpp, anthropic or a registered one",
    )
    model: str = _setting("gpt-4o-mini", _str, "model asked for")
    anthropic_model: str = _setting(
        "claude-sonnet-5-5", _str, "model the anthropic client asks for while MODEL is left at its default"
    )
    max_tokens: int | None = _setting(None, _positive_int, "tokens the reply may have")
    temperature: float | None = _setting(
        None, _nonneg(float), "sampling temperature; unset: not sent (the server's default)"
    )
    top_p: float | None = _setting(None, _nonneg(float), "nucleus sampling; unset: not sent")
    frequency_penalty: float | None = _setting(None, float, "also read as FREQ_PENALTY (TinyTroupe's name)")
    presence_penalty: float | None = _setting(None, float, "unset: not sent")
    reasoning_effort: str | None = _setting(None, _str, "for reasoning models: low, medium, high")
    timeout: float = _setting(
        60.0,
        _positive_float,
        "seconds per HTTP attempt, the whole attempt (a stream: up to its headers, then each wait between chunks)",
    )
    max_attempts: int = _setting(
        5,
        _positive_int,
        "attempts per request, the first included; a retry is a new attempt. One attempt may send up to three HTTP requests while the structured-output fallback (json_schema -> json_object -> prompt) learns what an endpoint takes",
    )
    waiting_time: float = _setting(1.0, _nonneg(float), "seconds, first backoff wait")
    exponential_backoff_factor: float = _setting(
        2.0, _nonneg(float), "each backoff wait is the previous one times this (jittered); a Retry-After header wins"
    )
    max_waiting_time: float = _setting(60.0, _nonneg(float), "seconds, cap on any one wait")
    embedding_model: str = _setting("text-embedding-3-small", _str, "model of get_embedding(s) (ignored by llamacpp)")
    cache_api_calls: bool = _setting(
        False, _parse_bool, "keep replies in the cache (CACHE_BACKEND) and answer repeats from it"
    )
    cache_file_name: str = _setting(
        "tinyllm_cache.pickle", _str, "the pickle cache's file, relative to the working directory"
    )
    base_url: str | None = _setting(
        None,
        _str,
        "an OpenAI-compatible server (vLLM, llama.cpp server, LM Studio, Ollama), e.g. http://localhost:8000/v1",
    )
    azure_api_version: str = _setting(
        "2024-10-21", _str, "Azure OpenAI API version (AZURE_OPENAI_VERSION in the environment wins)"
    )
    azure_deployments: dict = _setting({}, _parse_mapping, "model name -> Azure deployment name")
    max_concurrent_requests: int = _setting(5, _positive_int, "requests one client sends at once (its queue's slots)")
    queue_size: int = _setting(100, _nonneg(int), "requests that may wait for a slot")
    queue_timeout: float = _setting(300.0, _nonneg(float), "seconds a request may wait for a slot; 0 = no limit")
    requests_per_minute: int = _setting(0, _nonneg(int), "0 = no limit")
    tokens_per_minute: int = _setting(0, _nonneg(int), "0 = no limit")
    local_model_path: str | None = _setting(
        None, _str, "a GGUF file for llamacpp; unset: the bundled SmolLM2 (tinyllm config prints the path)"
    )
    local_threads: int = _setting(
        0, _nonneg(int), "CPU threads llama.cpp uses for the embedded model, read when the model loads; 0 = every CPU"
    )
    prompts_dirs: list = _setting(
        [],
        _parse_paths,
        "template directories searched after prompts_dir= and before ./prompts, separated by os.pathsep",
    )
    max_tool_rounds: int = _setting(
        10,
        _nonneg(int),
        "tool rounds a call may take (a reply asking for tools, the tools run); then ToolRoundsExceededError",
    )
    tool_timeout: float = _setting(
        60.0,
        _nonneg(float),
        "seconds one tool call may run; then the model gets an error result (the call is abandoned); 0 = no limit",
    )
    tool_concurrency: int = _setting(
        8, _positive_int, "tool calls of one reply that run at once (threads or tasks); the rest wait their turn"
    )
    file_check_interval: float = _setting(
        1.0, _nonneg(float), "seconds between checks of config.ini, .env and template files; 0 = every use"
    )
    # -- shared state through Redis (tinyllm/cache/_redis.py, tinyllm/limits/_redis.py) --
    redis_url: str | None = _setting(
        None, _str, "redis://[:password@]host:6379/0: share the cache and the limits across processes and machines"
    )
    cache_backend: str = _setting(
        "auto", _choice("auto", "pickle", "redis", "memory"), "auto: redis when REDIS_URL is set, else pickle"
    )
    limits_backend: str = _setting(
        "auto", _choice("auto", "local", "redis"), "auto: redis when REDIS_URL is set, else local (this client object)"
    )
    redis_prefix: str = _setting("tinyllm", _str, "prefix of every Redis key tinyllm writes")
    redis_cache_ttl: float = _setting(0.0, _nonneg(float), "seconds a Redis cache entry lives; 0 = no expiry")
    redis_slot_lease: float = _setting(
        600.0,
        _positive_float,
        "seconds a cluster-wide request slot is held at most when its holder dies; above TIMEOUT",
    )
    log_calls: bool = _setting(
        False,
        _parse_bool,
        "write one row per call to the call log (LOG_DB); the tinyllm command turns it on unless --no-log",
    )
    log_db: str | None = _setting(
        None, _str, "the call log's SQLite file; default: calls.db in the user's data directory"
    )
    max_cost: float | None = _setting(
        None, _nonneg(float), "USD this process may spend; a call that could exceed it is refused before sending"
    )
    judge_api_type: str | None = _setting(
        None,
        lambda s: s.strip().lower() or None,
        "the client of tinyllm eval's llm-rubric judge (a registered name); default: the usual client",
    )
    judge_model: str | None = _setting(
        None, _str, "the model of tinyllm eval's llm-rubric judge; an llm-rubric needs this or JUDGE_API_TYPE"
    )
    batch_poll_interval: float = _setting(
        30.0, _positive_float, "seconds between looks at the status of Batch API batches (tinyllm map --batch-api)"
    )
    prices: dict = _setting(
        {},
        _parse_prices,
        'USD per million tokens over the genai-prices table: {"model": {"input_per_mtok": 1, "output_per_mtok": 2}}',
    )
    secrets: dict = field(default_factory=dict, repr=False, compare=False)
    sources: dict = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, _setting_name(key))

    def source(self, key: str) -> str:
        """Where the value of ``key`` (a config key, any case; aliases too) came from."""
        return self.sources.get(_setting_name(key).upper(), "default")

    def replace(self, overrides: dict[str, Any], source: str = "client") -> "Config":
        """These settings with ``overrides`` (lower- or upper-case keys, typed or text values) on top.

        Raises:
            ConfigError: an unknown key, or a value that does not parse (named with ``source``).
        """
        if not overrides:
            return self
        values = {}
        for key, value in overrides.items():
            name = _setting_name(key)
            values[name] = _parse(name.upper(), value, source)
        sources = {**self.sources, **{name.upper(): source for name in values}}
        return dataclasses.replace(self, **values, sources=sources)

    def as_dict(self, *, mask_secrets: bool = True) -> dict[str, Any]:
        """All settings and secrets as one dict; API keys masked unless asked otherwise."""
        out = {name.upper(): getattr(self, name) for name in _FIELDS}
        for name, value in self.secrets.items():
            out[name] = mask(value) if (mask_secrets and name in API_KEY_NAMES) else value
        if mask_secrets:
            for name in _URL_NAMES:
                if isinstance(out.get(name), str):
                    out[name] = redact_url(out[name])
        return out

    def secret(self, *names: str) -> str | None:
        """The first of ``names`` that is set in the environment or .env, else None."""
        for name in names:
            value = self.secrets.get(name)
            if value:
                return value
        return None

    def __repr__(self) -> str:
        return f"Config({self.as_dict(mask_secrets=True)!r})"


_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if "parse" in f.metadata)
#: config key -> (parser of its text form, built-in default); the one table is :class:`Config`'s fields.
KEYS: dict[str, tuple[Callable[[str], Any], Any]] = {
    f.name.upper(): (f.metadata["parse"], f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc, operator]
    for f in dataclasses.fields(Config)
    if "parse" in f.metadata
}
#: older key names still read, -> the key they mean
ALIASES = {"FREQ_PENALTY": "FREQUENCY_PENALTY"}


def _setting_name(key: str) -> str:
    """The :class:`Config` field of a config key in any case (aliases resolved); ConfigError if unknown."""
    upper = key.upper()
    upper = ALIASES.get(upper, upper)
    if upper not in KEYS:
        raise ConfigError(f"unknown setting {key!r}; known: {', '.join(k.lower() for k in KEYS)}")
    return upper.lower()


# Secrets and endpoints read only from the environment or .env.
SECRET_NAMES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "AZURE_OPENAI_KEY",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_VERSION",
    "AZURE_OPENAI_DEPLOYMENT",
    "AZURE_OPENAI_EMBEDDINGS_DEPLOYMENT",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
)
API_KEY_NAMES = (
    "OPENAI_API_KEY",
    "AZURE_OPENAI_KEY",
    "AZURE_OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
)  # masked wherever shown


_URL_NAMES = ("BASE_URL", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "ANTHROPIC_BASE_URL", "REDIS_URL")


@functools.lru_cache(maxsize=256)  # on the per-call path (error messages, endpoint keys): the same few URLs
def redact_url(url: str) -> str:
    """``url`` with a user:password part and query values replaced by ``***`` (keys can hide there)."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"***@{host}" if (parts.username or parts.password) else parts.netloc
        if (parts.username or parts.password) and parts.port:
            netloc += f":{parts.port}"
        query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "****"


def mask(value: str | None) -> str:
    """``sk-...abcd`` style mask: never more than the last 4 characters."""
    if not value:
        return ""
    return "****" + value[-4:] if len(value) > 12 else "****"


_lock = threading.Lock()
fresh_locks_in_child(globals(), "_lock")  # a lock held at fork() is released in the child
_overrides: dict[str, Any] = {}
_overrides_version = 0  # bumped by every configure() and clear_overrides(): get_config() compares it, not the dict
_PACKAGE_INI = str(Path(__file__).with_name("config.ini"))


def _read_ini(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str.upper  # type: ignore[assignment,method-assign]
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not parser.has_section(SECTION):
        return {}
    return dict(parser.items(SECTION))


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    from dotenv import dotenv_values

    try:
        return {k: v for k, v in dotenv_values(path, encoding="utf-8").items() if v is not None}
    except (OSError, UnicodeDecodeError) as exc:
        hint = "; save it as UTF-8" if isinstance(exc, UnicodeDecodeError) else ""
        raise ConfigError(f"cannot read {path}: {exc}{hint}") from exc


def _layers(cwd: Path, dotenv: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """Raw (unparsed) settings per layer, lowest precedence first."""
    layers = []
    for path in (Path(_PACKAGE_INI), cwd / "config.ini"):
        raw = _read_ini(path)
        if raw:
            layers.append((str(path), raw))
    for name, env in ((".env", dotenv), ("environment", os.environ)):
        raw = {k[len(ENV_PREFIX) :]: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        if raw:
            layers.append((name, raw))
    return layers


def _bad(key: str, raw: Any, source: str, why: str) -> ConfigError:
    return ConfigError(f"bad value for {key} from {source}: {raw!r} ({why})")


def _parse(key: str, raw: Any, source: str) -> Any:
    """The typed value of ``key`` from ``raw``: a string (parsed), a bool/int/float (parsed as its
    str()), a path for a string-valued key or PROMPTS_DIRS (also a list of paths), a str->str dict
    for AZURE_DEPLOYMENTS. Raises ConfigError naming the key and ``source`` for anything else."""
    parser, default = KEYS[key]
    if key == "PROMPTS_DIRS" and isinstance(raw, (list, tuple, os.PathLike)):
        items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        if not all(isinstance(p, (str, os.PathLike)) and isinstance(os.fspath(p), str) for p in items):
            raise _bad(key, raw, source, "expected a path or a list of paths")
        return [os.fspath(p) for p in items]
    if key == "PRICES" and isinstance(raw, dict):
        try:
            return _check_prices(raw)
        except ValueError as exc:
            raise _bad(key, raw, source, str(exc)) from exc
    if key == "AZURE_DEPLOYMENTS" and isinstance(raw, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise _bad(key, raw, source, "expected a dict of model name -> deployment name strings")
        return dict(raw)
    if isinstance(raw, os.PathLike) and parser is _str and isinstance(os.fspath(raw), str):
        raw = os.fspath(raw)
    elif isinstance(raw, (bool, int, float)):
        raw = str(raw)
    if not isinstance(raw, str):
        expected = {
            "PROMPTS_DIRS": "a string, a path or a list of paths",
            "AZURE_DEPLOYMENTS": "a string or a dict of str -> str",
            "PRICES": "a JSON string or a dict",
        }.get(key, "a string or a path" if parser is _str else "a string or a number")
        raise _bad(key, raw, source, f"expected {expected}, not {type(raw).__name__}")
    if raw.strip() == "":
        return default
    try:
        return parser(raw)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise _bad(key, raw, source, str(exc)) from exc


# (inputs, Config) of the last build; inputs = (cwd, file mtimes, environment, overrides version)
_snapshot: tuple[tuple, Config] | None = None
_files_checked_at = float("-inf")  # time.monotonic() when the snapshot's files last matched the disk


def _mtime(path: str) -> int | None:
    if not os.access(path, os.F_OK):  # the usual case, no such file: cheaper than a failing stat
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _file_mtimes(cwd: str) -> tuple:
    return (_mtime(_PACKAGE_INI), _mtime(os.path.join(cwd, "config.ini")), _mtime(os.path.join(cwd, ".env")))


def get_config() -> Config:
    """Return the effective settings now, as a :class:`Config` snapshot.

    The snapshot is rebuilt only when something it is built from changed: the
    working directory, the environment, the configure() overrides (compared on
    every call, in about 1 µs in all), or the mtime of a config file (./config.ini,
    ./.env, the package's config.ini), which is looked at when the last look is
    more than ``FILE_CHECK_INTERVAL`` seconds old (default 1; 0: every call).
    Otherwise the previous snapshot (immutable) is returned.

    Raises:
        ConfigError: a value in a file, the environment or .env does not parse
            (the message names the key and where it came from).
    """
    global _snapshot, _files_checked_at
    cwd = os.getcwd()
    env = getattr(os.environ, "_data", os.environ)  # CPython's raw dict: compared in C
    snap = _snapshot
    if snap is not None:
        (s_cwd, s_files, s_env, s_version), cfg = snap
        if s_version == _overrides_version and s_cwd == cwd and s_env == env:
            now = time.monotonic()
            if now - _files_checked_at < cfg.file_check_interval:
                return cfg
            if s_files == _file_mtimes(cwd):
                _files_checked_at = now
                return cfg
    with _lock:
        overrides, version = dict(_overrides), _overrides_version
    inputs = (
        cwd,
        _file_mtimes(cwd),
        dict(env),
        version,
    )  # taken before building: a change meanwhile rebuilds next time
    cfg = _build_config(Path(cwd), overrides)
    _snapshot = (inputs, cfg)
    _files_checked_at = time.monotonic()
    return cfg


def _build_config(cwd: Path, overrides: dict[str, Any]) -> Config:
    values: dict[str, Any] = {}
    dotenv = _read_dotenv(cwd / ".env")
    for source, raw in _layers(cwd, dotenv):
        for key, text in raw.items():
            key = ALIASES.get(key.upper(), key.upper())
            if key in KEYS:
                values[key] = (_parse(key, text, source), source)
    for key, value in overrides.items():
        values[key] = (_parse(key, value, "configure()"), "configure()")
    secrets = {}
    for name in SECRET_NAMES:
        value = os.environ.get(name) or dotenv.get(name)
        if value:
            secrets[name] = value
    return Config(
        **{k.lower(): v for k, (v, _) in values.items()},
        secrets=secrets,
        sources={k: source for k, (_, source) in values.items()},
    )


def configure(**overrides: Any) -> None:
    """Override settings for this process, above every other source.

    Keys are the config keys in lower case (``configure(max_attempts=3)``);
    values may be typed (``3``) or strings (``"3"``); a path setting may be a
    ``Path`` (``prompts_dirs`` also a list of them), ``azure_deployments`` and
    ``prices`` a ``dict``; the values are copied, so changing a list or dict given here later
    changes nothing. ``None`` removes an override, so the lower layers apply again.

    Raises:
        ConfigError: an unknown key, or a value that does not parse or is of another type.
    """
    names = {key: _setting_name(key).upper() for key in overrides}  # ConfigError for an unknown key
    for key, value in overrides.items():
        if value is not None:
            _parse(names[key], value, "configure()")
    global _overrides_version
    with _lock:
        for key, value in overrides.items():
            if value is None:
                _overrides.pop(names[key], None)
            else:
                _overrides[names[key]] = copy.deepcopy(value)  # a list changed by the caller later changes nothing
        _overrides_version += 1


def clear_overrides() -> None:
    """Remove every :func:`configure` override, so the lower layers apply again (as ``configure(key=None)`` for each key)."""
    global _overrides_version
    with _lock:
        _overrides.clear()
        _overrides_version += 1
