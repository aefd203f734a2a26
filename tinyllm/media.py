"""Images, audio and files in messages: :class:`Image`, :class:`Audio`, :class:`File` as template variables.

>>> LLMCall("describe").call(photo=Image("cat.png"), question="What is this?")

Where a template writes ``{{ photo }}``, that spot of the message becomes a content part
(OpenAI's chat-completions format), and the text around it stays text parts, in order::

    [{"type": "text", "text": "What is this?\\n"},
     {"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": "auto"}}]

A message without media keeps its plain string content (a prompt that uses no media renders
exactly as before). How: :func:`markers` gives each media value a placeholder for one render,
``⟦tinyllm-media:<128 random bits>:<n>⟧``: fresh random bits per render, so no text a user
passes can forge one; :func:`split` cuts the rendered text at the placeholders.

Local files and bytes are sent inline as base64 (data URLs), their media type read from
their first bytes (the magic numbers of each format's specification); a type the API does not
take is refused with :class:`~tinyllm.MediaError`. An image given as an ``http(s)`` URL is sent
as the URL (the server fetches it). The cache key covers the bytes (they are in the messages);
the call log stores each medium's sha256 and size instead (:func:`redacted`).

Token counts (:func:`part_tokens`) follow OpenAI's documented rule for images
(https://platform.openai.com/docs/guides/images-vision, "Calculating costs"): ``detail: low``
costs 85 tokens; otherwise the image is scaled to fit in 2048 x 2048, then so that its shortest
side is 768 px (never scaled up), and costs 85 + 170 per 512 px tile. ``auto`` is counted as
``high`` (an upper bound: the API picks one). An image given by URL is not fetched: it counts
as the largest high-detail image, 8 tiles (1,445 tokens). Audio and files count 0 (the API's
``usage`` reports what they cost).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import secrets
from collections.abc import Iterable
from typing import Any

from .errors import MediaError

__all__ = [
    "AUDIO_TYPES",
    "FILE_TYPES",
    "IMAGE_TYPES",
    "Audio",
    "File",
    "Image",
    "Media",
    "kinds_in",
    "markers",
    "part_tokens",
    "redacted",
    "split",
]

#: image media types the chat-completions API takes (OpenAI: PNG, JPEG, WEBP, non-animated GIF)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
#: audio formats of ``input_audio`` parts (OpenAI: wav and mp3), by media type
AUDIO_TYPES = {"audio/wav": "wav", "audio/mpeg": "mp3"}
#: file types of ``file`` parts (OpenAI: PDF)
FILE_TYPES = ("application/pdf",)

_LOW_TOKENS, _TILE_TOKENS, _TILE = 85, 170, 512  # OpenAI's image rule (see the module docstring)
_URL_IMAGE_TOKENS = _LOW_TOKENS + 8 * _TILE_TOKENS  # the largest high-detail image: 768 x 2048, 2 x 4 tiles
_DETAILS = ("auto", "low", "high")


def sniff(data: bytes) -> str | None:
    """The media type of ``data`` from its first bytes, for the types tinyllm sends; None otherwise.

    Magic numbers: PNG ``89 50 4E 47 0D 0A 1A 0A`` (PNG spec 5.2); JPEG ``FF D8 FF`` (the SOI
    marker and the next marker's FF); GIF ``GIF87a``/``GIF89a``; WebP and WAV are RIFF containers
    with the form type ``WEBP`` / ``WAVE`` at bytes 8-11; MP3 an ``ID3`` tag or an MPEG audio
    frame sync (11 set bits); PDF ``%PDF-`` (ISO 32000-1, 7.5.2).
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data.startswith(b"ID3") or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    return None


def _read(source: Any, what: str) -> tuple[bytes, str | None]:
    """(bytes, file name or None) of a path or bytes. Raises MediaError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise MediaError(f"the API takes no {what} URLs: download the {what} and pass its path or bytes")
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        try:
            with open(path, "rb") as f:
                return f.read(), os.path.basename(path)
        except OSError as exc:
            raise MediaError(f"cannot read the {what} file {path!r}: {exc.strerror or exc}") from exc
    raise MediaError(f"the {what} must be a file path or bytes, not {type(source).__name__}")


class Media:
    """Base of :class:`Image`, :class:`Audio` and :class:`File`: content placed in a message.

    Attributes:
        data (bytes | None): the content (None for an image given by URL).
        url (str | None): the URL of an image given by URL.
        media_type (str | None): e.g. ``image/png`` (None for a URL).
        filename (str | None): the file's name when read from a path.
        size (int): bytes (0 for a URL).
        sha256 (str): hex digest of the bytes (of the URL for a URL).
    """

    kind = "media"
    accepted: tuple[str, ...] = ()

    def __init__(self, source: Any) -> None:
        self.url: str | None = None
        data, self.filename = _read(source, self.kind)
        self.data: bytes | None = data
        found = sniff(data)
        if found not in self.accepted:
            what = f"{found} content" if found else "content of an unknown type"
            name = f" {self.filename!r}" if self.filename else ""
            raise MediaError(f"{type(self).__name__}{name}: {what}; the API takes {', '.join(self.accepted)}")
        self.media_type: str | None = found
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()

    def data_url(self) -> str:
        """``data:<media type>;base64,<the bytes>``."""
        return f"data:{self.media_type};base64,{base64.b64encode(self.data or b'').decode('ascii')}"

    def part(self) -> dict:
        """The content part of a chat message (OpenAI's format)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        if self.url is not None:
            return f"{type(self).__name__}({self.url!r})"
        name = f"{self.filename!r}, " if self.filename else ""
        return f"{type(self).__name__}({name}{self.media_type}, {self.size} bytes, sha256={self.sha256})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.sha256 == self.sha256 and other.part() == self.part()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.sha256))


class Image(Media):
    """An image for a message: a file path, bytes, or an ``http(s)`` URL (also a ``data:`` URL).

    Args:
        source: ``str`` / ``os.PathLike`` path, ``bytes``, or a URL string.
        detail: ``"auto"`` (default), ``"low"`` (85 tokens, 512 px) or ``"high"``.

    Attributes (besides :class:`Media`'s): ``detail`` (str); ``width`` and ``height`` (int
    pixels, None for a URL), read from the image's header by the ``imagesize`` package.

    Raises:
        MediaError: the file cannot be read; the content is not PNG, JPEG, GIF or WebP; an
            unknown ``detail``.
    """

    kind = "image"
    accepted = IMAGE_TYPES

    def __init__(self, source: Any, detail: str = "auto") -> None:
        if detail not in _DETAILS:
            raise MediaError(f"Image detail must be one of {', '.join(_DETAILS)}, not {detail!r}")
        self.detail = detail
        self.width: int | None = None
        self.height: int | None = None
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            self.url, self.data, self.filename, self.media_type, self.size = source, None, None, None, 0
            self.sha256 = hashlib.sha256(source.encode()).hexdigest()
            return
        if isinstance(source, str) and source.startswith("data:"):
            source = _data_url_bytes(source)
        super().__init__(source)
        self.width, self.height = image_size(self.data or b"")

    def part(self) -> dict:
        """``{"type": "image_url", "image_url": {"url": <the URL or a data URL>, "detail": ...}}``."""
        return {"type": "image_url", "image_url": {"url": self.url or self.data_url(), "detail": self.detail}}

    def tokens(self) -> int:
        """Prompt tokens this image costs by OpenAI's rule (see the module docstring)."""
        if self.detail == "low":
            return _LOW_TOKENS
        if self.width is None or self.height is None:
            return _URL_IMAGE_TOKENS
        return image_tokens(self.width, self.height, self.detail)


class Audio(Media):
    """Audio for a message (an ``input_audio`` part, for audio models such as ``gpt-4o-audio-preview``).

    Args:
        source: a WAV or MP3 file's path, or its bytes (the API takes no audio URLs).

    Raises:
        MediaError: the file cannot be read, or is not WAV or MP3.
    """

    kind = "audio"
    accepted = tuple(AUDIO_TYPES)

    def part(self) -> dict:
        """``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav" | "mp3"}}``."""
        return {
            "type": "input_audio",
            "input_audio": {
                "data": base64.b64encode(self.data or b"").decode("ascii"),
                "format": AUDIO_TYPES[self.media_type or ""],
            },
        }


class File(Media):
    """A PDF document for a message (a ``file`` part; the model sees its text and page images).

    Args:
        source: a PDF file's path, or its bytes.
        filename: the name sent with it (default: the file's name, else ``document.pdf``).

    Raises:
        MediaError: the file cannot be read, or is not a PDF.
    """

    kind = "file"
    accepted = FILE_TYPES

    def __init__(self, source: Any, filename: str | None = None) -> None:
        super().__init__(source)
        self.filename = filename or self.filename or "document.pdf"

    def part(self) -> dict:
        """``{"type": "file", "file": {"filename": ..., "file_data": <a data URL>}}``."""
        return {"type": "file", "file": {"filename": self.filename, "file_data": self.data_url()}}


def _data_url_bytes(url: str) -> bytes:
    m = re.fullmatch(r"data:[\w/+.-]*;base64,(.*)", url, re.DOTALL)
    try:
        if m is None:
            raise ValueError("not a base64 data URL")
        return base64.b64decode(m.group(1), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise MediaError(f"cannot read the image's data URL: {exc}") from exc


# -- sizes and tokens ---------------------------------------------------------------------------------


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """(width, height) in pixels from an image's header (the ``imagesize`` package); (None, None) when unreadable."""
    import imagesize

    try:
        width, height = imagesize.get(io.BytesIO(data))
    except (ValueError, OSError, IndexError, TypeError):
        return None, None
    return (width, height) if width > 0 and height > 0 else (None, None)


def image_tokens(width: int, height: int, detail: str = "high") -> int:
    """Prompt tokens of a ``width`` x ``height`` px image by OpenAI's rule (see the module docstring).

    >>> image_tokens(1024, 1024), image_tokens(2048, 4096), image_tokens(4096, 4096, "low")
    (765, 1105, 85)
    """
    if detail == "low":
        return _LOW_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return _LOW_TOKENS + _TILE_TOKENS * math.ceil(w / _TILE) * math.ceil(h / _TILE)


_part_tokens: dict[str, int] = {}  # a data URL's sha256 -> its tokens: a part is counted on every request


def part_tokens(part: Any) -> int:
    """Prompt tokens of one non-text content part: an image by OpenAI's rule, audio and files 0."""
    if not isinstance(part, dict) or part.get("type") != "image_url" or not isinstance(part.get("image_url"), dict):
        return 0
    spec = part["image_url"]
    url, detail = spec.get("url"), spec.get("detail") or "auto"
    if detail == "low":
        return _LOW_TOKENS
    if not isinstance(url, str) or not url.startswith("data:"):
        return _URL_IMAGE_TOKENS
    key = hashlib.sha256(f"{detail}:{url}".encode()).hexdigest()
    found = _part_tokens.get(key)
    if found is None:
        try:
            width, height = image_size(_data_url_bytes(url))
        except MediaError:
            width = height = None
        found = _URL_IMAGE_TOKENS if width is None or height is None else image_tokens(width, height, detail)
        if len(_part_tokens) >= 1024:
            _part_tokens.clear()
        _part_tokens[key] = found
    return found


# -- rendering: markers in, content parts out ---------------------------------------------------------

_MARK = "\u27e6tinyllm-media:"  # ⟦


def markers(variables: dict) -> tuple[dict, dict[str, dict]] | None:
    """``(variables with each media value replaced by a placeholder, {placeholder: content part})``, or
    None when no variable holds media (a Media, or a list/tuple of them, one placeholder each)."""
    if not any(
        isinstance(v, Media) or (isinstance(v, (list, tuple)) and v and any(isinstance(x, Media) for x in v))
        for v in variables.values()
    ):
        return None
    token = secrets.token_hex(16)
    parts: dict[str, dict] = {}

    def mark(value: Media) -> str:
        placeholder = f"{_MARK}{token}:{len(parts)}\u27e7"
        parts[placeholder] = value.part()
        return placeholder

    out = {}
    for name, value in variables.items():
        if isinstance(value, Media):
            value = mark(value)
        elif isinstance(value, (list, tuple)) and any(isinstance(x, Media) for x in value):
            value = [mark(x) if isinstance(x, Media) else x for x in value]
        out[name] = value
    return out, parts


def split(text: str, parts: dict[str, dict]) -> str | list[dict]:
    """``text`` cut at the placeholders of ``parts`` into content parts (text parts around them, in
    order, empty ones dropped); ``text`` itself when it holds none.

    Raises:
        TemplateError: the text holds a placeholder the template changed (a filter applied to a
            media variable), whose medium would otherwise be dropped silently.
    """
    token = next(iter(parts))[len(_MARK) :].split(":")[0] if parts else ""
    if _MARK not in text:
        _check_unchanged(text, token)
        return text
    pattern = "(" + "|".join(re.escape(p) for p in parts) + ")"
    out: list[dict] = []
    for piece in re.split(pattern, text):
        if piece in parts:
            out.append(parts[piece])
        elif piece:
            _check_unchanged(piece, token)
            out.append({"type": "text", "text": piece})
    return out


def _check_unchanged(text: str, token: str) -> None:
    """Refuse a placeholder a template changed (``{{ photo | upper }}``, ``{{ photo | title }}``): its medium
    would be lost. Found by the render's random bits in any case; text that merely looks like a placeholder
    (a user's forgery, without those bits) stays text. A slice that cuts the bits off is not noticed.

    Raises:
        TemplateError: naming the likely cause.
    """
    if token and token in text.lower():
        from .errors import TemplateError

        raise TemplateError(
            "the template changed an image, audio or file variable (a filter or slice applied to it?); "
            "place it alone, as {{ name }}, so it can be sent"
        )


# -- what needs a capability, what the call log keeps --------------------------------------------------

_KINDS: dict[Any, str] = {"image_url": "images", "input_audio": "audio", "file": "files"}


def kinds_in(messages: Iterable[Any]) -> set[str]:
    """The media kinds (``images``, ``audio``, ``files``: :class:`~tinyllm.Capabilities` names) the messages' content parts hold."""
    found: set[str] = set()
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                kind = _KINDS.get(part.get("type")) if isinstance(part, dict) else None
                if kind:
                    found.add(kind)
    return found


def _digest(data: str) -> str:
    raw = _data_url_bytes(data) if data.startswith("data:") else base64.b64decode(data, validate=False)
    return f"sha256:{hashlib.sha256(raw).hexdigest()}, {len(raw)} bytes"


def redacted(messages: Any) -> Any:
    """``messages`` with each inline medium (a data URL or base64 audio) replaced by ``"sha256:<hex>, <n> bytes"``;
    URLs and text kept. The messages themselves when none has content parts (no copy)."""
    if not isinstance(messages, list) or not any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages
    ):
        return messages
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for part in content:
            part = dict(part) if isinstance(part, dict) else part
            try:
                if (
                    isinstance(part, dict)
                    and isinstance(part.get("image_url"), dict)
                    and str(part["image_url"].get("url", "")).startswith("data:")
                ):
                    part["image_url"] = {**part["image_url"], "url": _digest(part["image_url"]["url"])}
                elif isinstance(part, dict) and isinstance(part.get("input_audio"), dict):
                    part["input_audio"] = {
                        **part["input_audio"],
                        "data": _digest(str(part["input_audio"].get("data", ""))),
                    }
                elif isinstance(part, dict) and isinstance(part.get("file"), dict) and part["file"].get("file_data"):
                    part["file"] = {**part["file"], "file_data": _digest(str(part["file"]["file_data"]))}
            except (MediaError, ValueError, binascii.Error):
                part = {"type": part.get("type"), "unreadable": True}
            parts.append(part)
        out.append({**m, "content": parts})
    return out
