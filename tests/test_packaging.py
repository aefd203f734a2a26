"""Packaging: the wheel holds what pyproject.toml promises (config.ini, py.typed, the encodings)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tinyllm import config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_INI = ROOT / "tinyllm" / "config.ini"


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 77 (the dev extra) is installed: it builds wheels without the ``wheel`` package and
    takes ``project.license`` as an SPDX string (the build-system's requirement)."""
    try:
        from importlib.metadata import version

        return tuple(int(x) for x in version("setuptools").split(".")[:2]) >= (77, 0)
    except Exception:
        return False


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_wheel_holds_config_ini_py_typed_and_encodings_and_builds_without_warnings(tmp_path):
    # Build from a copy, so the build's egg-info and build/ directories stay out of the worktree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "tinyllm", src / "tinyllm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    if _setuptools_builds_wheels():  # the PEP 517 backend pip would call, in this environment: offline, ~1 s
        cmd = [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"]
    else:  # an isolated build (pip fetches setuptools): slower
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    result = subprocess.run(cmd, cwd=str(src), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # no Python warning (SetuptoolsDeprecationWarning for a license table, "Package ... is absent from the
    # `packages` configuration" for the encodings); setuptools' own "warning: byte-compiling is disabled"
    # log lines (PYTHONDONTWRITEBYTECODE in the environment) are not warnings about this project
    warnings = [
        line for line in (result.stdout + result.stderr).splitlines() if "Warning" in line or "would be ignored" in line
    ]
    assert not warnings, "\n".join(warnings)
    [wheel] = out.glob("tinyllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "tinyllm/config.ini",
        "tinyllm/py.typed",
        "tinyllm/encodings/cl100k_base.tiktoken",
        "tinyllm/encodings/o200k_base.tiktoken",
        "tinyllm/clients/openai.py",
        "tinyllm/cli/prompts.py",
        "tinyllm/limits/_queue.py",
        "tinyllm/observe/_calllog.py",
        "tinyllm-0.1.0.dist-info/licenses/LICENSE",
    } <= names
    assert not any(n.startswith(("tests/", "prompts/", "examples/", "bench/", "docs/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read("tinyllm-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("tinyllm/config.ini") == PACKAGE_INI.read_bytes()


def test_package_config_ini_sets_nothing_and_documents_every_key():
    assert PACKAGE_INI == Path(config._PACKAGE_INI)
    text = PACKAGE_INI.read_text(encoding="utf-8")
    assert "[OpenAI]" in text and config._read_ini(PACKAGE_INI) == {}
    documented = dict(re.findall(r"^# ([A-Z_]+) =[ ]?(.*)$", text, re.M))
    assert set(documented) == set(config.KEYS)
    for key, shown in documented.items():  # each line shows the built-in default
        parse, default = config.KEYS[key]
        assert parse(shown) == default if shown else default in (None, {}, []), key


def test_package_config_ini_layer_is_read(tmp_path, monkeypatch):
    ini = tmp_path / "package-config.ini"
    ini.write_text(
        PACKAGE_INI.read_text(encoding="utf-8").replace("# MODEL = gpt-4o-mini", "MODEL = from-package"),
        encoding="utf-8",
    )
    monkeypatch.setattr(config, "_PACKAGE_INI", str(ini))
    config.configure(file_check_interval=0)
    cfg = config.get_config()
    assert cfg.model == "from-package" and cfg.source("MODEL") == str(ini)
    (tmp_path / "config.ini").write_text("[OpenAI]\nMODEL = from-cwd\n", encoding="utf-8")  # ./config.ini wins
    assert config.get_config().model == "from-cwd"


@pytest.mark.parametrize("name", ["py.typed", "config.ini"])
def test_package_data_files_exist(name):
    assert (ROOT / "tinyllm" / name).is_file()


def test_import_tinyllm_loads_no_sdk_and_no_asyncio():
    """``import tinyllm`` stays light (bench/import_time.py): none of the SDKs, tokenizers or models, and
    neither asyncio, backoff (which imports asyncio), email nor the batch runner until they are used;
    ``tinyllm.Runner`` is still there, imported on first use."""
    code = (
        "import sys, tinyllm\n"
        "heavy = ('openai', 'httpx', 'tiktoken', 'llama_cpp', 'asyncio', 'backoff', 'email', 'concurrent')\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "assert not loaded and 'tinyllm.batch._runner' not in sys.modules, loaded\n"
        "assert tinyllm.Runner.__module__ == 'tinyllm.batch._runner'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
