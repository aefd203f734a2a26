"""What the Prompt page shows as the author types: the edited prompt rendered into messages, with
each message's tokens, the whole prompt's tokens and its share of the model's context window.
Also the Prompts page's test-case counts. Only the public API: Prompt.with_texts/render, the
client's count_tokens and context_window (tiktoken's count when no backend is configured)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..clients import get_client
from ..config import get_config
from ..errors import ConfigError, TemplateVariableError, TinyLLMError
from ..models import model_info
from ..prompts import Prompt, search_path
from ..tokens import count_tokens
from ._edit import PromptFiles, join_front_matter

__all__ = ["Preview", "count_cases", "edited_prompt", "preview"]


@dataclass
class Preview:
    """The rendered messages of an edit and their token counts.

    Attributes:
        prompt: the edited prompt (None when the texts do not parse).
        variables: the template variables, sorted (those of the last prompt that parsed).
        values: the variables rendered with: the non-empty fields, and "" for an empty one the template
            needs (an empty field whose variable has a ``| default(...)`` is left out, so the default applies).
        messages: ``[{"role", "content", "tokens"}]`` (tokens: that message alone, with its per-message overhead).
        total: the whole prompt's tokens as the backend counts them (None when nothing rendered).
        window: the model's context window in tokens, None when unknown.
        model: the model counted for; counter: ``"api_type tokenizer"`` or ``"tiktoken"``.
        error: why nothing rendered (a TemplateError's message), or None.
    """

    prompt: Prompt | None = None
    variables: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    total: int | None = None
    window: int | None = None
    model: str = ""
    counter: str = ""
    error: str | None = None

    @property
    def share(self) -> float | None:
        """``total / window`` (0..1+), None when either is unknown."""
        return self.total / self.window if self.total is not None and self.window else None


def edited_prompt(files: PromptFiles, front_matter: str, system: str, user: str, dirs: list[str]) -> Prompt:
    """The prompt the editor's texts make (nothing saved). Raises TemplateError when they do not parse."""
    system_text = join_front_matter(front_matter, system)
    user_text = user if user.strip() or files.user_exists else None
    if files.prompt is not None:
        return files.prompt.with_texts(system_text, user_text)
    # a prompt whose files do not load (yet): its search path as load_prompt builds it
    env_dirs = tuple(dict.fromkeys([str(files.system_path.parent), *(str(d) for d in search_path(dirs) if d.is_dir())]))
    texts = {
        str(files.system_path): system_text,
        **({str(files.user_path): user_text} if user_text is not None else {}),
    }
    return Prompt(
        files.name, files.system_path, files.user_path if user_text is not None else None, env_dirs, texts=texts
    )


def preview(
    files: PromptFiles,
    front_matter: str,
    system: str,
    user: str,
    variables: dict[str, str],
    api_type: str | None,
    model: str | None,
    dirs: list[str],
    count: bool = True,
) -> Preview:
    """Render the edit with ``variables`` (see ``Preview.values``) and count its tokens for
    ``model`` on ``api_type`` (default: the front matter's model, else the MODEL setting);
    ``count=False``: render only (what Run needs)."""
    out = Preview()
    try:
        out.prompt = edited_prompt(files, front_matter, system, user, dirs)
    except TinyLLMError as exc:
        out.error = str(exc)
        out.variables = sorted(files.prompt.variables) if files.prompt is not None else []
        return out
    out.variables = sorted(out.prompt.variables)
    # an empty field is a variable not given (so `| default(...)` applies), unless the template needs it:
    # then it is the empty string
    out.values = {name: variables[name] for name in out.variables if variables.get(name)}
    for _ in range(len(out.variables) + 1):
        try:
            messages = out.prompt.render(out.values)
            break
        except TemplateVariableError as exc:
            if exc.variable is None or exc.variable in out.values or exc.variable not in out.variables:
                out.error = str(exc)
                return out
            out.values[exc.variable] = ""
        except TinyLLMError as exc:
            out.error = str(exc)
            return out
    else:  # pragma: no cover - each round adds one variable
        out.error = "the template needs more variables than it declares"
        return out
    if not count:
        out.messages = [{**m, "tokens": None} for m in messages]
        return out
    try:
        sender = get_client(api_type or None)
    except ConfigError:
        sender = None  # no backend configured: tiktoken's count, the model table's window
    out.model = model or out.prompt.params.get("model") or (sender.settings() if sender else get_config()).model
    try:
        if sender is not None:
            cfg = sender.settings()
            out.messages = [{**m, "tokens": sender.count_tokens([m], out.model, cfg)} for m in messages]
            out.total = sender.count_tokens(messages, out.model, cfg)
            out.window = sender.context_window(out.model, cfg)
            out.counter = f"{sender.api_type} tokenizer"
        else:
            out.messages = [{**m, "tokens": count_tokens([m], out.model)} for m in messages]
            out.total = count_tokens(messages, out.model)
            info = model_info(out.model)
            out.window = info.context_window if info else None
            out.counter = "tiktoken"
    except TinyLLMError as exc:  # e.g. the embedded model's file is missing
        out.messages = [{**m, "tokens": None} for m in messages]
        out.error = f"tokens not counted: {exc}"
    return out


def count_cases(files: PromptFiles) -> int | None:
    """Test cases of a prompt: its front matter's ``tests:`` list plus the items of ``NAME.tests.yaml``
    (or ``.yml``) beside it (a list, or a mapping with a ``tests``/``cases`` list). None when it has
    none or its tests file does not parse."""
    import yaml

    n = 0
    found = False
    if files.prompt is not None and isinstance(files.prompt.front_matter.get("tests"), list):
        n, found = len(files.prompt.front_matter["tests"]), True
    for ext in ("yaml", "yml"):
        path = files.system_path.with_name(f"{files.name}.tests.{ext}")
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                return None
            if isinstance(data, dict):
                data = data.get("tests", data.get("cases"))
            if isinstance(data, list):
                n, found = n + len(data), True
            break
    return n if found else None
