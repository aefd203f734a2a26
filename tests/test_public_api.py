"""The public API: __all__ is exactly what the package exposes, and every public name is documented."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import tinyllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tinyllm.__file__)))

DESIGN_NAMES = {
    "LLMCall",
    "get_client",
    "client",
    "register_client",
    "force_api_type",
    "force_api_cache",
    "configure",
    "get_config",
    "count_tokens",
    "get_embedding",
    "usage_stats",
    "reset_usage_stats",
    "Client",
    "TinyLLMError",
    "ConfigError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateVariableError",
    "TemplateSecurityError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ContextWindowExceededError",
    "RateLimitError",
    "ServerError",
    "APIConnectionError",
    "APITimeoutError",
    "ResponseError",
    "OutputParseError",
    "QueueFullError",
}


def test_all_matches_public_names():
    public = {n for n, v in vars(tinyllm).items() if not n.startswith("_") and not inspect.ismodule(v)}
    public -= {"annotations"}  # from __future__
    public |= set(tinyllm._LAZY)  # client classes, imported on first use
    assert set(tinyllm.__all__) == public
    assert len(tinyllm.__all__) == len(set(tinyllm.__all__))


def test_design_contract_names_are_exported():
    assert DESIGN_NAMES <= set(tinyllm.__all__)


def test_client_is_a_deprecated_alias_of_get_client(monkeypatch):
    import pytest

    class Echo:
        def send_message(self, messages, **params):
            return {"role": "assistant", "content": messages[-1]["content"]}

    tinyllm.register_client("alias-test", Echo())
    with pytest.warns(DeprecationWarning, match=r"get_client\(\)"):
        old = tinyllm.client("alias-test")
    assert old is tinyllm.get_client("alias-test")


def test_every_public_name_has_a_docstring():
    missing = [n for n in tinyllm.__all__ if not (getattr(tinyllm, n).__doc__ or "").strip()]
    assert not missing


def test_error_tree():
    t = tinyllm
    assert issubclass(t.TemplateNotFoundError, LookupError) and issubclass(t.TemplateNotFoundError, t.TemplateError)
    for name in (
        "BadRequestError",
        "AuthenticationError",
        "PermissionDeniedError",
        "NotFoundError",
        "ContextWindowExceededError",
        "RateLimitError",
        "ServerError",
    ):
        assert issubclass(getattr(t, name), t.APIError)
    assert issubclass(t.APITimeoutError, t.APIConnectionError)
    # the shape of openai-python's tree where the names coincide
    assert issubclass(t.APIConnectionError, t.APIError) and not issubclass(t.APIConnectionError, t.APIStatusError)
    for name in (
        "BadRequestError",
        "AuthenticationError",
        "PermissionDeniedError",
        "NotFoundError",
        "ConflictError",
        "UnprocessableEntityError",
        "RateLimitError",
        "InternalServerError",
    ):
        assert issubclass(getattr(t, name), t.APIStatusError), name
    assert t.InternalServerError is t.ServerError and issubclass(t.ContextWindowExceededError, t.BadRequestError)
    for name in t.__all__:
        obj = getattr(t, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, t.TinyLLMError), name


def test_import_is_light():
    code = "import tinyllm, sys; print(','.join(m for m in ('openai', 'tiktoken', 'llama_cpp', 'anthropic') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    assert out == ""


def test_every_error_survives_pickling_with_its_attributes():
    """Errors travel back from Dask workers and process pools: each class comes back as itself, with
    its message and attributes, also those whose __init__ takes required keyword arguments."""
    import pickle

    from tinyllm import errors

    special = {
        "TemplateNotFoundError": lambda cls: cls("summarize", ["prompts", "/etc/prompts"]),
        "BudgetExceededError": lambda cls: cls(
            "over budget", limit=1.0, spent=0.75, in_flight=0.1, estimate=0.3, model="gpt-4o-mini"
        ),
        "ContextWindowExceededError": lambda cls: cls(
            "too long", prompt_tokens=9000, max_tokens=100, context_window=8192, status_code=400
        ),
        "TemplateVariableError": lambda cls: cls("missing", variable="text", template="a.md"),
    }
    classes = [
        getattr(errors, name)
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), errors.TinyLLMError)
    ]
    assert len(classes) > 20
    for cls in classes:
        made = special.get(cls.__name__, lambda c: c("it failed"))(cls)
        if isinstance(made, errors.APIError) and made.status_code is None:
            made.status_code, made.request_id = 503, "req-1"
        back = pickle.loads(pickle.dumps(made))
        assert type(back) is cls and str(back) == str(made) and back.args == made.args, cls.__name__
        assert back.__dict__ == made.__dict__, cls.__name__
