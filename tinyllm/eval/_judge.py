"""The judge of ``llm-rubric``: a template shipped in the package, sent to the judge's client and model.

The judge's client and model are settings: ``JUDGE_API_TYPE`` (a registered client name; default:
the usual client) and ``JUDGE_MODEL`` (default: the MODEL setting); at least one of them must be
set (or ``evaluate(judge=..., judge_model=...)`` given) before a run with an ``llm-rubric`` starts.
The judge's reply is typed by the template's ``output_schema``: ``{"reason": str, "pass": bool,
"score": number in [0, 1]}``. A reply that does not fit raises OutputParseError: the cell is an
error, never a pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputParseError

__all__ = ["JUDGE_TEMPLATE", "TEMPLATES", "Judge", "judge_for"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
JUDGE_TEMPLATE = "judge.system.md"


class Judge:
    """Grades an output against a rubric: ``judge(rubric, output, vars) -> {"pass", "score", "reason"}``.

    Args:
        client: a registered client name (``api_type``) or a :class:`~tinyllm.Client` object; None: the default.
        model: the model asked for; None: the MODEL setting.
    """

    def __init__(self, client: Any = None, model: str | None = None) -> None:
        from ..call import LLMCall

        kind: dict[str, Any] = (
            {"client": client} if client is not None and not isinstance(client, str) else {"api_type": client}
        )
        params: dict[str, Any] = {"model": model} if model else {}
        self.label = f"{client if isinstance(client, str) else getattr(client, 'api_type', 'client')}/{model or '(default model)'}"
        self.call = LLMCall(JUDGE_TEMPLATE, prompts_dir=[str(TEMPLATES)], **kind, **params)

    def __repr__(self) -> str:
        return f"Judge({self.label!r})"

    def __call__(self, rubric: str, output: str, variables: dict) -> dict[str, Any]:
        """The verdict ``{"pass": bool, "score": float in [0, 1], "reason": str}``.

        Raises:
            OutputParseError: the judge's reply is not such a verdict.
            APIError and the other errors of :meth:`LLMCall.call <tinyllm.LLMCall.call>`.
        """
        try:
            verdict = self.call.call(rubric=rubric, output=output, vars=variables)
        except OutputParseError as exc:
            raise OutputParseError(f"the judge's reply cannot be read as a verdict: {exc}", raw=exc.raw) from exc
        if (
            not isinstance(verdict, dict)
            or not isinstance(verdict.get("pass"), bool)
            or isinstance(verdict.get("score"), bool)
            or not isinstance(verdict.get("score"), (int, float))
            or not 0 <= verdict["score"] <= 1
        ):
            raise OutputParseError(f"the judge's reply is not a verdict {{pass, score in [0, 1], reason}}: {verdict!r}")
        return {"pass": verdict["pass"], "score": float(verdict["score"]), "reason": str(verdict.get("reason", ""))}


def judge_for(client: Any = None, model: str | None = None) -> Judge:
    """The judge of a run: ``client``/``model`` when given, else the JUDGE_API_TYPE / JUDGE_MODEL settings.

    Raises:
        ConfigError: no judge configured (refused before anything is sent), or an unknown client name.
    """
    from ..clients import get_client
    from ..config import get_config

    cfg = get_config()
    client = client if client is not None else cfg.judge_api_type
    model = model if model is not None else cfg.judge_model
    if client is None and model is None:
        raise ConfigError(
            "an llm-rubric assertion needs a judge: set JUDGE_MODEL (and JUDGE_API_TYPE for another "
            "client), e.g. TINYLLM_JUDGE_MODEL=gpt-4o, or pass judge=/judge_model= to evaluate(); nothing was sent"
        )
    if isinstance(client, str):
        get_client(client)  # ConfigError now for an unknown or unconfigured client
    return Judge(client, model)
