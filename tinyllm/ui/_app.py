"""The workbench's routes: thin handlers over the public API, pages rendered by Jinja.

Pages: ``/prompts`` (list, filter), ``/prompts/{name}`` (editor, variables, preview, Run,
Compare, Save), ``/evals`` (stored eval runs, one run, two compared), ``/logs`` (the call log,
``/logs/{id}`` one call). Fragments for htmx: ``POST /prompts/{name}/render|run|compare|save``;
``GET /runs/{id}/events``: a run's server-sent events (see :mod:`._runs`).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..clients import default_registry
from ..config import get_config
from ..errors import (
    ConfigError,
    PromptConflictError,
    PromptSaveError,
    TemplateError,
    TemplateNotFoundError,
    TinyLLMError,
)
from ..observe import _calllog as calllog
from . import _edit, _evals
from ._charts import bar_chart
from ._preview import count_cases, preview
from ._runs import MAX_COMPARE, Run, Runs, run_events
from ._security import Guard, allowed_hosts

__all__ = ["Workbench", "create_app"]

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50


def _usd(value: Any) -> str:
    if value is None:
        return "-"
    return f"${value:.6f}" if value < 0.01 else f"${value:.4f}"


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts is not None else "-"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(usd=_usd, when=_when, seconds=_seconds, pct=_pct)
    return env


class Workbench:
    """The server's state: the prompts directories, the call log file, pending runs, the templates.

    Args:
        prompts_dirs: directories searched first for templates (then PROMPTS_DIRS, ./prompts);
            saves go only into the search path's directories.
        log_db: the call log file (default: the LOG_DB setting, else the default place).
        eval_db: where eval runs are stored (default: the eval package's default, beside the call log).
    """

    def __init__(self, prompts_dirs: list[str], log_db: str | None = None, eval_db: str | None = None) -> None:
        self.dirs = [str(Path(d).expanduser().resolve()) for d in prompts_dirs]
        self.log_db = log_db
        self.eval_db = eval_db or log_db  # runs are stored in the call log's database by default
        self.runs = Runs()
        self.templates = Jinja2Templates(env=_environment())

    def log_file(self) -> str:
        return str(Path(self.log_db).expanduser().resolve()) if self.log_db else calllog.log_path(get_config())

    def page(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        context.setdefault("nav", name.split(".")[0])
        return self.templates.TemplateResponse(
            request, name, {"csrf": request.state.csrf, **context}, status_code=status_code
        )

    # -- Prompts ---------------------------------------------------------------------------------------
    def prompts(self, request: Request) -> Response:
        q = request.query_params.get("q", "").strip().lower()
        rows = []
        for f in _edit.prompt_rows(self.dirs):
            p = f.prompt
            text = " ".join(
                [f.name, (p.description or "") if p else "", " ".join(sorted(p.variables)) if p else ""]
            ).lower()
            if q and q not in text:
                continue
            rows.append(
                {
                    "files": f,
                    "prompt": p,
                    "cases": count_cases(f),
                    "output_type": (p.output_schema and "json schema") or p.output_type or "str" if p else None,
                }
            )
        return self.page(
            request,
            "prompts.html",
            rows=rows,
            q=request.query_params.get("q", ""),
            searched=[str(d) for d in _edit.search_path(self.dirs)],
        )

    def _files(self, request: Request) -> _edit.PromptFiles:
        try:
            return _edit.find_prompt(request.path_params["name"], self.dirs)
        except TemplateNotFoundError:
            raise HTTPException(404, f"no prompt named {request.path_params['name']!r} on the search path") from None

    def _defaults(self, files: _edit.PromptFiles) -> tuple[str, str]:
        """(api_type, model) preselected: the configured or detected client, the front matter's model or MODEL."""
        try:
            api_type = default_registry.client().api_type
        except ConfigError:
            api_type = ""
        model = (files.prompt.params.get("model") if files.prompt else None) or get_config().model
        return api_type, str(model)

    def prompt(self, request: Request) -> Response:
        files = self._files(request)
        system_text, user_text = files.texts()
        front_matter, body = _edit.split_front_matter(system_text)
        api_type, model = self._defaults(files)
        shown = preview(files, front_matter, body, user_text, {}, api_type, model, self.dirs)
        return self.page(
            request,
            "prompt.html",
            files=files,
            front_matter=front_matter,
            system=body,
            user=user_text,
            versions=files.versions(),
            preview=shown,
            values={},
            api_types=default_registry.api_types(),
            api_type=api_type,
            model=model,
            max_compare=MAX_COMPARE,
        )

    async def _edit_form(self, request: Request) -> tuple[_edit.PromptFiles, Any, dict[str, str]]:
        files = await run_in_threadpool(self._files, request)
        form = await request.form()
        values = {k[4:]: str(v) for k, v in form.multi_items() if k.startswith("var-")}
        return files, form, values

    async def render(self, request: Request) -> Response:
        files, form, values = await self._edit_form(request)
        shown = await run_in_threadpool(
            preview,
            files,
            str(form.get("front_matter", "")),
            str(form.get("system", "")),
            str(form.get("user", "")),
            values,
            str(form.get("api_type", "")),
            str(form.get("model", "")),
            self.dirs,
        )
        fields = sorted(k[4:] for k in form if k.startswith("var-"))
        return self.page(
            request,
            "_preview.html",
            preview=shown,
            values=values,
            refresh_fields=shown.prompt is not None and fields != shown.variables,
        )

    async def run(self, request: Request) -> Response:
        files, form, values = await self._edit_form(request)
        targets = [(str(form.get("api_type", "")), str(form.get("model", "")))]
        return await self._start(request, files, form, values, targets, compare=False)

    async def compare(self, request: Request) -> Response:
        files, form, values = await self._edit_form(request)
        targets = [
            (str(form.get(f"cmp_api_type_{i}", "")), str(form.get(f"cmp_model_{i}", "")).strip())
            for i in range(MAX_COMPARE)
        ]
        targets = [t for t in targets if t[1]]
        return await self._start(request, files, form, values, targets, compare=True)

    async def _start(
        self,
        request: Request,
        files: _edit.PromptFiles,
        form: Any,
        values: dict[str, str],
        targets: list[tuple[str, str]],
        compare: bool,
    ) -> Response:
        shown = await run_in_threadpool(
            preview,
            files,
            str(form.get("front_matter", "")),
            str(form.get("system", "")),
            str(form.get("user", "")),
            values,
            None,
            None,
            self.dirs,
            False,
        )
        if shown.error or shown.prompt is None:
            return self.page(request, "_runs.html", runs=[], error=shown.error or "nothing to run", compare=compare)
        if not targets:
            return self.page(
                request, "_runs.html", runs=[], error="give at least one model to compare", compare=compare
            )
        runs = [
            {
                "id": self.runs.add(
                    Run(shown.prompt, shown.values, api_type or None, model or None, request.state.session)
                ),
                "api_type": api_type,
                "model": model,
            }
            for api_type, model in targets[:MAX_COMPARE]
        ]
        return self.page(request, "_runs.html", runs=runs, error=None, compare=compare)

    async def events(self, request: Request) -> Response:
        run = self.runs.take(request.path_params["run_id"], request.state.session)
        if run is None:
            raise HTTPException(404, "no such run (runs are read once, by the page that started them)")
        return EventSourceResponse(run_events(run), ping=15)

    async def save(self, request: Request) -> Response:
        files, form, _ = await self._edit_form(request)
        system_text = _edit.join_front_matter(str(form.get("front_matter", "")), str(form.get("system", "")))
        versions = (str(form.get("system_version", "")), str(form.get("user_version", "")))
        try:
            new = await run_in_threadpool(
                _edit.save_prompt, files, system_text, str(form.get("user", "")), versions, self.dirs
            )
        except PromptConflictError as exc:
            return self.page(
                request, "_save.html", status_code=409, ok=False, message=str(exc), diff=exc.diff, versions=None
            )
        except PromptSaveError as exc:
            return self.page(request, "_save.html", status_code=403, ok=False, message=str(exc), diff="", versions=None)
        except TemplateError as exc:
            return self.page(
                request, "_save.html", status_code=422, ok=False, message=f"not saved: {exc}", diff="", versions=None
            )
        return self.page(
            request,
            "_save.html",
            ok=True,
            message=f"saved {files.system_path.name}"
            + (f" and {files.user_path.name}" if files.user_exists else "")
            + f" at {time.strftime('%H:%M:%S')}",
            diff="",
            versions=new,
        )

    # -- Call log -------------------------------------------------------------------------------------------
    def _connect(self) -> Any:
        try:
            return calllog.connect(self.log_file())
        except (FileNotFoundError, sqlite3.Error):
            return None

    def _log_filters(self, request: Request) -> dict[str, Any]:
        qp = request.query_params
        return {
            "text": qp.get("q", "").strip() or None,
            "template": qp.get("template") or None,
            "model": qp.get("model") or None,
            "errors": qp.get("errors") == "1",
            "since": _date(qp.get("since")),
            "until": _date(qp.get("until"), end=True),
        }

    def logs(self, request: Request) -> Response:
        qp = request.query_params
        filters = self._log_filters(request)
        conn = self._connect()
        if conn is None:
            return self.page(
                request,
                "logs.html",
                path=self.log_file(),
                missing=True,
                calls=[],
                error=None,
                qp=qp,
                options={},
                started=0.0,
                newest_url=None,
                older_url=None,
                charts_url="",
            )
        error, calls, more = None, [], None
        started = time.perf_counter()
        try:
            try:
                calls = calllog.query(conn, limit=PAGE_SIZE + 1, before=qp.get("before") or None, **filters)
            except sqlite3.OperationalError as exc:
                error = f"bad search {filters['text']!r}: {exc}"
            if len(calls) > PAGE_SIZE:
                calls, more = calls[:PAGE_SIZE], calls[PAGE_SIZE - 1]["id"]
            options = {"template": calllog.values(conn, "template"), "model": calllog.values(conn, "model")}
        finally:
            conn.close()
        rest = [(k, v) for k, v in qp.multi_items() if k != "before"]
        chart_args = urlencode([(k, v) for k, v in rest if k in ("template", "model", "since", "until")])
        return self.page(
            request,
            "logs.html",
            path=self.log_file(),
            missing=False,
            calls=calls,
            error=error,
            qp=qp,
            options=options,
            started=time.perf_counter() - started,
            newest_url=f"/logs?{urlencode(rest)}" if qp.get("before") else None,
            older_url=f"/logs?{urlencode([*rest, ('before', more)])}" if more else None,
            charts_url=f"/logs/charts?{chart_args}",
        )

    def charts(self, request: Request) -> Response:
        """Cost and mean latency per day (the last 30 days with calls, or the date range asked for), as SVG."""
        filters = self._log_filters(request)
        conn = self._connect()
        if conn is None:
            return self.page(request, "_charts.html", charts=[])
        try:
            sums = calllog.stats(
                conn,
                since=filters["since"] or time.time() - 30 * 86400,
                until=filters["until"],
                template=filters["template"],
                model=filters["model"],
                groups=("by_day",),
            )
        finally:
            conn.close()
        days = sorted(sums["by_day"], key=lambda r: r["day"])[-31:]
        charts = [
            bar_chart([(r["day"], r["cost"]) for r in days], "cost per day (USD)", "${:.4f}"),
            bar_chart([(r["day"], r["mean_latency"]) for r in days], "mean latency per day (seconds)", "{:.3f} s"),
        ]
        return self.page(request, "_charts.html", charts=charts)

    def call(self, request: Request) -> Response:
        conn = self._connect()
        if conn is None:
            raise HTTPException(404, "no call log yet")
        try:
            rec = calllog.get(conn, request.path_params["call_id"])
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        finally:
            conn.close()
        if rec is None:
            raise HTTPException(404, f"no call {request.path_params['call_id']!r} in the log")
        return self.page(request, "call.html", rec=rec, nav="logs")

    # -- Evaluations ---------------------------------------------------------------------------------------
    def evals(self, request: Request) -> Response:
        return self.page(request, "evals.html", **_evals.runs_page(self.eval_db))

    def eval_run(self, request: Request) -> Response:
        return self.page(
            request, "eval_run.html", nav="evals", **_evals.run_page(request.path_params["run_id"], self.eval_db)
        )

    def eval_compare(self, request: Request) -> Response:
        qp = request.query_params
        return self.page(
            request,
            "eval_compare.html",
            nav="evals",
            **_evals.compare_page(qp.get("a", ""), qp.get("b", ""), self.eval_db),
        )

    async def error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or (str(exc) if isinstance(exc, TinyLLMError) else "internal error")
        if getattr(request.state, "csrf", None) is None:
            return Response(str(detail), status_code=status, media_type="text/plain")
        return self.page(request, "error.html", status_code=status, status=status, detail=detail, nav="")


def _date(value: str | None, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (local) -> Unix time of its start (``end``: of the next day); None for none or a bad date."""
    if not value:
        return None
    try:
        ts = datetime.strptime(value.strip(), "%Y-%m-%d").timestamp()
    except ValueError:
        return None
    return ts + 86400 if end else ts


def create_app(
    *,
    prompts_dirs: list[str] | tuple[str, ...] = (),
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    log_db: str | None = None,
    eval_db: str | None = None,
) -> Any:
    """The workbench as an ASGI app (Starlette, behind :class:`~tinyllm.ui._security.Guard`).

    Args:
        prompts_dirs: directories searched first for templates (then PROMPTS_DIRS, ./prompts).
        host, port: where the server listens: the Host headers it answers to (see ``allowed_hosts``).
        token: the access token every request must carry (``?token=`` once, then a cookie); None: none
            (only for a loopback host).
        log_db: the call log file (default: LOG_DB, else the default place).
        eval_db: where eval runs are stored (default: the eval package's default).

    Returns:
        the ASGI application (``uvicorn.run(app, host=host, port=port)``).

    Raises:
        ConfigError: a non-loopback ``host`` without a token.
    """
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"listening on {host!r} needs an access token (token=...); `tinyllm ui --host` makes one")
    bench = Workbench(list(prompts_dirs), log_db, eval_db)
    routes = [
        Route("/", lambda request: RedirectResponse("/prompts", 303)),
        Route("/prompts", bench.prompts),
        Route("/prompts/{name}", bench.prompt),
        Route("/prompts/{name}/render", bench.render, methods=["POST"]),
        Route("/prompts/{name}/run", bench.run, methods=["POST"]),
        Route("/prompts/{name}/compare", bench.compare, methods=["POST"]),
        Route("/prompts/{name}/save", bench.save, methods=["POST"]),
        Route("/runs/{run_id}/events", bench.events),
        Route("/evals", bench.evals),
        Route("/evals/compare", bench.eval_compare),
        Route("/evals/{run_id}", bench.eval_run),
        Route("/logs", bench.logs),
        Route("/logs/charts", bench.charts),
        Route("/logs/{call_id}", bench.call),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: bench.error, TinyLLMError: bench.error})
    app.state.workbench = bench
    return Guard(app, hosts=allowed_hosts(host, port), token=token, secret=secrets.token_bytes(32))
