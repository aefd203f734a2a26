"""tinyllm eval against the loopback server: cases, assertions, the matrix, storage, resume, reports, the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakeserver import Message
from helpers import child_env, wire, write

import tinyllm
from tinyllm import ConfigError, InputFileError
from tinyllm.eval import evaluate, list_runs, load_run

ANSWERS = {  # question -> the fake model's reply
    "capital": "Paris is the capital of France.",
    "json": '{"name": "Ada", "age": 36}',
    "label": "yes",
    "nolabel": "perhaps",
}


def answer(req: dict) -> str:
    system = req["messages"][0]["content"]
    if "strict, fair grader" in system:  # the llm-rubric judge
        rubric = req["messages"][-1]["content"].split("<rubric>")[1].split("</rubric>")[0]
        if "UNREADABLE" in rubric:
            return "I think it is fine."
        ok = "Paris" in rubric
        return json.dumps({"reason": "it names the city" if ok else "no", "pass": ok, "score": 0.9 if ok else 0.1})
    question = req["messages"][-1]["content"]
    if "v2" in system:
        return "new: " + ANSWERS.get(question, question)
    if req.get("model") == "gpt-4o":
        return "I do not know."
    return ANSWERS.get(question, question)


@pytest.fixture
def srv(server, monkeypatch):
    wire(server, monkeypatch, "sk-test-eval-key")
    server.reply_with(answer)
    return server


def prompts(root: Path, system: str = "Answer.", tests: str | None = None, front: str = "", name: str = "qa") -> Path:
    folder = root / "prompts"
    write(folder / f"{name}.system.md", (f"---\n{front}---\n" if front else "") + system + "\n")
    write(folder / f"{name}.user.md", "{{ question }}\n")
    if tests is not None:
        write(folder / f"{name}.tests.yaml", tests)
    return folder


def statuses(report) -> dict[str, str]:
    return {row.case_id: row.status for row in report.rows}


# -- assertions: each type passing and failing ---------------------------------------------


def test_every_text_assertion_passes_and_fails(srv, tmp_path):
    folder = prompts(tmp_path)
    q = {"question": "capital"}
    cases = []
    for i, (spec, ok) in enumerate(
        [
            ({"type": "equals", "value": "Paris is the capital of France."}, True),
            ({"type": "equals", "value": "Paris"}, False),
            ({"type": "contains", "value": "capital"}, True),
            ({"type": "contains", "value": "CAPITAL"}, False),
            ({"type": "icontains", "value": "CAPITAL"}, True),
            ({"type": "icontains", "value": "berlin"}, False),
            ({"type": "contains-any", "value": ["Rome", "Paris"]}, True),
            ({"type": "contains-any", "value": ["Rome", "Berlin"]}, False),
            ({"type": "contains-all", "value": ["Paris", "France"]}, True),
            ({"type": "contains-all", "value": ["Paris", "Spain"]}, False),
            ({"type": "icontains-all", "value": "paris, france"}, True),
            ({"type": "icontains-any", "value": ["rome"]}, False),
            ({"type": "starts-with", "value": "Paris"}, True),
            ({"type": "starts-with", "value": "France"}, False),
            ({"type": "regex", "value": r"capital of \w+\.$"}, True),
            ({"type": "regex", "value": r"^\d+$"}, False),
            ({"type": "not-contains", "value": "Berlin"}, True),
            ({"type": "not-contains", "value": "Paris"}, False),
            ({"type": "is-json"}, False),
            ({"type": "finish-reason", "value": "stop"}, True),
            ({"type": "finish-reason", "value": "length"}, False),
            ({"type": "latency", "threshold": 60}, True),
            ({"type": "not-latency", "threshold": 60}, False),
            ({"type": "cost", "threshold": 1}, True),  # gpt-4o-mini has a price
            ({"type": "cost", "threshold": 0}, False),
            ({"type": "similar", "value": "Paris is the capital of France.", "threshold": 0.999}, True),
            ({"type": "similar", "value": "Bananas are yellow and curved.", "threshold": 0.999}, False),
        ]
    ):
        cases.append({"id": f"{i}-{spec['type']}-{ok}", "vars": q, "assert": [spec]})
    report = evaluate("qa", cases=cases, prompts_dir=folder)
    got = statuses(report)
    want = {c["id"]: "pass" if c["id"].endswith("True") else "fail" for c in cases}
    assert got == want
    failed = next(r for r in report.rows if r.case_id.startswith("1-equals"))
    assert failed.assertions[0].reason == "expected 'Paris', got 'Paris is the capital of France.'"
    assert srv.embedding_requests()  # similar used the client's embeddings


def test_json_and_output_type_assertions(srv, tmp_path):
    folder = prompts(tmp_path, front="output_type: json\n")
    schema = {"type": "object", "required": ["name", "age"], "properties": {"age": {"type": "integer"}}}
    cases = [
        {"id": "is-json", "vars": {"question": "json"}, "assert": [{"type": "is-json", "value": schema}]},
        {"id": "schema", "vars": {"question": "json"}, "assert": [{"type": "json-schema", "value": schema}]},
        {
            "id": "schema-bad",
            "vars": {"question": "json"},
            "assert": [{"type": "json-schema", "value": {"type": "object", "required": ["email"]}}],
        },
        {"id": "typed-equals", "vars": {"question": "json"}, "expected": {"name": "Ada", "age": 36}},
        {"id": "output-type", "vars": {"question": "json"}, "assert": [{"type": "output-type"}]},
        {"id": "not-json", "vars": {"question": "capital"}, "assert": [{"type": "output-type"}]},
        {"id": "not-json-expected-failure", "vars": {"question": "capital"}, "assert": [{"type": "not-output-type"}]},
        {
            "id": "unparsed-implicit",
            "vars": {"question": "capital"},
            "assert": [{"type": "contains", "value": "Paris"}],
        },
    ]
    report = evaluate("qa", cases=cases, prompts_dir=folder)
    assert statuses(report) == {
        "is-json": "pass",
        "schema": "pass",
        "schema-bad": "fail",
        "typed-equals": "pass",
        "output-type": "pass",
        "not-json": "fail",
        "not-json-expected-failure": "pass",
        "unparsed-implicit": "fail",
    }
    unparsed = next(r for r in report.rows if r.case_id == "unparsed-implicit")
    assert [a.type for a in unparsed.failed_assertions()] == ["output-type"]  # a reply that does not parse fails
    assert unparsed.output == "Paris is the capital of France."


def test_labels_equal_a_dataset_column(srv, tmp_path):
    folder = prompts(
        tmp_path,
        front="output_type: [yes, no, perhaps]\n",
        tests="""
- dataset: rows.csv
  assert:
    - {type: equals, value: "{{ label }}"}
""",
    )
    write(folder / "rows.csv", "id,question,label\nr1,label,yes\nr2,nolabel,yes\nr3,nolabel,perhaps\n")
    report = evaluate("qa", prompts_dir=folder)
    assert statuses(report) == {"qa#1:r1": "pass", "qa#1:r2": "fail", "qa#1:r3": "pass"}
    assert next(r for r in report.rows if r.case_id == "qa#1:r2").vars == {
        "id": "r2",
        "question": "nolabel",
        "label": "yes",
    }


def test_python_assertion_bool_score_and_reason(srv, tmp_path):
    folder = prompts(tmp_path)
    write(
        tmp_path / "evalchecks_py.py",
        """
def short(output, value, vars, response):
    return len(output) < 100
def score(output, value, vars, response):
    return 0.3
def verdict(output, value, vars, response):
    return {"pass": "Paris" in output, "score": 1.0, "reason": f"asked {vars['question']} of {response.model}"}
def broken(output, value, vars, response):
    raise RuntimeError("the check itself is broken")
""",
    )
    cases = [
        {"id": name, "vars": {"question": "capital"}, "assert": [{"type": "python", "value": f"evalchecks_py:{name}"}]}
        for name in ("short", "score", "verdict", "broken")
    ]
    cases.append(
        {
            "id": "score-threshold",
            "vars": {"question": "capital"},
            "assert": [{"type": "python", "value": "evalchecks_py:score", "threshold": 0.2}],
        }
    )
    report = evaluate("qa", cases=cases, prompts_dir=folder)
    assert statuses(report) == {
        "short": "pass",
        "score": "fail",
        "verdict": "pass",
        "broken": "error",
        "score-threshold": "pass",
    }
    rows = {r.case_id: r for r in report.rows}
    assert rows["verdict"].assertions[0].reason == "asked capital of gpt-4o-mini"
    assert rows["broken"].error == "RuntimeError: the check itself is broken"


def test_tool_called(srv, tmp_path):
    folder = prompts(tmp_path)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    for _ in range(3):
        srv.enqueue(Message({"content": None, "tool_calls": [call]}))
    cases = [
        {"id": "name", "vars": {"question": "weather"}, "assert": [{"type": "tool-called", "value": "get_weather"}]},
        {
            "id": "args",
            "vars": {"question": "weather"},
            "assert": [{"type": "tool-called", "value": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {
            "id": "wrong-args",
            "vars": {"question": "weather"},
            "assert": [{"type": "tool-called", "value": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
        },
    ]
    report = evaluate("qa", cases=cases, prompts_dir=folder, max_workers=1)
    assert statuses(report) == {"name": "pass", "args": "pass", "wrong-args": "fail"}


def test_llm_rubric_with_a_judge(srv, tmp_path):
    folder = prompts(tmp_path)
    tinyllm.configure(judge_model="gpt-4o")
    cases = [
        {"id": "ok", "vars": {"question": "capital"}, "assert": [{"type": "llm-rubric", "value": "names Paris"}]},
        {"id": "no", "vars": {"question": "capital"}, "assert": [{"type": "llm-rubric", "value": "names Rome"}]},
        {
            "id": "strict",
            "vars": {"question": "capital"},
            "assert": [{"type": "llm-rubric", "value": "names Paris", "threshold": 0.95}],
        },
        {
            "id": "unreadable",
            "vars": {"question": "capital"},
            "assert": [{"type": "llm-rubric", "value": "UNREADABLE"}],
        },
    ]
    report = evaluate("qa", cases=cases, prompts_dir=folder)
    assert statuses(report) == {"ok": "pass", "no": "fail", "strict": "fail", "unreadable": "error"}
    rows = {r.case_id: r for r in report.rows}
    assert rows["ok"].assertions[0].score == 0.9 and "it names the city" in rows["ok"].assertions[0].reason
    assert "judge" in rows["unreadable"].error
    judged = [r for r in srv.chat_requests() if "strict, fair grader" in r.messages[0]["content"]]
    assert len(judged) == 4 and {r.model for r in judged} == {"gpt-4o"}


def test_llm_rubric_without_a_judge_is_refused_before_sending(srv, tmp_path):
    folder = prompts(tmp_path)
    with pytest.raises(ConfigError, match="JUDGE_MODEL"):
        evaluate(
            "qa",
            cases=[{"vars": {"question": "capital"}, "assert": [{"type": "llm-rubric", "value": "x"}]}],
            prompts_dir=folder,
        )
    assert srv.requests == []


def test_negation_weights_and_case_threshold(srv, tmp_path):
    folder = prompts(tmp_path)
    q = {"question": "capital"}
    cases = [
        {
            "id": "weighted",
            "vars": q,
            "threshold": 0.7,
            "assert": [
                {"type": "contains", "value": "Paris", "weight": 3},
                {"type": "contains", "value": "Rome", "weight": 1},
            ],
        },
        {
            "id": "weighted-low",
            "vars": q,
            "threshold": 0.8,
            "assert": [
                {"type": "contains", "value": "Paris", "weight": 3},
                {"type": "contains", "value": "Rome", "weight": 1},
            ],
        },
        {
            "id": "informative",
            "vars": q,
            "assert": [{"type": "contains", "value": "Paris"}, {"type": "contains", "value": "Rome", "weight": 0}],
        },
    ]
    report = evaluate("qa", cases=cases, prompts_dir=folder)
    assert statuses(report) == {"weighted": "pass", "weighted-low": "fail", "informative": "pass"}
    assert next(r for r in report.rows if r.case_id == "weighted").score == pytest.approx(0.75)


def test_unknown_assertion_type_names_the_closest(srv, tmp_path):
    folder = prompts(tmp_path, tests="- vars: {question: capital}\n  assert:\n    - {type: contans, value: Paris}\n")
    with pytest.raises(
        InputFileError, match=r"qa.tests.yaml, line 1.*unknown assertion type 'contans'; did you mean 'contains'"
    ):
        evaluate("qa", prompts_dir=folder)
    assert srv.requests == []


def test_malformed_yaml_and_csv_name_the_file_and_line(srv, tmp_path):
    folder = prompts(tmp_path, tests="- vars: {question: capital}\n  expected: x\n- vars: [unclosed\n")
    with pytest.raises(InputFileError, match=r"qa.tests.yaml: line \d+: invalid YAML") as info:
        evaluate("qa", prompts_dir=folder)
    assert info.value.line is not None
    write(folder / "qa.tests.yaml", "- dataset: rows.csv\n  expected: yes\n")
    write(folder / "rows.csv", 'question\ncapital\n"unclosed\n')
    with pytest.raises(InputFileError, match=r"rows.csv: line 3"):
        evaluate("qa", prompts_dir=folder)
    assert srv.requests == []


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_missing_variable_is_an_error_cell_and_the_run_goes_on(srv, tmp_path):
    folder = prompts(tmp_path)
    report = evaluate(
        "qa",
        cases=[
            {"id": "a", "vars": {}, "expected": "x"},
            {"id": "b", "vars": {"question": "capital"}, "assert": [{"type": "contains", "value": "Paris"}]},
        ],
        prompts_dir=folder,
    )
    assert statuses(report) == {"a": "error", "b": "pass"}
    assert "question" in report.rows[0].error and report.rows[0].passed is None
    (s,) = report.summary()
    assert (s.passed, s.errors, s.pass_rate) == (1, 1, 0.5)


def test_front_matter_tests(srv, tmp_path):
    folder = prompts(
        tmp_path, front="tests:\n  - vars: {question: capital}\n    assert: [{type: icontains, value: paris}]\n"
    )
    report = evaluate("qa", prompts_dir=folder)
    assert statuses(report) == {"qa#1": "pass"}
    assert "tests" not in srv.chat_requests()[0].json  # not sent as a model parameter


# -- the matrix, storage and the call log ---------------------------------------------------


def test_two_models_compared_and_logged_with_the_run_id(srv, tmp_path):
    folder = prompts(
        tmp_path,
        tests="".join(
            f"- vars: {{question: capital}}\n  id: c{i}\n  assert: [{{type: contains, value: Paris}}]\n"
            for i in range(8)
        ),
    )
    tinyllm.configure(log_calls=True, log_db=str(tmp_path / "calls.db"))
    report = evaluate("qa", models=["gpt-4o-mini", "gpt-4o"], prompts_dir=folder)
    assert len(report.rows) == 16
    by_model = {s.model: s for s in report.summary()}
    assert by_model["gpt-4o-mini"].passed == 8 and by_model["gpt-4o"].passed == 0
    (c,) = report.comparisons()
    assert (c.only_a, c.only_b, c.p_value) == (8, 0, pytest.approx(2 * 0.5**8))
    assert c.text.startswith("working/gpt-4o-mini passes 8 more of 8 cases than working/gpt-4o")
    from tinyllm.observe._calllog import connect, flush_all

    flush_all()
    conn = connect(str(tmp_path / "calls.db"))
    assert conn.execute("SELECT count(*) FROM calls WHERE batch_id = ?", [report.run_id]).fetchone()[0] == 16
    (info,) = list_runs(tmp_path / "calls.db")
    assert (info.run_id, info.status, info.cells, info.passed, info.models) == (
        report.run_id,
        "complete",
        16,
        8,
        ["gpt-4o-mini", "gpt-4o"],
    )
    assert load_run(report.run_id[:14], db=tmp_path / "calls.db").summary() == report.summary()


def test_rerun_of_a_complete_matrix_sends_nothing_and_fresh_runs_again(srv, tmp_path):
    folder = prompts(tmp_path, tests="- {vars: {question: capital}, expected: Paris is the capital of France.}\n")
    first = evaluate("qa", prompts_dir=folder, repeat=3)
    assert len(srv.chat_requests()) == 3 and first.resumed is None
    again = evaluate("qa", prompts_dir=folder, repeat=3)
    assert again.run_id == first.run_id and again.resumed == "complete" and len(srv.chat_requests()) == 3
    fresh = evaluate("qa", prompts_dir=folder, repeat=3, fresh=True)
    assert fresh.run_id != first.run_id and len(srv.chat_requests()) == 6
    assert [r.run_id for r in list_runs()] == [fresh.run_id, first.run_id]


def test_api_errors_are_retried_by_a_rerun(srv, tmp_path):
    from fakeserver import Status

    tinyllm.configure(max_attempts=1)
    folder = prompts(
        tmp_path,
        tests="- {id: a, vars: {question: capital}, assert: [{type: contains, value: Paris}]}\n"
        "- {id: b, vars: {question: capital}, assert: [{type: contains, value: Paris}]}\n",
    )
    srv.enqueue(Status(500))
    first = evaluate("qa", prompts_dir=folder, max_workers=1)
    assert first.info.status == "incomplete" and sorted(statuses(first).values()) == ["error", "pass"]
    second = evaluate("qa", prompts_dir=folder)
    assert second.run_id == first.run_id and second.resumed == "resumed"
    assert statuses(second) == {"a": "pass", "b": "pass"} and second.info.status == "complete"
    assert len(srv.chat_requests()) == 3  # the failed cell only was sent again


@pytest.mark.slow  # over 0.4 s in the quick run: the quick run stays under 45 s
def test_resume_after_ctrl_c_sends_only_the_cells_not_done(server, monkeypatch, tmp_path):
    wire(server, monkeypatch, "sk-test-eval-key")
    sent = []

    def reply(req):
        sent.append(1)
        if len(sent) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the run
        return "ok"

    server.reply_with(reply)
    folder = prompts(
        tmp_path, tests="".join(f"- {{id: c{i}, vars: {{question: q{i}}}, expected: ok}}\n" for i in range(30))
    )
    with pytest.raises(KeyboardInterrupt):
        evaluate("qa", prompts_dir=folder, max_workers=2)
    (info,) = list_runs()
    assert info.status == "interrupted" and 0 < info.cells < 30
    before = len(server.chat_requests())
    report = evaluate("qa", prompts_dir=folder)
    assert report.run_id == info.run_id and report.info.status == "complete" and len(report.rows) == 30
    assert len(server.chat_requests()) - before == 30 - info.cells  # only the cells not done


def test_rev_reads_the_template_from_git(srv, tmp_path):
    repo = tmp_path / "repo"
    folder = prompts(
        repo,
        system="Answer. v1",
        tests="- {id: cap, vars: {question: capital}, assert: [{type: starts-with, value: Paris}]}\n",
    )

    def git(*a):
        return subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1")
    write(folder / "qa.system.md", "Answer. v2\n")  # the edit, not committed
    report = evaluate("qa", revs=["HEAD"], prompts_dir=folder)
    rows = {r.version: r for r in report.rows}
    assert rows["working"].output.startswith("new: ") and rows["HEAD"].output == "Paris is the capital of France."
    assert statuses(report.select(version="HEAD")) == {"cap": "pass"}
    assert statuses(report.select(version="working")) == {"cap": "fail"}
    assert (repo / "prompts" / "qa.system.md").read_text() == "Answer. v2\n"  # nothing checked out
    with pytest.raises(ConfigError, match="HEAD~1: .*does not exist"):
        evaluate("qa", revs=["HEAD~1"], prompts_dir=folder)
    with pytest.raises(ConfigError, match="no such revision"):
        evaluate("qa", revs=["nosuchrev"], prompts_dir=folder)


def test_rev_reads_the_included_files_from_git_too(srv, tmp_path):
    repo = tmp_path / "repo"
    tests = "- {id: cap, vars: {question: capital}, assert: [{type: starts-with, value: Paris}]}\n"
    folder = prompts(repo, system="Answer. {% include 'style.md' %} {% include 'old.md' %}", tests=tests)
    write(folder / "style.md", "---\ndescription: the style\n---\nStyle {% include 'parts/tone.md' %}\n")
    write(folder / "parts" / "tone.md", "v1, brief.\n")
    write(folder / "old.md", "Be kind.\n")

    def git(*a):
        return subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1")
    write(folder / "qa.system.md", "Answer. {% include 'style.md' %}\n")  # working tree: old.md no longer used...
    (folder / "old.md").unlink()  # ...and gone
    write(folder / "parts" / "tone.md", "v2, long.\n")  # a nested included file edited
    report = evaluate("qa", revs=["HEAD"], prompts_dir=folder)
    assert statuses(report.select(version="HEAD")) == {"cap": "pass"}  # no error cell: old.md came from git
    assert statuses(report.select(version="working")) == {"cap": "fail"}
    systems = {r.messages[0]["content"] for r in srv.chat_requests()}
    assert systems == {"Answer. Style v1, brief. Be kind.", "Answer. Style v2, long."}

    write(folder / "parts" / "tone.md", "v2, longer.\n")  # only an included file changes: a new matrix
    again = evaluate("qa", revs=["HEAD"], prompts_dir=folder)
    assert again.resumed is None and again.run_id != report.run_id
    assert "Answer. Style v2, longer." in {r.messages[0]["content"] for r in srv.chat_requests()}


def test_pytest_helper(srv, tmp_path):
    from tinyllm.eval import check

    folder = prompts(tmp_path)
    good = [{"vars": {"question": "capital"}, "assert": [{"type": "contains", "value": "Paris"}]}]
    assert check("qa", cases=good, prompts_dir=folder).pass_rate() == 1.0
    bad = good + [{"vars": {"question": "capital"}, "assert": [{"type": "contains", "value": "Rome"}]}]
    with pytest.raises(AssertionError, match=r"(?s)every case to pass.*contains: .*'Rome'"):
        check("qa", cases=bad, prompts_dir=folder)
    assert check("qa", cases=bad, prompts_dir=folder, threshold=0.5)
    assert list_runs() == []  # the helper keeps no run by default


# -- the command ---------------------------------------------------------------------------


def run_cli(*args: str):
    from tinyllm.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_exit_codes_json_and_junit(srv, tmp_path):
    folder = prompts(
        tmp_path,
        tests="- {id: a, vars: {question: capital}, assert: [{type: contains, value: Paris}]}\n"
        "- {id: b, vars: {question: capital}, assert: [{type: contains, value: Rome}]}\n",
    )
    result = run_cli(
        "eval",
        "qa",
        "--prompts-dir",
        str(folder),
        "--no-progress",
        "--json",
        "--junit",
        str(tmp_path / "j.xml"),
        "-m",
        "gpt-4o-mini",
        "-m",
        "gpt-4o",
    )
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert len(lines) == 4 and {x["status"] for x in lines} == {"pass", "fail"}
    assert all(x["run_id"] == lines[0]["run_id"] for x in lines)
    root = ET.parse(tmp_path / "j.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 4 and root.get("tests") == "4" and root.get("failures") == "3"
    failure = root.find(".//testcase[@name='b']/failure")
    assert failure is not None and "Rome" in failure.get("message")
    assert {s.get("name") for s in root.findall("testsuite")} == {"qa.working.gpt-4o-mini", "qa.working.gpt-4o"}

    ok = run_cli("eval", "qa", "--prompts-dir", str(folder), "--no-progress", "--threshold", "0.5", "--fresh")
    assert ok.exit_code == 0, ok.output
    assert "50.0% [" in ok.stdout and "FAIL qa b" in ok.stdout and "contains:" in ok.stdout
    low = run_cli("eval", "qa", "--prompts-dir", str(folder), "--no-progress", "--threshold", "0.9")
    assert low.exit_code == 1 and "below 90%" in low.output
    write(folder / "qa.tests.yaml", "- vars: {question: [\n")
    bad = run_cli("eval", "qa", "--prompts-dir", str(folder), "--no-progress")
    assert bad.exit_code == 2 and "qa.tests.yaml: line" in bad.output


def test_cli_compare_list_and_show_send_nothing(srv, tmp_path):
    folder = prompts(
        tmp_path,
        tests="".join(
            f"- {{id: c{i}, vars: {{question: capital}}, assert: [{{type: contains, value: Paris}}]}}\n"
            for i in range(8)
        ),
    )
    run_cli("eval", "qa", "--prompts-dir", str(folder), "--no-progress", "-m", "gpt-4o")
    run_cli("eval", "qa", "--prompts-dir", str(folder), "--no-progress", "-m", "gpt-4o-mini")
    sent = len(srv.requests)
    runs = list_runs()
    result = run_cli("eval", "--compare", runs[1].run_id, runs[0].run_id)
    assert result.exit_code == 0, result.output
    assert "working/gpt-4o-mini passes 8 more of 8 cases than working/gpt-4o (p = 0.00781" in result.stdout
    listed = run_cli("eval", "--list")
    assert runs[0].run_id in listed.stdout and runs[1].run_id in listed.stdout
    shown = run_cli("eval", "--show", "last")
    assert shown.exit_code == 0 and "100.0%" in shown.stdout
    missing = run_cli("eval", "--show", "nosuchrun")
    assert missing.exit_code == 2 and "no evaluation run" in missing.output
    assert len(srv.requests) == sent


def test_import_tinyllm_loads_neither_scipy_nor_eval():
    code = (
        "import sys, tinyllm, tinyllm.eval\n"
        "assert 'scipy' not in sys.modules and 'tinyllm.eval._run' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())


def test_evaluate_is_public_and_lazy():
    assert tinyllm.evaluate is evaluate and "evaluate" in tinyllm.__all__


@pytest.mark.slow
@pytest.mark.local
def test_matrix_across_two_loopback_models_and_the_embedded_model(srv, tmp_path, embedded_model):
    if embedded_model is None:
        pytest.skip("the local extra is not installed")
    folder = prompts(
        tmp_path,
        front="max_tokens: 8\n",
        tests="- {id: cap, vars: {question: capital}, assert: [{type: icontains, value: paris}]}\n"
        "- {id: any, vars: {question: 'Say hello.'}, assert: [{type: latency, threshold: 120}]}\n",
    )
    report = evaluate("qa", models=["gpt-4o-mini", "gpt-4o"], clients=["llamacpp"], prompts_dir=folder)
    assert [(s.model, s.n) for s in report.summary()] == [("gpt-4o-mini", 2), ("gpt-4o", 2), ("llamacpp", 2)]
    local = [r for r in report.rows if r.model == "llamacpp"]
    assert all(r.output and r.error is None and r.cost is None for r in local)  # answered in-process, no price
    assert next(r for r in local if r.case_id == "any").passed
    assert len(srv.chat_requests()) == 4  # the embedded model's cells never reached the server
    assert len(report.comparisons()) == 2


@pytest.mark.slow
@pytest.mark.local
def test_shipped_prompts_pass_their_tests_on_the_embedded_model(tmp_path, embedded_model):
    """Each shipped prompt's tests file: the bundled model passes them (classify: at its stated threshold 0.6)."""
    if embedded_model is None:
        pytest.skip("the local extra is not installed")
    from helpers import ROOT

    env = child_env(TINYLLM_LOG_DB=str(tmp_path / "calls.db"))
    for names, extra in ((["summarize", "translate", "extract_facts"], []), (["classify"], ["--threshold", "0.6"])):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tinyllm",
                "--prompts-dir",
                str(ROOT / "prompts"),
                "eval",
                *names,
                "--client",
                "llamacpp",
                "--no-progress",
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_client_targets_name_a_model(srv, tmp_path):
    folder = prompts(
        tmp_path, tests="- {id: cap, vars: {question: capital}, assert: [{type: contains, value: Paris}]}\n"
    )
    report = evaluate("qa", clients=["openai=gpt-4o", ("openai", "o3-mini")], prompts_dir=folder)
    assert [s.model for s in report.summary()] == ["openai=gpt-4o", "openai=o3-mini"]
    assert sorted(r.model for r in srv.chat_requests()) == ["gpt-4o", "o3-mini"]
    with pytest.raises(ConfigError):
        evaluate("qa", clients=["nosuchclient"], prompts_dir=folder)


def test_a_budget_is_refused_on_an_executor_of_other_processes(srv, tmp_path):
    import concurrent.futures

    folder = prompts(tmp_path, tests="- {vars: {question: capital}, expected: Paris}\n")
    with concurrent.futures.ProcessPoolExecutor(1) as pool:  # no process starts: nothing is submitted
        with pytest.raises(ConfigError, match="MAX_COST in the workers' environment"):
            evaluate("qa", prompts_dir=folder, executor=pool, max_cost=1.0, store=False)
    result = run_cli(
        "eval", "qa", "--prompts-dir", str(folder), "--no-progress", "--dask", "local:1", "--max-cost", "1"
    )
    assert result.exit_code == 2 and "do not reach Dask workers" in result.output
    cached = run_cli("eval", "qa", "--prompts-dir", str(folder), "--no-progress", "--dask", "local:1", "--no-cache")
    assert cached.exit_code == 2 and "do not reach Dask workers" in cached.output
    assert srv.chat_requests() == []


def test_the_pytest_plugin_is_declared_and_light():
    import tomllib

    import tinyllm.eval.pytest_plugin as plugin

    data = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["pytest11"] == {"tinyllm": "tinyllm.eval.pytest_plugin"}
    assert callable(plugin.tinyllm_eval) and callable(plugin.pytest_addoption)
    code = "import sys, tinyllm.eval.pytest_plugin; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "tinyllm.eval.pytest_plugin" in loaded  # pytest loads it in every project: none of eval's modules yet
    assert not {m for m in loaded if m.startswith(("tinyllm.eval._", "scipy", "tinyllm.batch"))}


@pytest.mark.slow  # a pytest process
def test_the_tinyllm_eval_fixture_in_a_projects_test_suite(server, tmp_path):
    server.reply_with(lambda req: "Paris" if req.get("model") == "gpt-4o" else "Rome")
    prompts(tmp_path, tests="- {vars: {question: capital}, expected: Paris}\n")
    write(
        tmp_path / "test_prompts.py",
        (
            "def test_passes_on_the_model_given_on_the_command_line(tinyllm_eval):\n"
            "    report = tinyllm_eval('qa', prompts_dir='prompts', models=['gpt-4o-mini'])\n"
            "    assert [row.model for row in report.rows] == ['gpt-4o']\n"
            "\n"
            "def test_fails_with_the_table(tinyllm_eval):\n"
            "    tinyllm_eval('qa', prompts_dir='prompts', cases=[{'vars': {'question': 'capital'}, 'expected': 'Rome'}])\n"
        ),
    )
    env = child_env(
        OPENAI_API_KEY="sk-test-plugin",
        TINYLLM_API_TYPE="openai",
        TINYLLM_BASE_URL=server.base_url,
        TINYLLM_MODEL="gpt-4o-mini",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:tinyllm",
            "-p",
            "tinyllm.eval.pytest_plugin",
            "--tinyllm-model",
            "gpt-4o",
            "test_prompts.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout
    assert "prompt evaluation below every case to pass" in done.stdout and "FAIL qa" in done.stdout
    assert {r.json["model"] for r in server.chat_requests()} == {"gpt-4o"}
