"""Token counting that works offline: bundled tiktoken encodings, per-message counts, context windows.

The BPE ranks of ``cl100k_base`` and ``o200k_base`` ship in ``tinyllm/encodings/``
(byte for byte as tiktoken downloads them; the sha256 is checked on load), so
nothing is downloaded. They are read straight from the package, never through
tiktoken's loader, which copies every file it reads into its cache directory
(``TIKTOKEN_CACHE_DIR``, else ``$TMPDIR/data-gym-cache``) and fails when that is
read-only: counting tokens writes nothing anywhere. Importing this module imports
neither tiktoken nor any encoding: each encoding is loaded on first use, once per process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fork import fresh_locks_in_child
from .errors import ContextWindowExceededError
from .models import model_info

if TYPE_CHECKING:
    import tiktoken

__all__ = ["get_encoding", "encoding_for_model", "count_tokens", "check_context_window", "DEFAULT_ENCODING"]

#: Encoding for models :func:`tinyllm.models.model_info` does not know (current OpenAI models use it).
DEFAULT_ENCODING = "o200k_base"
ENCODINGS_DIR = Path(__file__).with_name("encodings")

# sha256 of the bundled files; the same expected_hash tiktoken_ext/openai_public.py passes.
_HASHES = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Cookbook rule ("How to count tokens with tiktoken", see count_tokens): tokens per message,
# extra token when a message has a ``name``, and tokens priming the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

_lock = threading.Lock()
fresh_locks_in_child(globals(), "_lock")
_loaded: dict[str, tiktoken.Encoding] = {}


def _constructor_args(name: str) -> dict[str, Any]:
    """Split pattern and special tokens, exactly as tiktoken_ext/openai_public.py (tiktoken 0.14) defines them."""
    from tiktoken_ext.openai_public import ENDOFPROMPT, ENDOFTEXT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    if name == "cl100k_base":
        special_tokens = {
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        }
        pat_str = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        return {"pat_str": pat_str, "special_tokens": special_tokens}
    special_tokens = {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}
    pat_str = "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    )
    return {"pat_str": pat_str, "special_tokens": special_tokens}


def _read_ranks(name: str) -> dict[bytes, int]:
    """The BPE ranks (token bytes -> rank) of the bundled ``NAME.tiktoken``, read without writing anything.

    The file's format, as ``tiktoken.load.load_tiktoken_bpe`` parses it: one ``<base64 token> <rank>``
    per line. Raises ValueError when the file's sha256 is not the expected one (a damaged install)."""
    path = ENCODINGS_DIR / f"{name}.tiktoken"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != _HASHES[name]:
        raise ValueError(f"{path}: hash mismatch, the bundled encoding file is damaged; reinstall tinyllm")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def get_encoding(name: str) -> tiktoken.Encoding:
    """Return the tiktoken encoding ``name`` (``"cl100k_base"`` or ``"o200k_base"``), built from the bundled file.

    The ranks are read from the package (:func:`_read_ranks`, sha256 checked) on first use,
    then the encoding is memoized (thread-safe, once per process). Never uses the network,
    never writes a file (works on a read-only filesystem and cache directory).

    Raises:
        ValueError: an encoding that is not bundled, or a damaged bundled file.
    """
    enc = _loaded.get(name)
    if enc is not None:
        return enc
    if name not in _HASHES:
        raise ValueError(f"unknown encoding {name!r}; bundled: {', '.join(sorted(_HASHES))}")
    with _lock:
        enc = _loaded.get(name)
        if enc is None:
            import tiktoken

            enc = tiktoken.Encoding(name, mergeable_ranks=_read_ranks(name), **_constructor_args(name))
            _loaded[name] = enc
    return enc


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """Return the encoding ``model`` (str) uses, per :func:`tinyllm.models.model_info`.

    Models it does not know (local models, new names) get ``o200k_base``
    (:data:`DEFAULT_ENCODING`): counts are then an estimate, not exact.
    """
    enc = _by_model.get(model)
    if enc is None:
        info = model_info(model)
        enc = get_encoding(info.encoding if info is not None else DEFAULT_ENCODING)
        if len(_by_model) < 1024:  # bounded: model names come from callers
            _by_model[model] = enc
    return enc


_by_model: dict[str, Any] = {}  # model name -> its encoding (encoding_for_model's memo)


def _content_text(content: Any) -> list[str]:
    """Strings to count in a message's ``content``: a str, or the ``text`` of ``type: text`` parts."""
    if isinstance(content, str):
        return [content]
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
        else:
            raise TypeError(f"content parts must be dicts or str, not {type(part).__name__}")
    return texts


def count_tokens(messages_or_text: str | list[dict[str, Any]], model: str) -> int:
    """Count the tokens (int) that ``messages_or_text`` costs as a prompt for ``model``.

    A ``str`` counts its tokens (special-token text such as ``<|endoftext|>``
    counts as ordinary text, as the API treats it). A list of chat messages
    follows the OpenAI cookbook, "How to count tokens with tiktoken"
    (https://github.com/openai/openai-cookbook/blob/main/examples/How_to_count_tokens_with_tiktoken.ipynb):
    3 tokens per message, plus the tokens of each string value (``role``,
    ``content``, ``name``, ...), plus 1 if the message has a ``name``, plus 3
    for the reply priming ``<|start|>assistant<|message|>``. A ``content`` list
    counts its text parts, and its images by OpenAI's tile rule (85 tokens at ``detail: low``;
    else 85 + 170 per 512 px tile after scaling to fit 2048 x 2048, then to a shortest side
    of 768 px: https://platform.openai.com/docs/guides/images-vision, "Calculating costs";
    see :func:`tinyllm.media.part_tokens`); audio and file parts count 0; other non-str values
    (``tool_calls``, ...) count as their compact JSON; ``None`` values count 0.
    Exact for the cookbook's models; an estimate for others and for tools.

    Raises:
        TypeError: ``messages_or_text`` is neither a str nor a list of dicts.
    """
    enc = encoding_for_model(model)
    if isinstance(messages_or_text, str):
        return _count(enc, messages_or_text)
    if not isinstance(messages_or_text, (list, tuple)):
        kind = type(messages_or_text).__name__
        raise TypeError(f"count_tokens() takes a str or a list of message dicts, not {kind}")
    total = 0
    for message in messages_or_text:
        if not isinstance(message, dict):
            raise TypeError(f"each message must be a dict, not {type(message).__name__}")
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if value is None:
                continue
            if isinstance(value, str):
                total += _count(enc, value)
            elif key == "content" and isinstance(value, (list, tuple)):
                for text in _content_text(value):
                    total += _count(enc, text)
                total += _media_tokens(value)
            else:
                total += _count(enc, json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))
            if key == "name":
                total += TOKENS_PER_NAME
    return total + REPLY_PRIMING_TOKENS


def _media_tokens(content: Any) -> int:
    """Tokens of the non-text parts of a ``content`` list (images by OpenAI's rule; see :mod:`tinyllm.media`)."""
    if all(isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text") for p in content):
        return 0
    from .media import part_tokens

    return sum(part_tokens(p) for p in content)


# Token counts of recent strings per encoding: every call counts its whole prompt, and
# most of it (the role names, a system prompt, few-shot examples) repeats call after
# call. Bounded by the characters kept (cleared when full); a lost race only recounts.
_counts: dict[tuple[str, str], int] = {}
_counts_chars = 0
_COUNTS_MAX_CHARS = 4_000_000


def _count(enc: tiktoken.Encoding, text: str) -> int:
    global _counts_chars
    key = (enc.name, text)
    n = _counts.get(key)
    if n is None:
        n = len(enc.encode_ordinary(text))
        if _counts_chars + len(text) > _COUNTS_MAX_CHARS:
            _counts.clear()
            _counts_chars = 0
        _counts[key] = n
        _counts_chars += len(text)
    return n


def check_context_window(
    prompt_tokens: int, max_tokens: int | None, model: str, *, context_window: int | None = None
) -> None:
    """Refuse early a request whose prompt plus output cannot fit the model's context window.

    ``prompt_tokens`` and ``max_tokens`` are token counts (``max_tokens`` None counts 0).
    The window (tokens) is ``context_window`` if given, else ``model_info(model).context_window``;
    a model tinyllm does not know, with no ``context_window``, is not checked.

    Raises:
        ContextWindowExceededError: ``prompt_tokens + max_tokens > window``; its
            ``prompt_tokens``, ``max_tokens`` and ``context_window`` are set.
    """
    window = context_window
    if window is None:
        info = model_info(model)
        if info is None:
            return
        window = info.context_window
    needed = prompt_tokens + (max_tokens or 0)
    if needed <= window:
        return
    asked = f"{prompt_tokens} prompt tokens" + (f" + max_tokens={max_tokens}" if max_tokens else "")
    raise ContextWindowExceededError(
        f"{asked} = {needed} tokens exceed the context window of {model!r} ({window} tokens) "
        f"by {needed - window}. Shorten the input, lower max_tokens, "
        "or pick a model with a larger context window.",
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        context_window=window,
    )
