"""tinyllm's pytest plugin: the ``tinyllm_eval`` fixture, to keep prompt evaluations in a test suite.

pytest loads it wherever tinyllm is installed (the ``pytest11`` entry point ``tinyllm``); importing
it imports nothing else of tinyllm (the fixture does, when a test uses it). ``-p no:tinyllm`` turns
it off.

::

    def test_classify_prompt(tinyllm_eval):
        report = tinyllm_eval("classify", threshold=0.9)   # AssertionError below 90 %
        assert report.info.cells == 12

Command-line options (for every ``tinyllm_eval`` of the run, e.g. to run the same prompt tests on
another model in CI):

- ``--tinyllm-model MODEL`` (repeatable): run the cells on these models of the default client
  instead of the ``models=``/``clients=`` the tests give;
- ``--tinyllm-client NAME[=MODEL]`` (repeatable): the same with these clients;
- ``--tinyllm-store``: keep the runs in the runs database (LOG_DB) for ``tinyllm eval --list``
  and ``--compare`` (default: each run in a temporary database).
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("tinyllm", "tinyllm prompt evaluations (the tinyllm_eval fixture)")
    group.addoption(
        "--tinyllm-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="Run every tinyllm_eval on this model of the default client (repeatable) instead of "
        "the models and clients the tests name.",
    )
    group.addoption(
        "--tinyllm-client",
        action="append",
        default=[],
        metavar="NAME[=MODEL]",
        help="Run every tinyllm_eval on this client (repeatable) instead of the models and clients the tests name.",
    )
    group.addoption(
        "--tinyllm-store",
        action="store_true",
        default=False,
        help="Keep tinyllm_eval runs in the runs database (LOG_DB) for `tinyllm eval --list`.",
    )


@pytest.fixture
def tinyllm_eval(request: Any) -> Any:
    """``tinyllm_eval(call_or_name, *, threshold=None, **kwargs) -> EvalReport``: :func:`tinyllm.eval.check`
    with the run's ``--tinyllm-model`` / ``--tinyllm-client`` / ``--tinyllm-store`` options applied.

    Args (of the function): as :func:`tinyllm.eval.check`: ``threshold`` (a pass rate in [0, 1] each
    prompt version x model needs; default: every cell passes) and the arguments of
    :func:`tinyllm.eval.evaluate` (``cases``, ``models``, ``clients``, ``repeat``, ``revs``, ``prompts_dir``, ...).

    Raises (from the function): AssertionError (with the table and the failing cases) when the run does
    not pass; the errors of :func:`tinyllm.eval.evaluate`.
    """
    from ._pytest import check

    models = request.config.getoption("tinyllm_model")
    clients = request.config.getoption("tinyllm_client")
    store = request.config.getoption("tinyllm_store")

    def run(call_or_name: Any, *, threshold: float | None = None, **kwargs: Any) -> Any:
        if models or clients:
            kwargs["models"], kwargs["clients"] = list(models) or None, list(clients) or None
        kwargs.setdefault("store", store)
        return check(call_or_name, threshold=threshold, **kwargs)

    return run
