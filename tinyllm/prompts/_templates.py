"""Prompt templates: search path, YAML front matter, sandboxed Jinja, messages.

``NAME.system.EXT`` pairs with ``NAME.user.EXT`` beside it (optional, or named
explicitly); names are looked up in ``prompts_dir=``, ``PROMPTS_DIRS``, ``./prompts``;
a short name ``NAME`` means ``NAME.system.md`` (or ``NAME.system.<ext>``).
Front matter (YAML between ``---`` lines; the user file's keys override the system
file's) holds ``description``, ``output_type``, ``output_schema``, ``output_retries``, ``messages``,
``tools`` (names of tools registered with ``@tinyllm.tool``), ``mcp_servers`` (MCP servers whose tools the call may use) and model parameters (every other key). Jinja runs in ``ImmutableSandboxedEnvironment``
with ``StrictUndefined``; prompts are cached per file (path, mtime_ns, size) and
reloaded when a file changes, which is looked for at most every
``FILE_CHECK_INTERVAL`` seconds per prompt (default 1; 0: on every load); thread-safe.

Multi-message prompts (design decision): ``messages:`` in the front matter is a list
of single-key mappings (``- user: "..."``, ``- assistant: "..."``; roles system, user,
assistant, developer), e.g. few-shot examples, each value a Jinja template rendered
with the same variables. :meth:`Prompt.render` returns [system body] + those messages
in order + [user body] (if any), each stripped of surrounding whitespace, none dropped.
The structure comes from YAML, never from parsing rendered text, so a variable's
value can never open a new message or change a role.

Front matter is read by :func:`_yaml_loader` (yaml.SafeLoader, YAML 1.2 booleans: only
``true``/``false``, so ``yes``/``no``/``on``/``off`` stay strings; aliases refused, so a
few hundred bytes cannot expand into gigabytes). A key that is not a setting is a model
parameter; one that is no known parameter but close to one (``temprature``) is refused
as a typo; server-specific parameters can always go under ``extra_body:``.
"""

from __future__ import annotations

import difflib
import functools
import glob
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Union

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .._fork import fresh_locks_in_child
from ..config import get_config
from ..errors import TemplateError, TemplateNotFoundError, TemplateSecurityError, TemplateVariableError

__all__ = ["Prompt", "load_prompt", "search_path", "list_prompts", "render_string", "ROLES", "OUTPUT_TYPES"]

Dirs = Union[str, "os.PathLike[str]", Iterable[Union[str, "os.PathLike[str]"]], None]
ROLES = ("system", "user", "assistant", "developer")
OUTPUT_TYPES = ("str", "bool", "int", "float", "json", "dict", "list")
_SETTINGS = (
    "description",
    "output_type",
    "output_retries",
    "messages",
    "output_schema",
    "tools",
    "mcp_servers",
    "tests",
)  # tests: tinyllm eval's cases
# Request parameters a front-matter key is checked against (a key close to one of these but
# not equal is taken for a typo): the chat-completion parameters of the OpenAI API
# (https://platform.openai.com/docs/api-reference/chat/create; openai-python's
# CompletionCreateParams), the SDK's request options, and widely used parameters of
# OpenAI-compatible servers (vLLM, llama.cpp server, OpenRouter), some of which sit close to an
# OpenAI name (top_k ~ top_p, models ~ model, min_tokens ~ max_tokens) and must not be taken for typos.
_OPENAI_PARAMS = frozenset(
    """
    audio frequency_penalty function_call functions logit_bias logprobs max_completion_tokens max_tokens
    messages metadata modalities model moderation n parallel_tool_calls prediction presence_penalty
    prompt_cache_key prompt_cache_options prompt_cache_retention reasoning_effort response_format
    safety_identifier seed service_tier stop store stream stream_options temperature tool_choice tools
    top_logprobs top_p user verbosity web_search_options
    timeout extra_body extra_headers extra_query
""".split()
)
_SERVER_PARAMS = frozenset(
    """
    top_k top_a min_p min_tokens models typical_p repetition_penalty repeat_penalty repeat_last_n
    length_penalty best_of ignore_eos stop_token_ids n_predict n_probs mirostat mirostat_tau mirostat_eta
""".split()
)
# Anthropic's Messages API parameters (https://platform.claude.com/docs/en/api/messages) and tinyllm's
# ``cache`` (prompt-caching breakpoints, see tinyllm/clients/_anthropic_wire.py): sent by the anthropic client.
_ANTHROPIC_PARAMS = frozenset(
    """
    cache cache_control thinking output_config stop_sequences container inference_geo speed service_tier
""".split()
)
_KNOWN_KEYS = frozenset({*_SETTINGS, *_OPENAI_PARAMS, *_SERVER_PARAMS, *_ANTHROPIC_PARAMS})
_YAML_BOOL = "tag:yaml.org,2002:bool"
_UNDEFINED = re.compile(r"^'([^']+)' is undefined$")
_lock = threading.Lock()
_prompts: dict[tuple, tuple[tuple, Prompt]] = {}  # (name, paths, dirs) -> (file signatures, prompt)
# (names, prompts_dir, PROMPTS_DIRS, cwd) -> (time.monotonic() of the last look at the disk, prompt)
_loaded: dict[tuple, tuple[float, Prompt]] = {}


def search_path(prompts_dir: Dirs = None) -> list[Path]:
    """Directories searched for templates, in order, de-duplicated, absolute (existing or not).

    ``prompts_dir`` (a path or a list of paths), then ``PROMPTS_DIRS``, then ``./prompts``.
    Raises ConfigError if ``PROMPTS_DIRS`` does not parse.
    """
    return [Path(p) for p in _search_dirs(prompts_dir)]


def _given_dirs(prompts_dir: Dirs) -> tuple[Any, ...]:
    return (prompts_dir,) if isinstance(prompts_dir, (str, os.PathLike)) else tuple(prompts_dir or ())


def _search_dirs(prompts_dir: Dirs, configured: Iterable[Any] | None = None) -> list[str]:
    # Plain strings and os.path on the load path: pathlib costs several times more.
    out: dict[str, str] = {}  # normcase(path) -> path, in order
    configured = get_config().prompts_dirs if configured is None else configured
    for d in [*_given_dirs(prompts_dir), *configured, "prompts"]:
        p = os.path.abspath(os.path.expanduser(os.fspath(d)))
        out.setdefault(os.path.normcase(p), p)
    return list(out.values())


@functools.lru_cache(maxsize=None)
def _yaml_loader() -> type:
    """The front matter's YAML loader class: ``yaml.SafeLoader`` with two changes.

    - Booleans as in YAML 1.2: only ``true``/``false`` (any of ``true``, ``True``, ``TRUE``);
      ``yes``, ``no``, ``on``, ``off``, ``y``, ``n`` stay the strings the author wrote, so
      ``output_type: [yes, no]`` gives the labels ``"yes"`` and ``"no"``.
    - Aliases (``*name``) are refused with a ``yaml.composer.ComposerError`` (a YAMLError,
      with the line): each alias of a list of aliases multiplies what the data expands to
      (the "billion laughs" document: a few hundred bytes, 9^9 strings once walked), and front matter,
      a few keys, never needs them. Anchors alone (``&name``) are harmless and accepted.
    """
    import yaml
    from yaml.composer import ComposerError

    class FrontMatterLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ComposerError(
                    None,
                    None,
                    f"the alias *{event.anchor} is not allowed in front matter "
                    "(aliases can expand exponentially); write the value out",
                    event.start_mark,
                )
            return super().compose_node(parent, index)

    FrontMatterLoader.yaml_implicit_resolvers = {  # a copy, without the YAML 1.1 boolean resolver
        first: [(tag, rx) for tag, rx in resolvers if tag != _YAML_BOOL]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    FrontMatterLoader.add_implicit_resolver(
        _YAML_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    return FrontMatterLoader


def _split_front_matter(text: str, path: str | None) -> tuple[dict, str]:
    """(front matter, body); front-matter lines become blank lines so Jinja line numbers match the file."""
    lines = text.split("\n")
    if lines[0].rstrip() != "---":
        return {}, text
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if end is None:
        raise TemplateError(f"{path}: the front matter opened by '---' on line 1 is never closed; add a '---' line")
    import yaml  # imported on the first front matter, not at import tinyllm (~8 ms)

    try:
        data = yaml.load("\n".join(lines[1:end]), Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
    except RecursionError as exc:
        raise TemplateError(f"{path}: the YAML front matter is nested too deeply; flatten it") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" on line {mark.line + 2}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise TemplateError(f"{path}: invalid YAML front matter{where}: {problem}; fix the YAML") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: front matter must be a mapping of 'key: value' lines, not {type(data).__name__}")
    return data, "\n" * (end + 1) + "\n".join(lines[end + 1 :])


def _read_text(path: Path) -> str:
    """A template file's text, newlines normalized. Raises TemplateError naming the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read the template file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Loader(jinja2.FileSystemLoader):
    """A FileSystemLoader that drops the front matter of included files.

    The front matter becomes a Jinja comment spanning as many lines, so the included
    text starts where it did and errors report the file's own line numbers."""

    def get_source(self, environment, template):  # type: ignore[override]
        source, filename, uptodate = super().get_source(environment, template)
        return included_body(source, filename), filename, uptodate


def included_body(source: str, filename: str | None) -> str:
    """``source`` of an included file with its front matter turned into a Jinja comment spanning as
    many lines (so errors report the file's own line numbers). Raises TemplateError for bad front matter."""
    fm_body = _split_front_matter(source, filename)[1]
    if fm_body is not source:
        body = fm_body.lstrip("\n")
        fm_body = "{#" + "\n" * (len(fm_body) - len(body)) + "#}" + body
    return fm_body


@functools.lru_cache(maxsize=64)
def _environment(
    dirs: tuple[str, ...],
    carried: tuple[tuple[str, tuple[str, str]], ...] | None = None,
    files: jinja2.BaseLoader | None = None,
) -> ImmutableSandboxedEnvironment:
    """The sandbox for templates found in ``dirs`` (or by ``files``, a loader used instead, e.g. one reading
    a git revision); ``carried``: ``(name, (file, source))`` of included files that came with a pickled
    Prompt, looked up first."""
    loader: jinja2.BaseLoader = files if files is not None else _Loader(list(dirs))
    if carried is not None:
        carried_files = dict(carried)

        def carried_source(name: str) -> tuple[str, str, Any] | None:
            found = carried_files.get(name)
            return None if found is None else (found[1], found[0], lambda: True)

        loader = jinja2.ChoiceLoader([jinja2.FunctionLoader(carried_source), loader])
    return ImmutableSandboxedEnvironment(
        loader=loader, undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


def _compile(env: jinja2.Environment, source: str, name: str, where: str) -> tuple[jinja2.Template, frozenset]:
    """(compiled template, undeclared variables). Raises TemplateError on a syntax error, with file and line."""
    try:
        ast = env.parse(source, name, where)
        names = frozenset(meta.find_undeclared_variables(ast))
        code = env.compile(ast, name, where)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: Jinja syntax error on line {exc.lineno}: {exc.message}") from exc
    except (RecursionError, SyntaxError) as exc:  # Python's own limits on nesting, hit by Jinja or by compile()
        raise TemplateError(f"{where}: {_too_deep(exc)}") from exc
    return env.template_class.from_code(env, code, env.make_globals(None), None), names


def _too_deep(exc: RecursionError | SyntaxError) -> str:
    """The message for a template that nests deeper than Python allows."""
    if isinstance(exc, RecursionError):
        return (
            "the template nests too deeply (Python's recursion limit: thousands of nested blocks or "
            "parentheses, or an include or macro that calls itself); flatten it"
        )
    return (
        f"the template nests too deeply for Python ({exc.msg}: Jinja compiles each block to a nested "
        "Python block; Python allows 20 nested loops and 100 levels of indentation); flatten it"
    )


def _location(exc: BaseException, where: str) -> tuple[str, str]:
    """(template file, "FILE, line N" text) of the innermost template frame in ``exc``'s traceback.

    Jinja rewrites a render error's traceback so that each template frame carries the template's
    file name and line (its globals hold ``__jinja_exception__``); the innermost one is where the
    error happened, possibly in an included file. ``where`` when there is no such frame."""
    file, line, tb = where, None, exc.__traceback__
    while tb is not None:
        if "__jinja_exception__" in tb.tb_frame.f_globals:
            file, line = tb.tb_frame.f_code.co_filename, tb.tb_lineno
        tb = tb.tb_next
    text = file if line is None else f"{file}, line {line}"
    return file, text if file == where else f"{text} (included from {where})"


def _render(
    template: jinja2.Template, variables: dict, where: str, dirs: tuple[str, ...], base: dict | None = None
) -> str:
    """Render ``template``, mapping every Jinja failure into the tinyllm error tree.

    ``base``: ``dict(template.globals)``, taken once when the template was compiled. What
    ``Template.render`` does, without its per-call copy of the globals (a ChainMap, slow to
    copy): a context over the globals updated with ``variables`` (``new_context(...,
    shared=True)`` takes that dict as it is), the root render function, and Jinja's
    ``handle_exception`` (template file and line in the traceback) on failure.

    Messages start with the file (and line) where the failure happened: an included file when
    it happened there ("FILE, line N (included from WHERE)")."""
    try:
        env = template.environment
        context = template.new_context({**(dict(template.globals) if base is None else base), **variables}, shared=True)
        try:
            return env.concat(template.root_render_func(context))
        except Exception:
            env.handle_exception()
    except SecurityError as exc:
        at = _location(exc, where)[1]
        raise TemplateSecurityError(f"{at}: the template sandbox refused an unsafe operation: {exc}") from exc
    except jinja2.UndefinedError as exc:
        file, at = _location(exc, where)
        m = _UNDEFINED.match(str(exc))
        var = m.group(1) if m else None
        hint = f"pass {var}=... or write {{{{ {var} | default(...) }}}} in the template" if var else "check the value"
        raise TemplateVariableError(f"{at}: {exc}; {hint}", variable=var, template=file) from exc
    except jinja2.TemplateNotFound as exc:
        raise TemplateNotFoundError(str(exc.name or exc), list(dirs)) from exc
    except jinja2.TemplateSyntaxError as exc:  # in an included file
        raise TemplateError(f"{exc.filename or where}: Jinja syntax error on line {exc.lineno}: {exc.message}") from exc
    except TemplateError:
        raise
    except SyntaxError as exc:  # an included file nests too deeply (compile() names the file)
        at = exc.filename if exc.filename and exc.filename != where else where
        raise TemplateError(f"{at}{'' if at == where else f' (included from {where})'}: {_too_deep(exc)}") from exc
    except RecursionError as exc:  # an included file nests too deeply, or an include or macro calls itself
        raise TemplateError(f"{_location(exc, where)[1]}: {_too_deep(exc)}") from exc
    except Exception as exc:
        raise TemplateError(f"{_location(exc, where)[1]}: rendering failed: {type(exc).__name__}: {exc}") from exc


def _media_markers(variables: dict) -> tuple[dict, dict] | None:
    """:func:`tinyllm.media.markers`, imported only when a variable holds media."""
    media = sys.modules.get("tinyllm.media")  # no media module loaded: no variable can hold media
    return None if media is None else media.markers(variables)


def _messages(value: Any, path: Path) -> list[tuple[str, str]]:
    """Validate front-matter ``messages:`` into (role, template text) pairs."""
    if not isinstance(value, list):
        raise TemplateError(f"{path}: front matter 'messages' must be a list of '- role: text' entries")
    out = []
    for i, item in enumerate(value):
        role, text = next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (None, None)
        if role not in ROLES or not isinstance(text, str):
            raise TemplateError(
                f"{path}: messages[{i}] must be one '- role: text' mapping with a role among "
                f"{', '.join(ROLES)} and a string text; got {item!r}"
            )
        out.append((role, text))
    return out


def _static(text: str) -> str | None:
    """What ``text`` renders to when it holds no Jinja syntax at all (no ``{``, the start of
    every delimiter; no ``\\r``, which Jinja would turn into ``\\n``), stripped; else None.
    Such a part (often the system prompt) is then not run through Jinja on every call."""
    return text.strip() if "{" not in text and "\r" not in text else None


def misspelled(key: str) -> str | None:
    """The known parameter name ``key`` (str) is probably a typo of, or None.

    A key that is a known parameter, or is not close to one (a server-specific
    parameter such as ``top_k``), gives None; one close to a known name (difflib
    ratio >= 0.8: ``temprature``, ``max_token``, ``top-p``) gives that name.
    """
    if key in _KNOWN_KEYS:
        return None
    close = difflib.get_close_matches(key, sorted(_KNOWN_KEYS), n=1, cutoff=0.8)
    return close[0] if close else None


def _check_params(params: dict[str, Any], origin: dict[str, Path]) -> None:
    """Refuse a misspelled parameter name and an ``extra_body`` that is not a mapping.

    A key that is neither a known parameter (:data:`_KNOWN_KEYS`) nor close to one is a
    server-specific parameter and is sent as given; one close to a known name (difflib ratio
    >= 0.8: ``temprature``, ``max_token``, ``top-p``) is taken for a typo, since an
    OpenAI-compatible server silently ignores a parameter it does not know.
    Raises TemplateError naming the file and suggesting the known name."""
    for key in params:
        if not isinstance(key, str):
            raise TemplateError(f"{origin[key]}: front matter key {key!r} must be a string")
        close = [misspelled(key)] if misspelled(key) else []
        if close:
            raise TemplateError(
                f"{origin[key]}: front matter key {key!r} is not a parameter tinyllm knows; "
                f"did you mean {close[0]!r}? (A server-specific parameter goes under 'extra_body:'.)"
            )
    extra = params.get("extra_body")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(k, str) for k in extra)):
        raise TemplateError(
            f"{origin['extra_body']}: front matter 'extra_body' must be a mapping of "
            f"parameter names to values, not {extra!r}"
        )


class Prompt:
    """A loaded prompt, from :func:`load_prompt` (which raises TemplateError for bad files).

    Attributes: ``name`` (str, the system template name asked for), ``system_path`` (Path),
    ``user_path`` (Path | None), ``front_matter`` (dict, merged), ``description`` (str | None),
    ``output_type`` (str | list | None), ``output_retries`` (int | None), ``output_schema`` (dict | None,
    a JSON schema), ``tools`` (list[str] | None: tool names), ``mcp_servers`` (list | None: MCP servers, each
    a URL, a command line or a mapping; see :func:`tinyllm._mcp.from_front_matter`), ``params`` (dict: the front matter minus those and ``messages``), ``variables``
    (set[str]; includes not followed).
    """

    def __init__(
        self,
        name: str,
        system_path: Path,
        user_path: Path | None,
        dirs: tuple[str, ...],
        *,
        texts: dict[str, str] | None = None,
        includes: dict[str, tuple[str, str]] | None = None,
        loader: jinja2.BaseLoader | None = None,
    ):
        # texts/includes: given when the Prompt comes from a pickle (see __reduce__): the files' texts
        # (path -> text) and the included files (include name -> (file, source)), instead of the disk;
        # loader: where included files are found instead of ``dirs`` on disk (eval's template at a git revision)
        self.name, self.system_path, self.user_path, self._dirs = name, system_path, user_path, dirs
        self._texts: dict[str, str] = {}
        self._includes = includes
        self._sources: list[str] = []  # the Jinja sources compiled, for the includes a pickle carries
        env = self._env = _environment(dirs, None if includes is None else tuple(sorted(includes.items())), loader)
        self.front_matter, self._parts = {}, []
        self.variables: set[str] = set()
        origin: dict[str, Path] = {}  # front-matter key -> the file it came from, for error messages
        for role, path in [("system", system_path), ("user", user_path)]:
            if path is not None:
                text = self._texts[str(path)] = texts[str(path)] if texts is not None else _read_text(path)
                fm, body = _split_front_matter(text, str(path))
                self._sources.append(body)
                template, names = _compile(env, body, path.name, str(path))
                self.front_matter.update(fm)
                origin.update(dict.fromkeys(fm, path))
                self._parts.append((role, template, str(path), _static(body), dict(template.globals)))
                self.variables |= names
        src = origin.get("messages", system_path)
        for i, (role, text) in enumerate(_messages(self.front_matter.get("messages", []), src)):
            self._sources.append(text)
            template, names = _compile(env, text, f"{src.name}#messages[{i}]", f"{src} messages[{i}]")
            self._parts.insert(1 + i, (role, template, str(src), _static(text), dict(template.globals)))
            self.variables |= names
        fm = self.front_matter
        self.description, self.output_type, self.output_retries = (fm.get(k) for k in _SETTINGS[:3])
        self.params = {k: v for k, v in fm.items() if k not in _SETTINGS}
        _check_params(self.params, origin)
        if self.description is not None and not isinstance(self.description, str):
            raise TemplateError(f"{origin['description']}: front matter 'description' must be a string")
        ot = self.output_type
        if (
            ot is not None
            and ot not in OUTPUT_TYPES
            and not (isinstance(ot, list) and ot and all(isinstance(x, (str, int, float, bool)) for x in ot))
        ):
            raise TemplateError(
                f"{origin['output_type']}: front matter 'output_type' must be one of "
                f"{', '.join(OUTPUT_TYPES)} or a list of labels, not {ot!r}"
            )
        self.output_schema = fm.get("output_schema")
        if self.output_schema is not None and not isinstance(self.output_schema, dict):
            raise TemplateError(
                f"{origin['output_schema']}: front matter 'output_schema' must be a JSON schema "
                f"(a mapping such as {{type: object, properties: ...}}), not {self.output_schema!r}"
            )
        self.tools = fm.get("tools")
        if self.tools is not None and not (
            isinstance(self.tools, list) and all(isinstance(t, str) and t for t in self.tools)
        ):
            raise TemplateError(
                f"{origin['tools']}: front matter 'tools' must be a list of tool names registered with "
                f"@tinyllm.tool (e.g. [get_weather]), not {self.tools!r}"
            )
        self.mcp_servers = fm.get("mcp_servers")
        servers = self.mcp_servers
        if servers is not None and not (
            isinstance(servers, list)
            and all(
                (isinstance(x, str) and x) or (isinstance(x, dict) and ("command" in x) != ("url" in x))
                for x in servers
            )
        ):
            raise TemplateError(
                f"{origin['mcp_servers']}: front matter 'mcp_servers' must be a list of MCP servers, each a "
                "URL, a command line, or a mapping with either command: or url: (and env, cwd, name, "
                f"prefix, timeout), not {servers!r}"
            )
        r = self.output_retries
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise TemplateError(
                f"{origin['output_retries']}: front matter 'output_retries' must be an integer >= 0, not {r!r}"
            )

    def render(self, variables: dict[str, Any] | None = None, *, include_user: bool = True) -> list[dict[str, str]]:
        """Render to ``[{"role": ..., "content": ...}, ...]`` (see the module docstring for the order).

        ``include_user=False`` renders every part but the user body (system and ``messages:``),
        so the user template's variables need not be given.

        A variable holding a :class:`tinyllm.Image`, :class:`~tinyllm.Audio` or :class:`~tinyllm.File`
        (or a list of them) makes the message that places it a list of content parts: the text
        around each one as ``text`` parts, in order (see :mod:`tinyllm.media`). Messages without
        media keep their string content.

        Raises:
            TemplateVariableError: a variable is missing (``.variable`` and ``.template`` say which, where).
            TemplateSecurityError: the sandbox refused an operation.
            TemplateNotFoundError: an ``{% include %}`` names no file.
            TemplateError: any other rendering failure.
        """
        variables = dict(variables or {})
        parts = self._parts if include_user or self.user_path is None else self._parts[:-1]  # the user body is last
        media = _media_markers(variables)  # images, audio, files: placeholders now, content parts below
        if media is not None:
            variables = media[0]
        messages: list[dict[str, Any]] = [
            {
                "role": role,
                "content": static if static is not None else _render(t, variables, where, self._dirs, base).strip(),
            }
            for role, t, where, static, base in parts
        ]
        if media is not None:
            from ..media import split

            messages = [{"role": m["role"], "content": split(m["content"], media[1])} for m in messages]
        return messages

    def with_texts(self, system_text: str, user_text: str | None = None) -> Prompt:
        """A new Prompt with this one's files, search path and name, but the given file texts
        (front matter included), as an editor holds them before saving; nothing is read from or
        written to those files (included files still come from the search path).

        ``user_text`` None: no user file; a text for a prompt that has no user file yet: the user
        file is ``NAME.user.EXT`` beside the system file. This prompt is left unchanged.

        Raises:
            TemplateError: the texts do not parse (front matter, Jinja syntax), as :func:`load_prompt`.
        """
        user_path = None
        texts = {str(self.system_path): system_text}
        if user_text is not None:
            head, sep, ext = self.system_path.name.rpartition(".system.")
            user_path = self.user_path or self.system_path.with_name(
                f"{head}.user.{ext}" if sep else f"{self.system_path.name}.user.md"
            )
            texts[str(user_path)] = user_text
        return Prompt(self.name, self.system_path, user_path, self._dirs, texts=texts)

    def __repr__(self) -> str:
        return f"Prompt({self.name!r}, system_path='{self.system_path}', user_path='{self.user_path}')"

    # -- pickling: a Prompt travels with its sources (Dask workers, processes) ----------------------
    def __reduce__(self) -> tuple:
        """Pickle as the texts of its files and of the files they include, so it is rebuilt
        elsewhere (another process or machine) without reading any file there.

        Carried: the system and user files (front matter included) and every file reached by an
        ``{% include %}``, ``{% import %}`` or ``{% extends %}`` that names it literally (followed
        recursively). A name computed at render time (``{% include name_var %}``) cannot be
        known in advance: it is looked up on the unpickling side's search path (the same
        directory names), where it may be missing (TemplateNotFoundError on render).
        """
        return (
            _carried_prompt,
            (
                self.name,
                str(self.system_path),
                None if self.user_path is None else str(self.user_path),
                self._dirs,
                dict(self._texts),
                self._included(),
            ),
        )

    def _included(self) -> dict[str, tuple[str, str]]:
        """``{include name: (file, source)}`` of every file the templates name literally, recursively."""
        if self._includes is not None:
            return dict(self._includes)
        env, found = self._env, {}
        todo = list(self._sources)
        while todo:
            try:
                names = list(meta.find_referenced_templates(env.parse(todo.pop())))
            except jinja2.TemplateSyntaxError:
                continue  # reported when that file is rendered
            for ref in names:
                if ref is None or ref in found:
                    continue  # None: a name computed at render time (see __reduce__)
                try:
                    source, filename = env.loader.get_source(env, ref)[:2]  # type: ignore[union-attr]
                except (jinja2.TemplateNotFound, TemplateError):
                    continue  # fails the same way when rendered
                found[ref] = (filename or ref, source)
                todo.append(source)
        return found


_carried_lock = threading.Lock()
_carried: dict[tuple, Prompt] = {}  # a pickled prompt's content -> the Prompt built from it
fresh_locks_in_child(globals(), "_lock", "_carried_lock")


def _carried_prompt(
    name: str,
    system_path: str,
    user_path: str | None,
    dirs: tuple[str, ...],
    texts: dict[str, str],
    includes: dict[str, tuple[str, str]],
) -> Prompt:
    """A Prompt rebuilt from pickled sources (see :meth:`Prompt.__reduce__`); the same object for the
    same content, so the tasks of a batch compile it once per process."""
    key = (name, system_path, user_path, dirs, tuple(sorted(texts.items())), tuple(sorted(includes.items())))
    with _carried_lock:
        found = _carried.get(key)
    if found is None:
        found = Prompt(
            name,
            Path(system_path),
            None if user_path is None else Path(user_path),
            tuple(dirs),
            texts=texts,
            includes=includes,
        )
        with _carried_lock:
            if len(_carried) >= 256:
                _carried.clear()
            _carried[key] = found
    return found


def _find(name: str, dirs: list[str]) -> str | None:
    for p in [*(os.path.join(d, name) for d in dirs), os.path.expanduser(name)]:
        if os.path.isfile(p):
            return os.path.abspath(p)
    return None


def _find_system(name: str, dirs: list[str]) -> str:
    """The absolute path of the system template file ``name`` (str) names, on the search path ``dirs``
    (absolute directories, in order); shared by :func:`load_prompt` and the ``tinyllm`` command.

    A name whose file name part has no ``.system.`` is a short name: ``NAME`` means
    ``NAME.system.md`` (in any directory of ``dirs``, in order, then as a path), else
    ``NAME.system.<ext>`` (the first, in sorted order, of the first directory that has one;
    no editor backups ``~``), else the file ``NAME`` itself. Any other name is a file name
    looked up in ``dirs``, then taken as a path (``~`` expanded).

    Raises:
        TemplateNotFoundError: nothing matches; for a short name its ``name`` is ``NAME.system.md``.
    """
    if ".system." in os.path.basename(name):
        found = _find(name, dirs)
        if found is None:
            raise TemplateNotFoundError(name, dirs)
        return found
    found = _find(f"{name}.system.md", dirs)
    for d in (*dirs, None) if found is None else ():
        pattern = glob.escape(os.path.join(d, name) if d is not None else os.path.expanduser(name)) + ".system.*"
        matches = [p for p in sorted(glob.glob(pattern)) if not p.endswith("~") and os.path.isfile(p)]
        if matches:
            found = os.path.abspath(matches[0])
            break
    found = found or _find(name, dirs)
    if found is None:
        raise TemplateNotFoundError(f"{name}.system.md", dirs)
    return found


def _sibling_user(path: str) -> str | None:
    folder, base = os.path.split(path)
    head, sep, ext = base.rpartition(".system.")
    p = os.path.join(folder, f"{head}.user.{ext}") if sep and head else None
    return p if p is not None and os.path.isfile(p) else None


def _signature(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path is not None else None
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read the template file: {exc.strerror or exc}") from exc
    return (st.st_mtime_ns, st.st_size) if st else None


def load_prompt(
    system_template_name: str, user_template_name: str | None = None, *, prompts_dir: Dirs = None
) -> Prompt:
    """Find, parse and compile a prompt; the same object is returned until one of its files changes.

    ``system_template_name`` is a file name (``summarize.system.md``), a path, or a short name
    (``summarize``: ``summarize.system.md``, else ``summarize.system.<ext>``, else the file
    ``summarize``), as the ``tinyllm`` command takes it. ``NAME.system.EXT`` pairs with
    ``NAME.user.EXT`` in its directory unless ``user_template_name`` is given (looked up on the
    search path, then next to the system file).

    The files are looked for and stat-checked again only when the last look at them, for the
    same arguments, search path and working directory, is ``FILE_CHECK_INTERVAL`` seconds old
    (default 1; 0: on every load), so an edited, added or removed template is seen within that
    time. Each look costs about 8 system calls, which under many threads also hand off the GIL.

    Raises:
        TemplateNotFoundError: a name is in no searched directory and is no file path.
        TemplateError: an unreadable or non-UTF-8 file, bad front matter (invalid YAML, a YAML
            alias, a misspelled parameter name), a Jinja syntax error, or a template nested
            deeper than Python allows.
    """
    given = _given_dirs(prompts_dir)
    cfg = get_config()
    name = os.fspath(system_template_name)
    user_name = None if user_template_name is None else os.fspath(user_template_name)
    key = (name, user_name, tuple(map(os.fspath, given)), tuple(cfg.prompts_dirs), os.getcwd())
    now = time.monotonic()
    found = _loaded.get(key)
    if found is not None and now - found[0] < cfg.file_check_interval:
        return found[1]
    prompt = _load(name, user_name, _search_dirs(given, cfg.prompts_dirs))
    with _lock:
        if len(_loaded) >= 1024:
            _loaded.clear()
        _loaded[key] = (now, prompt)
    return prompt


def _load(name: str, user_name: str | None, dirs: list[str]) -> Prompt:
    """:func:`load_prompt` after its memo: find the files, and parse them unless unchanged."""
    system_path = _find_system(name, dirs)
    if user_name is None:
        user_path = _sibling_user(system_path)
    else:
        user_dirs = [*dirs, os.path.dirname(system_path)]
        user_path = _find(user_name, user_dirs)
        if user_path is None:
            raise TemplateNotFoundError(user_name, user_dirs)
    loader_dirs = [
        os.path.dirname(system_path),
        *([os.path.dirname(user_path)] if user_path else []),
        *filter(os.path.isdir, dirs),
    ]
    env_dirs = tuple(dict.fromkeys(loader_dirs))
    key = (name, system_path, user_path, env_dirs)
    sig = (_signature(system_path), _signature(user_path))
    with _lock:
        hit = _prompts.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    prompt = Prompt(name, Path(system_path), Path(user_path) if user_path else None, env_dirs)
    with _lock:
        if len(_prompts) >= 1024:
            _prompts.clear()
        _prompts[key] = (sig, prompt)
    return prompt


def list_prompts(prompts_dir: Dirs = None, *, errors: list[tuple[Path, TemplateError]] | None = None) -> list[Prompt]:
    """Every ``*.system.*`` prompt on the search path (sorted per directory); the first file of a name wins.

    Raises TemplateError when a listed prompt does not load (the message names the file), unless
    ``errors`` (a list) is given: then ``(system file, TemplateError)`` is appended to it for each
    prompt that does not load, and the others are returned.
    """
    out: dict[str, Prompt | None] = {}  # file name -> Prompt; None: broken (it still hides later files of that name)
    dirs = search_path(prompts_dir)
    for d in dirs:
        for p in sorted(d.glob("*.system.*")) if d.is_dir() else []:
            if p.name not in out and not p.name.startswith(".") and not p.name.endswith("~") and p.is_file():
                try:
                    out[p.name] = load_prompt(p.name, prompts_dir=[d, *dirs])
                except TemplateError as exc:
                    if errors is None:
                        raise
                    errors.append((p, exc))
                    out[p.name] = None
    return [p for p in out.values() if p is not None]


@functools.lru_cache(maxsize=256)
def _compile_string(source: str, name: str, dirs: tuple[str, ...]) -> jinja2.Template:
    return _compile(_environment(dirs), source, name, name)[0]


def render_string(source: str, variables: dict[str, Any] | None = None, *, name: str = "<string>") -> str:
    """Render a bare template string in the same sandbox (no front matter; includes use the search path).

    Raises TemplateError (syntax), TemplateVariableError, TemplateSecurityError, TemplateNotFoundError.
    """
    dirs = tuple(str(d) for d in search_path() if d.is_dir())
    return _render(_compile_string(source, name, dirs), dict(variables or {}), name, dirs)
