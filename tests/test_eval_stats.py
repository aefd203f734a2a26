"""tinyllm eval's statistics checked against values computed by hand for small tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tinyllm.eval import compare, load_run
from tinyllm.eval._stats import mcnemar, percentile, wilson
from tinyllm.eval._store import Store

Z = 1.959963984540054  # the 97.5% point of the standard normal: a 95% two-sided interval


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    center = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return center - half, center + half


@pytest.mark.parametrize("k,n", [(8, 10), (0, 5), (5, 5), (37, 40), (1, 1)])
def test_wilson_matches_the_formula(k, n):
    low, high = wilson(k, n)
    want = wilson_by_hand(k, n)
    assert low == pytest.approx(max(0.0, want[0]), abs=1e-9) and high == pytest.approx(min(1.0, want[1]), abs=1e-9)


def test_wilson_refuses_an_empty_table():
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_exact_mcnemar_by_hand():
    assert mcnemar(0, 7) == pytest.approx(2 * 0.5**7)  # 0.015625
    assert mcnemar(7, 0) == pytest.approx(2 * 0.5**7)
    assert mcnemar(3, 5) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # 2 * P(X <= 3), X ~ Bin(8, 1/2)
    assert mcnemar(4, 4) == 1.0
    assert mcnemar(0, 0) == 1.0


def test_percentile_interpolates_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(1, 6)], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def _store_run(db: Path, run_id: str, rows: list[dict], *, versions=("working",), models=("m",)) -> None:
    """A run written as the runner writes it (a JSONL of cells), imported into the database."""
    jsonl = db.parent / f"{run_id}.jsonl"
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"id": seq, "content": {"seq": seq, **row}}) + "\n" for seq, row in enumerate(rows))
    with Store(str(db)) as st:
        st.begin(run_id, "fp-" + run_id, ["p"], list(versions), list(models), 1)
        st.import_jsonl(run_id, str(jsonl))
        st.finish(run_id, "complete")


def _row(case: str, passed, *, version="working", model="m", repeat=0, latency=None, cost=None) -> dict:
    return {
        "prompt": "p",
        "version": version,
        "model": model,
        "case_id": case,
        "repeat": repeat,
        "vars": {},
        "output": None if passed is None else "x",
        "passed": passed,
        "latency": latency,
        "cost": cost,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "assertions": [],
        "error": "E: x" if passed is None else None,
    }


def test_summary_of_a_small_table(tmp_path):
    db = tmp_path / "runs.db"
    rows = [
        _row("a", True, latency=1.0, cost=0.5),
        _row("b", True, latency=2.0, cost=0.25),
        _row("c", False, latency=3.0),
        _row("d", True, latency=4.0),
        _row("e", None),
    ]
    _store_run(db, "r1", rows)
    (s,) = load_run("r1", db=db).summary()
    assert (s.n, s.passed, s.failed, s.errors) == (5, 3, 1, 1)
    assert s.pass_rate == pytest.approx(3 / 5)  # an error is never a pass
    assert (s.ci_low, s.ci_high) == pytest.approx(wilson_by_hand(3, 5))
    assert s.p50_latency == pytest.approx(2.5) and s.p95_latency == pytest.approx(3.85)  # of 1, 2, 3, 4
    assert s.cost == pytest.approx(0.75) and s.unpriced == 2 and s.tokens == 25


def test_flaky_cases_are_those_that_pass_in_some_repeats(tmp_path):
    db = tmp_path / "runs.db"
    rows = [
        _row("a", True, repeat=0),
        _row("a", True, repeat=1),
        _row("b", True, repeat=0),
        _row("b", False, repeat=1),
        _row("c", False, repeat=0),
        _row("c", None, repeat=1),
    ]
    _store_run(db, "r1", rows)
    (s,) = load_run("r1", db=db).summary()
    assert s.flaky == ["b"]


def test_paired_comparison_counts_discordant_cases(tmp_path):
    # 40 cases: 30 pass in both, 3 in neither, 7 only in B -> "B passes 7 more of 40", p = 2 / 2**7
    db = tmp_path / "runs.db"
    rows = []
    for i in range(40):
        a_pass = i < 30
        b_pass = i < 37
        rows += [_row(f"c{i}", a_pass, version="HEAD"), _row(f"c{i}", b_pass, version="working")]
    _store_run(db, "r1", rows, versions=("HEAD", "working"))
    report = load_run("r1", db=db)
    (c,) = report.comparisons()
    assert (c.pairs, c.both, c.neither, c.only_a, c.only_b) == (40, 30, 3, 0, 7)
    assert c.p_value == pytest.approx(0.015625) and c.significant
    assert c.text.startswith("working/m passes 7 more of 40 cases than HEAD/m (p = 0.0156")


def test_no_significant_difference_is_said_so(tmp_path):
    db = tmp_path / "runs.db"
    _store_run(db, "a", [_row(f"c{i}", i % 2 == 0) for i in range(8)])
    _store_run(db, "b", [_row(f"c{i}", i % 2 == 1) for i in range(8)])
    c = compare(load_run("a", db=db), load_run("b", db=db))
    assert (c.only_a, c.only_b) == (4, 4) and c.p_value == 1.0 and not c.significant
    assert c.text.startswith("no significant difference")


def test_comparing_a_report_of_several_versions_needs_a_selection(tmp_path):
    from tinyllm import ConfigError

    db = tmp_path / "runs.db"
    _store_run(db, "r", [_row("a", True, version="v1"), _row("a", False, version="v2")], versions=("v1", "v2"))
    report = load_run("r", db=db)
    with pytest.raises(ConfigError, match="more than one version/model"):
        compare(report, report)
    c = compare(report.select(version="v1"), report.select(version="v2"))
    assert (c.only_a, c.only_b) == (1, 0)
