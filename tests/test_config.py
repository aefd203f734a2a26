"""Settings layers: defaults < package config.ini < ./config.ini < .env < environment < configure()."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tinyllm import ConfigError, configure, get_config


def write_ini(path: Path, **values: object) -> None:
    body = "\n".join(f"{k} = {v}" for k, v in values.items())
    path.write_text(f"[OpenAI]\n{body}\n", encoding="utf-8")


def test_defaults():
    cfg = get_config()
    assert cfg.max_attempts == 5 and cfg.source("MAX_ATTEMPTS") == "default"
    assert cfg.timeout == 60.0 and cfg.max_waiting_time == 60.0
    assert cfg.temperature is None  # unset: not sent
    assert cfg.cache_api_calls is False


def test_layers_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_FILE_CHECK_INTERVAL", "0")  # files looked at on every call
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=7, TIMEOUT=11, TEMPERATURE=0.5, MODEL="from-ini")
    cfg = get_config()
    assert (cfg.max_attempts, cfg.timeout, cfg.model) == (7, 11.0, "from-ini")
    assert cfg.source("MAX_ATTEMPTS") == str(tmp_path / "config.ini")

    (tmp_path / ".env").write_text("TINYLLM_TIMEOUT=22\nTINYLLM_MODEL=from-dotenv\n")
    cfg = get_config()
    assert (cfg.timeout, cfg.model, cfg.max_attempts) == (22.0, "from-dotenv", 7)
    assert cfg.source("TIMEOUT") == ".env"

    monkeypatch.setenv("TINYLLM_MODEL", "from-env")
    cfg = get_config()
    assert cfg.model == "from-env" and cfg.source("MODEL") == "environment"
    assert cfg.timeout == 22.0

    configure(model="from-configure", max_attempts=2)
    cfg = get_config()
    assert (cfg.model, cfg.max_attempts) == ("from-configure", 2)
    assert cfg.source("MODEL") == "configure()"
    configure(model=None)
    assert get_config().model == "from-env"


def test_read_at_call_time_not_import(tmp_path):
    configure(file_check_interval=0)
    assert get_config().max_attempts == 5
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=3)
    assert get_config().max_attempts == 3
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=4)
    future = time.time() + 5
    os.utime(tmp_path / "config.ini", (future, future))
    assert get_config().max_attempts == 4


@pytest.mark.parametrize(
    "key,value",
    [
        ("MAX_ATTEMPTS", "abc"),
        ("MAX_ATTEMPTS", "0"),
        ("TIMEOUT", "-1"),
        ("TIMEOUT", "0"),
        ("CACHE_API_CALLS", "maybe"),
        ("AZURE_DEPLOYMENTS", "nokey"),
    ],
)
def test_bad_value_names_key_and_source(monkeypatch, key, value):
    monkeypatch.setenv(f"TINYLLM_{key}", value)
    with pytest.raises(ConfigError) as err:
        get_config()
    assert key in str(err.value) and "environment" in str(err.value)


def test_bad_value_in_ini_names_file(tmp_path):
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS="abc")
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS.*config.ini"):
        get_config()


def test_configure_rejects_unknown_and_bad():
    with pytest.raises(ConfigError, match="unknown setting"):
        configure(max_atempts=3)
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS"):
        configure(max_attempts="x")
    assert get_config().max_attempts == 5  # nothing half-applied


def test_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="TIMEOUT.*must be > 0"):
        configure(timeout=0)
    configure(timeout=0.5)
    assert get_config().timeout == 0.5


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_attempts", [3]),
        ("cache_api_calls", []),
        ("temperature", {"a": 1}),
        ("model", b"gpt"),
        ("max_attempts", Path("3")),
        ("prompts_dirs", [3]),
        ("prompts_dirs", {"a": "b"}),
        ("azure_deployments", {"m": 1}),
    ],
)
def test_configure_rejects_values_of_the_wrong_type(key, value):
    with pytest.raises(ConfigError, match=key.upper()):
        configure(**{key: value})
    assert get_config().source(key) == "default"  # nothing applied


def test_configure_accepts_paths_and_dicts(tmp_path):
    configure(prompts_dirs=tmp_path / "p", local_model_path=tmp_path / "m.gguf", azure_deployments={"m": "d"})
    cfg = get_config()
    assert cfg.prompts_dirs == [str(tmp_path / "p")]
    assert cfg.local_model_path == str(tmp_path / "m.gguf") and cfg.azure_deployments == {"m": "d"}
    configure(prompts_dirs=("a", tmp_path / "b"))
    assert get_config().prompts_dirs == ["a", str(tmp_path / "b")]


def test_unreadable_dotenv_is_a_config_error(tmp_path):
    (tmp_path / ".env").write_bytes(b"TINYLLM_MODEL=caf\xe9\n")
    with pytest.raises(ConfigError, match=r"cannot read .*\.env"):
        get_config()
    (tmp_path / ".env").write_text("TINYLLM_MODEL=cafe\n", encoding="utf-8")
    future = time.time() + 5
    os.utime(tmp_path / ".env", (future, future))
    assert get_config().model == "cafe"


def test_snapshot_is_reused_until_dotenv_changes(tmp_path):
    configure(file_check_interval=0)
    (tmp_path / ".env").write_text("TINYLLM_MODEL=one\nOPENAI_API_KEY=sk-one\n", encoding="utf-8")
    cfg = get_config()
    assert get_config() is cfg and (cfg.model, cfg.secret("OPENAI_API_KEY")) == ("one", "sk-one")
    (tmp_path / ".env").write_text("TINYLLM_MODEL=two\nOPENAI_API_KEY=sk-two\n", encoding="utf-8")
    future = time.time() + 5
    os.utime(tmp_path / ".env", (future, future))
    cfg = get_config()  # settings and secrets come from the same reading of the file
    assert (cfg.model, cfg.secret("OPENAI_API_KEY")) == ("two", "sk-two")


def test_config_files_are_looked_at_most_every_file_check_interval(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_FILE_CHECK_INTERVAL", "30")
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=3)
    cfg = get_config()
    assert cfg.max_attempts == 3 and cfg.file_check_interval == 30.0
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=4)
    future = time.time() + 5
    os.utime(tmp_path / "config.ini", (future, future))
    assert get_config() is cfg  # the file is not looked at again within 30 s
    monkeypatch.setenv("TINYLLM_TIMEOUT", "9")  # the environment is compared on every call...
    cfg = get_config()
    assert (cfg.timeout, cfg.max_attempts) == (9.0, 4)  # ...and a rebuild reads the files again
    configure(max_attempts=2)  # so are configure() overrides
    assert get_config().max_attempts == 2


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_config_file_change_is_seen_once_the_interval_has_passed(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_FILE_CHECK_INTERVAL", "0.5")
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=3)
    assert get_config().max_attempts == 3
    write_ini(tmp_path / "config.ini", MAX_ATTEMPTS=4)
    future = time.time() + 5
    os.utime(tmp_path / "config.ini", (future, future))
    time.sleep(0.6)
    assert get_config().max_attempts == 4


@pytest.mark.parametrize("value", [-1, "nan"])
def test_file_check_interval_must_be_a_number_not_below_zero(value):
    with pytest.raises(ConfigError, match="FILE_CHECK_INTERVAL"):
        configure(file_check_interval=value)


def test_typed_and_structured_values(tmp_path):
    configure(cache_api_calls=True, temperature=0, azure_deployments="gpt-4o=dep-a, gpt-4o-mini=dep-b")
    cfg = get_config()
    assert cfg.cache_api_calls is True and cfg.temperature == 0.0
    assert cfg.azure_deployments == {"gpt-4o": "dep-a", "gpt-4o-mini": "dep-b"}
    configure(azure_deployments='{"m": "d"}', prompts_dirs=f"a{os.pathsep}b")
    assert get_config().azure_deployments == {"m": "d"}
    assert get_config().prompts_dirs == ["a", "b"]


def test_secrets_from_env_and_dotenv_are_masked(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-dotenv-secret-123456789\n")
    cfg = get_config()
    assert cfg.secret("OPENAI_API_KEY") == "sk-dotenv-secret-123456789"
    assert "sk-dotenv-secret" not in repr(cfg)
    assert "sk-dotenv-secret" not in str(cfg.as_dict())
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret-abcdefghijk")
    assert get_config().secret("OPENAI_API_KEY") == "sk-env-secret-abcdefghijk"  # environment beats .env
    # secrets never come from config.ini
    write_ini(tmp_path / "config.ini", OPENAI_API_KEY="sk-ini")
    assert get_config().secret("OPENAI_API_KEY") == "sk-env-secret-abcdefghijk"


def test_credentials_in_urls_are_masked(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://bob:hunter2@127.0.0.1:9/v1?key=qsecret")
    configure(base_url="https://al:pw2@host.example/v1")
    shown = repr(get_config()) + str(get_config().as_dict())
    assert "hunter2" not in shown and "qsecret" not in shown and "pw2" not in shown
    assert "127.0.0.1:9/v1" in shown and "host.example/v1" in shown
    assert get_config().secret("OPENAI_BASE_URL").startswith("http://bob:hunter2@")  # the value itself is intact


def test_config_is_a_frozen_typed_dataclass():
    import dataclasses

    cfg = get_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_attempts = 3  # type: ignore[misc]
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    assert types["timeout"] == "float" and types["max_tokens"] == "int | None"


def test_frequency_penalty_and_its_old_name(tmp_path):
    write_ini(tmp_path / "config.ini", FREQ_PENALTY=0.25)  # TinyTroupe's config.ini spells it so
    cfg = get_config()
    assert cfg.frequency_penalty == 0.25 and cfg["FREQ_PENALTY"] == 0.25
    assert cfg.source("FREQUENCY_PENALTY") == str(tmp_path / "config.ini")
    configure(frequency_penalty=0.5)
    assert get_config().frequency_penalty == 0.5
    configure(freq_penalty=0.75)
    assert get_config().frequency_penalty == 0.75


def test_replace_gives_a_client_its_own_settings():
    base = get_config()
    mine = base.replace({"timeout": 3, "MAX_ATTEMPTS": "2"})
    assert (mine.timeout, mine.max_attempts, mine.source("timeout")) == (3.0, 2, "client")
    assert (base.timeout, base.max_attempts) == (60.0, 5)  # the defaults are untouched
    with pytest.raises(ConfigError, match="TIMEOUT.*client"):
        base.replace({"timeout": -1})
    with pytest.raises(ConfigError, match="unknown setting"):
        base.replace({"timeot": 1})
