"""Prompt.with_texts (an edited prompt, nothing saved), LLMCall(Prompt), Registry.api_types: the
public pieces the workbench page (tinyllm ui) is built on."""

from __future__ import annotations

import pickle

import pytest
from helpers import wire, write

import tinyllm
from tinyllm.prompts import load_prompt


@pytest.fixture
def folder(tmp_path):
    write(tmp_path / "p" / "greet.system.md", "---\ntemperature: 0\n---\nYou are friendly.\n")
    write(tmp_path / "p" / "greet.user.md", "Say hello to {{ name }}.\n")
    write(tmp_path / "p" / "solo.system.md", "Only a system file about {{ topic }}.\n")
    return tmp_path / "p"


def test_with_texts_renders_the_edit_and_leaves_the_files_and_prompt_alone(folder):
    prompt = load_prompt("greet", prompts_dir=folder)
    edited = prompt.with_texts("---\ntemperature: 0.5\n---\nYou are terse.\n", "Greet {{ name }} in {{ lang }}.")
    assert edited.render({"name": "Ada", "lang": "Latin"}) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Greet Ada in Latin."},
    ]
    assert edited.variables == {"name", "lang"} and edited.params == {"temperature": 0.5}
    assert edited.system_path == prompt.system_path and edited.user_path == prompt.user_path
    assert prompt.render({"name": "Ada"})[0]["content"] == "You are friendly." and prompt.variables == {"name"}
    assert (folder / "greet.user.md").read_text() == "Say hello to {{ name }}.\n"
    assert edited.with_texts("Just a system.", None).user_path is None


def test_with_texts_gives_a_prompt_without_a_user_file_its_sibling(folder):
    prompt = load_prompt("solo", prompts_dir=folder)
    assert prompt.user_path is None
    edited = prompt.with_texts("System.", "User {{ x }}.")
    assert edited.user_path == folder / "solo.user.md" and not edited.user_path.exists()
    assert edited.render({"x": 1})[-1] == {"role": "user", "content": "User 1."}


def test_with_texts_raises_for_an_edit_that_does_not_parse(folder):
    prompt = load_prompt("greet", prompts_dir=folder)
    with pytest.raises(tinyllm.TemplateError, match="Jinja syntax error"):
        prompt.with_texts("{% for %}", None)
    with pytest.raises(tinyllm.TemplateError, match="front matter"):
        prompt.with_texts("---\n[unclosed\n---\nx", None)


def test_llmcall_takes_a_prompt_object_and_sends_its_texts(folder, server, monkeypatch):
    wire(server, monkeypatch, "sk-test-edits-0123456789")
    edited = load_prompt("greet", prompts_dir=folder).with_texts("Be brief.", "Hi {{ name }}!")
    call = tinyllm.LLMCall(edited)
    assert call.call(name="Bo") == "echo: Hi Bo!"
    assert server.chat_requests()[-1].json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi Bo!"},
    ]
    assert call.respond(name="Bo").template == "greet"
    again = pickle.loads(pickle.dumps(call))  # the edited texts travel with it
    assert again.render(name="Cy")[1]["content"] == "Hi Cy!"


def test_registry_lists_its_api_types():
    from tinyllm.clients import default_registry

    assert {"openai", "azure", "ollama", "llamacpp"} <= set(default_registry.api_types())
    tinyllm.register_client("mine", tinyllm.OpenAIClient(base_url="http://127.0.0.1:9/v1", api_key="x-test"))
    assert "mine" in default_registry.api_types()
