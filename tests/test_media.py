"""Images, audio and files as template variables: content parts where the template places them, data URLs
with the detected type, token counts by OpenAI's tile rule, the cache key, capabilities, the call log and the
command line. Real files, the loopback server (which checks the content parts it receives as the API would)."""

from __future__ import annotations

import base64
import io
import json
import struct
import wave
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import write

import tinyllm
from tinyllm import (
    Audio,
    BadRequestError,
    File,
    Image,
    LLMCall,
    LLMChat,
    MediaError,
    OpenAIClient,
    configure,
)
from tinyllm.cache import MemoryCache
from tinyllm.cli import cli
from tinyllm.clients.llamacpp import LlamaCppClient
from tinyllm.media import image_tokens, redacted
from tinyllm.observe import _calllog as calllog
from tinyllm.prompts import load_prompt
from tinyllm.tokens import count_tokens


def png(width: int, height: int, shade: int = 0) -> bytes:
    """A real grayscale PNG of ``width`` x ``height`` pixels (PNG spec: signature, IHDR, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([shade]) * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)
    return buf.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cat.png").write_bytes(png(1024, 1024))
    (tmp_path / "dog.png").write_bytes(png(20, 10, shade=200))
    (tmp_path / "hello.wav").write_bytes(wav())
    (tmp_path / "doc.pdf").write_bytes(PDF)
    (tmp_path / "notes.txt").write_text("just text")
    return tmp_path


@pytest.fixture
def wired(server, tmp_path):
    configure(api_type="openai", base_url=server.base_url, waiting_time=0, model="gpt-4o", cache_api_calls=False)
    write(tmp_path / "prompts" / "look.system.md", "You describe pictures.")
    write(tmp_path / "prompts" / "look.user.md", "Describe this:\n{{ photo }}\nBe brief, {{ name }}.")
    return server


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# --- rendering -----------------------------------------------------------------------------------------------


def test_media_becomes_content_parts_in_order(wired, files):
    messages = LLMCall("look").render(photo=Image(files / "cat.png"), name="Ann")
    assert messages[0] == {"role": "system", "content": "You describe pictures."}  # no media: a plain string
    assert messages[1]["content"] == [
        {"type": "text", "text": "Describe this:\n"},
        {"type": "image_url", "image_url": {"url": data_url(png(1024, 1024)), "detail": "auto"}},
        {"type": "text", "text": "\nBe brief, Ann."},
    ]


def test_plain_prompts_render_as_before(wired):
    assert LLMCall("look").render(photo="a cat", name="Ann")[1] == {
        "role": "user",
        "content": "Describe this:\na cat\nBe brief, Ann.",
    }


def test_several_per_message_lists_and_front_matter_messages(tmp_path, files):
    write(
        tmp_path / "prompts" / "two.system.md",
        "---\nmessages:\n  - user: 'Example: {{ example }}'\n  - assistant: 'A grey square.'\n---\nCompare.",
    )
    write(tmp_path / "prompts" / "two.user.md", "First {{ a }} then {{ b }}.{% for p in more %} [{{ p }}]{% endfor %}")
    cat, dog = Image(files / "cat.png", detail="low"), Image("https://example.com/dog.png", detail="high")
    messages = load_prompt("two").render({"example": Image(files / "dog.png"), "a": cat, "b": dog, "more": [dog, cat]})
    assert (
        messages[1]["content"][0] == {"type": "text", "text": "Example: "}
        and messages[1]["content"][1]["type"] == "image_url"
    )
    assert messages[2] == {"role": "assistant", "content": "A grey square."}
    kinds = [p["type"] if p["type"] != "text" else p["text"] for p in messages[3]["content"]]
    assert kinds == ["First ", "image_url", " then ", "image_url", ". [", "image_url", "] [", "image_url", "]"]
    assert messages[3]["content"][3]["image_url"] == {"url": "https://example.com/dog.png", "detail": "high"}
    assert messages[3]["content"][1]["image_url"]["detail"] == "low"


def test_a_forged_placeholder_stays_text(wired, files):
    forged = "\u27e6tinyllm-media:00000000000000000000000000000000:0\u27e7"
    messages = LLMCall("look").render(photo=Image(files / "dog.png"), name=forged)
    texts = [p["text"] for p in messages[1]["content"] if p["type"] == "text"]
    assert texts[-1] == f"\nBe brief, {forged}." and sum(p["type"] == "image_url" for p in messages[1]["content"]) == 1


def test_a_changed_placeholder_is_refused(tmp_path, files):
    for body in ("{{ photo | upper }}", "{{ photo | replace('-', '_') }}", "{{ photo | title }}"):
        write(tmp_path / "prompts" / "bad.system.md", f"Look: {body}")
        with pytest.raises(tinyllm.TemplateError, match="changed an image"):
            load_prompt("bad").render({"photo": Image(files / "dog.png")})


def test_audio_and_file_parts(files):
    audio, doc = Audio(files / "hello.wav"), File(files / "doc.pdf")
    assert audio.part() == {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav()).decode(), "format": "wav"},
    }
    assert doc.part() == {
        "type": "file",
        "file": {"filename": "doc.pdf", "file_data": data_url(PDF, "application/pdf")},
    }
    assert File(PDF).part()["file"]["filename"] == "document.pdf"
    assert Audio(b"ID3\x03\x00" + bytes(20)).part()["input_audio"]["format"] == "mp3"


def test_unknown_types_and_unreadable_files_are_refused(files):
    with pytest.raises(MediaError, match="unknown type.*image/png"):
        Image(files / "notes.txt")
    with pytest.raises(MediaError, match="application/pdf content; the API takes image/png"):
        Image(files / "doc.pdf")
    with pytest.raises(MediaError, match="cannot read the image file"):
        Image(files / "missing.png")
    with pytest.raises(MediaError, match="detail"):
        Image(files / "cat.png", detail="max")
    with pytest.raises(MediaError, match="audio/wav, audio/mpeg"):
        Audio(files / "cat.png")
    with pytest.raises(MediaError, match="application/pdf"):
        File(files / "hello.wav")
    with pytest.raises(MediaError, match="no audio URLs"):
        Audio("https://example.com/a.wav")
    with pytest.raises(MediaError, match="must be a file path or bytes, not int"):
        File(42)
    assert isinstance(MediaError("x"), ValueError) and issubclass(MediaError, tinyllm.TinyLLMError)


def test_repr_shows_hash_and_size_not_bytes(files):
    image = Image(files / "dog.png")
    assert image.width == 20 and image.height == 10 and image.size == len(png(20, 10, 200))
    assert image.sha256 in repr(image) and "base64" not in repr(image) and "cat.png" not in repr(image)
    assert Image(data_url(png(20, 10, 200))) == image


# --- tokens --------------------------------------------------------------------------------------------------


def test_image_tokens_follow_openais_rule():
    # the examples of https://platform.openai.com/docs/guides/images-vision ("Calculating costs")
    assert image_tokens(1024, 1024) == 765
    assert image_tokens(2048, 4096) == 1105
    assert image_tokens(4096, 8192, "low") == 85
    assert image_tokens(100, 100) == 255  # small images are not scaled up: one tile


def test_count_tokens_includes_images(wired, files):
    call = LLMCall("look")
    with_image = call.render(photo=Image(files / "cat.png"), name="Ann")
    low = call.render(photo=Image(files / "cat.png", detail="low"), name="Ann")
    text_only = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else [p for p in m["content"] if p["type"] == "text"],
        }
        for m in with_image
    ]
    assert count_tokens(with_image, "gpt-4o") == count_tokens(text_only, "gpt-4o") + 765
    assert count_tokens(low, "gpt-4o") == count_tokens(text_only, "gpt-4o") + 85
    assert Image(files / "cat.png").tokens() == 765


# --- over the loopback server --------------------------------------------------------------------------------


def test_the_server_receives_the_parts(wired, files):
    answer = LLMCall("look").call(photo=Image(files / "cat.png"), name="Ann")
    assert answer == "echo: Describe this:\n\nBe brief, Ann."  # the server checked every part (else 400)
    sent = wired.chat_requests()[0].json["messages"][1]["content"]
    assert sent[1]["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")


def test_audio_and_files_reach_the_server(wired, files, tmp_path):
    write(tmp_path / "prompts" / "hear.system.md", "Listen: {{ clip }} Read: {{ doc }}")
    assert LLMCall("hear").call(clip=Audio(files / "hello.wav"), doc=File(files / "doc.pdf"))
    kinds = [p["type"] for p in wired.chat_requests()[0].json["messages"][0]["content"]]
    assert kinds == ["text", "input_audio", "text", "file"]


def test_the_server_refuses_a_bad_part(wired):
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PDF)}}]}]
    with pytest.raises(BadRequestError, match="the bytes are not image/png"):
        tinyllm.get_client().request(bad)


def test_the_cache_key_covers_the_bytes(wired, files):
    call = LLMCall("look", client=OpenAIClient(base_url=wired.base_url, cache=MemoryCache()))
    (files / "a.png").write_bytes(png(8, 8, 1))
    first = call.respond(photo=Image(files / "a.png"), name="x")
    (files / "a.png").write_bytes(png(8, 8, 2))  # same name, other bytes
    second = call.respond(photo=Image(files / "a.png"), name="x")
    again = call.respond(photo=Image(files / "a.png"), name="x")
    assert not first.cached and not second.cached and again.cached
    assert len(wired.chat_requests()) == 2


def test_the_call_log_keeps_hash_and_size(wired, files, tmp_path):
    db = tmp_path / "calls.db"
    configure(log_calls=True, log_db=db)
    LLMCall("look").call(photo=Image(files / "cat.png"), name="Ann")
    assert calllog.flush_all(30)
    conn = calllog.connect(str(db))
    try:
        row = calllog.query(conn, limit=10)[0]
    finally:
        conn.close()
    dumped = json.dumps(row)
    image = Image(files / "cat.png")
    assert base64.b64encode(png(1024, 1024)).decode()[:40] not in dumped
    assert f"sha256:{image.sha256}, {image.size} bytes" in json.dumps(row["messages"])
    assert image.sha256 in json.dumps(row["variables"])


def test_chat_with_an_image(wired, files):
    write(Path("prompts") / "pic.system.md", "Look.")
    write(Path("prompts") / "pic.user.md", "What is {{ photo }}?")
    chat = LLMChat("pic")
    assert chat.say(photo=Image(files / "dog.png")).startswith("echo: What is ")
    assert chat.history[1]["content"][1]["type"] == "image_url"


# --- capabilities --------------------------------------------------------------------------------------------


def test_the_embedded_model_refuses_images_before_sending(files):
    client = LlamaCppClient()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, Image(files / "dog.png").part()]}]
    with pytest.raises(MediaError, match="takes no images.*vision model"):
        client.request(messages)
    with pytest.raises(MediaError, match="takes no audio or files"):
        client.request([{"role": "user", "content": [Audio(files / "hello.wav").part(), File(PDF).part()]}])
    assert not LlamaCppClient.capabilities.images and OpenAIClient.capabilities.images


def test_a_plain_client_declares_its_capabilities(wired, files):
    class TextOnly:
        capabilities = tinyllm.Capabilities(images=False)

        def __init__(self):
            self.sent = []

        def send_message(self, messages, **params):
            self.sent.append(messages)
            return {"role": "assistant", "content": "ok"}

    target = TextOnly()
    with pytest.raises(MediaError, match="'plain' client takes no images"):
        LLMCall("look", client=target).call(photo=Image(files / "dog.png"), name="x")
    assert target.sent == [] and wired.requests == []


# --- the command line ----------------------------------------------------------------------------------------


def test_call_and_render_take_media_from_the_shell(wired, files, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["call", "look", "--image", f"photo={files / 'dog.png'}", "--var", "name=Bo", "--no-stream"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "echo: Describe this:\n\nBe brief, Bo."
    assert wired.chat_requests()[0].json["messages"][1]["content"][1]["type"] == "image_url"
    shown = runner.invoke(cli, ["render", "look", "--image", f"photo={files / 'dog.png'}", "--var", "name=Bo"])
    image = Image(files / "dog.png")
    assert f"[image_url: sha256:{image.sha256}, {image.size} bytes]" in shown.stdout
    as_json = runner.invoke(
        cli, ["call", "look", "--image", f"photo={files / 'dog.png'}", "--var", "name=Bo", "--json"]
    )
    assert as_json.exit_code == 0 and "base64" not in as_json.stdout and image.sha256 in as_json.stdout
    bad = runner.invoke(cli, ["call", "look", "--image", f"photo={files / 'notes.txt'}", "--var", "name=Bo"])
    assert bad.exit_code == 2 and "unknown type" in bad.stderr


def test_redacted_keeps_urls_and_text():
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
        }
    ]
    assert redacted(messages) == messages
    plain = [{"role": "user", "content": "hi"}]
    assert redacted(plain) is plain


def test_as_dict_is_json_ready(wired, files):
    r = LLMCall("look").respond(photo=Image(files / "dog.png"), name="Ann")
    data = json.loads(json.dumps(r.as_dict()))
    assert data["variables"]["photo"] == repr(Image(files / "dog.png")) and data["variables"]["name"] == "Ann"
