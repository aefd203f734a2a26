"""The statistics of an evaluation, from scipy (the ``eval`` extra): Wilson intervals, exact McNemar, percentiles.

scipy is imported on the first call, never when the package is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["mcnemar", "percentile", "wilson"]

CONFIDENCE = 0.95  # the confidence level of every interval
ALPHA = 0.05  # a paired difference with p below this is called significant


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as exc:
        raise ConfigError("the evaluation statistics need scipy: pip install 'tinyllm[eval]'") from exc
    return stats


def wilson(passed: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of the proportion ``passed / n``.

    From ``scipy.stats.binomtest(passed, n).proportion_ci(confidence, method="wilson")``
    (Wilson, 1927; without continuity correction).

    Raises:
        ValueError: ``n`` < 1 or ``passed`` outside 0..n.
        ConfigError: scipy is not installed.
    """
    if n < 1 or not 0 <= passed <= n:
        raise ValueError(f"wilson: need 0 <= passed <= n and n >= 1, got passed={passed}, n={n}")
    ci = _scipy_stats().binomtest(passed, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(only_a: int, only_b: int) -> float:
    """The two-sided p-value of the exact McNemar test on the discordant pairs.

    ``only_a`` pairs pass in A only, ``only_b`` in B only: the binomial test of ``only_a``
    successes in ``only_a + only_b`` trials at p = 1/2 (``scipy.stats.binomtest``).
    1.0 when there is no discordant pair.

    Raises:
        ConfigError: scipy is not installed.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar: counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    return float(min(1.0, _scipy_stats().binomtest(only_a, n, 0.5, alternative="two-sided").pvalue))


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``sorted_values`` (ascending), interpolating linearly
    between the closest ranks (numpy's default method); None for no values."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = (n - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)
