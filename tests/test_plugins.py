"""Plugins: the ``tinyllm.plugins`` entry-point group, read by importlib.metadata from real distributions.

The quick tests put a hand-written distribution (``*.dist-info`` with ``entry_points.txt``) on
``sys.path``, which is what an installer leaves behind; the slow test builds a plugin package and
installs it with pip, then uses its client by ``API_TYPE`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from helpers import ROOT, child_env, write

import tinyllm
from tinyllm.clients import _plugins

ECHO_MODULE = '''
import tinyllm


class EchoClient(tinyllm.Client):
    """Answers with the last user message, reversed."""

    api_type = "{name}"
    capabilities = tinyllm.Capabilities(json_schema=False, tools=True)

    def endpoint(self, cfg, model):
        return {{"plugin": "{name}"}}

    def _chat(self, messages, params, cfg):
        text = messages[-1]["content"][::-1]
        return ({{"role": "assistant", "content": text}},
                {{"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
                {{"model": "echo-1", "finish_reason": "stop"}})


tinyllm.register_client("{name}", EchoClient)


@tinyllm.tool
def {name}_shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()
'''

BROKEN_MODULE = "raise RuntimeError('this plugin is broken on purpose')\n"


def _distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """What an installer writes for a distribution: its modules and ``DIST-1.0.dist-info``."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    write(info / "entry_points.txt", f"[tinyllm.plugins]\n{lines}")
    for name, text in modules.items():
        write(site / f"{name}.py", text)
    return site


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A site folder holding a working plugin (``echoq``: a client and a tool) and a broken one, on sys.path."""
    site = _distribution(
        tmp_path / "site",
        "tinyllm-echoq",
        {"echoq": "tinyllm_echoq", "zz_broken": "tinyllm_brokenq"},
        {"tinyllm_echoq": ECHO_MODULE.format(name="echoq"), "tinyllm_brokenq": BROKEN_MODULE},
    )
    monkeypatch.syspath_prepend(str(site))
    _plugins._reset_for_tests()
    yield site
    _plugins._reset_for_tests()
    for name in ("tinyllm_echoq", "tinyllm_brokenq"):
        sys.modules.pop(name, None)
    tinyllm.tools.registry.unregister("echoq_shout")


def test_an_unknown_api_type_loads_the_plugins_and_a_broken_one_is_named(plugin_site):
    assert "tinyllm_echoq" not in sys.modules  # nothing imported before first use
    with pytest.warns(tinyllm.PluginWarning, match="zz_broken.*tinyllm_brokenq.*broken on purpose"):
        found = tinyllm.get_client("echoq")
    assert type(found).__name__ == "EchoClient" and "tinyllm_echoq" in sys.modules
    assert found.send_message([{"role": "user", "content": "abc"}]) == {"role": "assistant", "content": "cba"}
    records = {p.name: p for p in tinyllm.load_plugins()}
    assert (
        records["echoq"].loaded and records["echoq"].clients == ["echoq"] and records["echoq"].tools == ["echoq_shout"]
    )
    assert records["echoq"].distribution == "tinyllm-echoq" and records["echoq"].version == "1.0"
    assert (
        not records["zz_broken"].loaded
        and "RuntimeError: this plugin is broken on purpose" in records["zz_broken"].error
    )


def test_api_type_setting_and_a_front_matter_tool_from_a_plugin(plugin_site, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_API_TYPE", "echoq")
    write(tmp_path / "prompts" / "rev.system.md", "---\ntools: [echoq_shout]\n---\nBe brief.")
    write(tmp_path / "prompts" / "rev.user.md", "{{ text }}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tinyllm.PluginWarning)
        response = tinyllm.LLMCall("rev.system.md").respond(text="olleh")
    assert response.value == "hello" and response.model == "echo-1" and response.api_type == "echoq"


def test_a_registry_reset_keeps_plugin_clients_available(plugin_site):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tinyllm.PluginWarning)
        first = tinyllm.get_client("echoq")
    tinyllm.clients.default_registry.reset()  # the plugin module is not imported again, yet its client comes back
    again = tinyllm.get_client("echoq")
    assert type(again) is type(first) and again is not first


def test_an_unknown_api_type_still_fails_clearly_after_loading_plugins(plugin_site):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tinyllm.PluginWarning)
        with pytest.raises(tinyllm.ConfigError, match="unknown api_type 'nosuch'.*plugin"):
            tinyllm.get_client("nosuch")


def test_register_client_takes_a_client_class_and_refuses_other_classes():
    from tinyllm.clients.openai import OpenAIClient

    tinyllm.register_client("mine", OpenAIClient)
    assert type(tinyllm.get_client("mine")) is OpenAIClient
    with pytest.raises(tinyllm.ConfigError, match="Client subclass"):
        tinyllm.register_client("bad", dict)


def test_the_plugins_command_lists_them(plugin_site):
    from click.testing import CliRunner

    from tinyllm.cli import cli

    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 1  # one failed
    listed = {p["name"]: p for p in json.loads(result.output)}
    assert listed["echoq"]["clients"] == ["echoq"] and listed["zz_broken"]["error"].startswith("RuntimeError")
    text = CliRunner().invoke(cli, ["plugins"]).output
    assert "echoq\ttinyllm-echoq 1.0\ttinyllm_echoq\tclient echoq, tool echoq_shout" in text and "FAILED" in text


def test_import_tinyllm_reads_no_entry_points(plugin_site):
    code = "import sys, tinyllm; print('tinyllm_echoq' in sys.modules, 'tinyllm.clients._plugins' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(PYTHONPATH=f"{plugin_site}:{ROOT}"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["False", "False"]


PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyllm-echopip"
version = "0.3"

[project.entry-points."tinyllm.plugins"]
echopip = "tinyllm_echopip"
broken = "tinyllm_echopip_broken"

[tool.setuptools]
py-modules = ["tinyllm_echopip", "tinyllm_echopip_broken"]
"""


@pytest.mark.slow
def test_a_plugin_installed_by_pip_answers_by_api_type(tmp_path):
    source = tmp_path / "plugin"
    write(source / "pyproject.toml", PYPROJECT)
    write(source / "tinyllm_echopip.py", ECHO_MODULE.format(name="echopip"))
    write(source / "tinyllm_echopip_broken.py", BROKEN_MODULE)
    env_dir = tmp_path / "env"  # a throwaway environment: pip installs the built wheel there
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(env_dir),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    assert (env_dir / "tinyllm_echopip-0.3.dist-info" / "entry_points.txt").exists()
    env = child_env(PYTHONPATH=f"{env_dir}:{ROOT}", TINYLLM_API_TYPE="echopip")
    code = textwrap.dedent("""
        import sys, tinyllm
        assert "tinyllm_echopip" not in sys.modules
        print(tinyllm.get_client().send_message([{"role": "user", "content": "!nigulp"}])["content"])
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "plugin!"
    assert "PluginWarning" in done.stderr and "'broken' (tinyllm_echopip_broken) failed to load" in done.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "tinyllm", "plugins", "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert plugins["echopip"]["distribution"] == "tinyllm-echopip" and plugins["echopip"]["version"] == "0.3"
    assert listed.returncode == 1 and plugins["broken"]["loaded"] is False
