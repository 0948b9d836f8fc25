"""Chapter 1 exercises: the efficacy score (ES) and the neighborhood score (NS).

References: :func:`medit_lite.metrics.efficacy_score` and
:func:`medit_lite.metrics.neighborhood_score` (ROME, Meng et al. 2022, §4.2).
"""

from __future__ import annotations

from ..metrics import efficacy_score, neighborhood_score
from .check import CheckResult, run_check

# (p_new, p_true) pairs; ties and several sizes expose the usual slips
_ES_CASES = [
    ([0.9, 0.2, 0.6], [0.1, 0.5, 0.3]),
    ([0.5, 0.5], [0.5, 0.1]),  # a tie is not a success
    ([0.01], [0.02]),
    ([0.3, 0.4, 0.2, 0.8], [0.1, 0.1, 0.1, 0.9]),
]


def check_efficacy_score(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(p_new, p_true) -> float``: the share of edits where P(new) > P(true)."""
    mistakes = [
        (
            lambda n, t: sum(a >= b for a, b in zip(n, t)) / len(n),
            "a tie P(new) == P(true) is not a success: compare with a strict '>'.",
        ),
        (
            lambda n, t: sum(a > b for a, b in zip(n, t)),
            "return a fraction (divide by the number of edits), not a count.",
        ),
        (
            lambda n, t: sum(a < b for a, b in zip(n, t)) / len(n),
            "the comparison is reversed: an edit succeeds when the NEW object is more likely.",
        ),
        (
            lambda n, t: sum(a - b for a, b in zip(n, t)) / len(n),
            "that is the efficacy magnitude EM (mean difference); ES counts successes.",
        ),
    ]
    return run_check("efficacy_score", fn, efficacy_score, _ES_CASES, mistakes, raise_on_fail)


# (p_answer, p_new) pairs on neighborhood prompts
_NS_CASES = [
    ([0.7, 0.2, 0.4], [0.1, 0.6, 0.4]),
    ([0.3], [0.2]),
    ([0.05, 0.5, 0.6, 0.9], [0.1, 0.4, 0.7, 0.2]),
]


def check_neighborhood_score(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(p_answer, p_new) -> float``: share of neighbors that keep their answer."""
    mistakes = [
        (
            lambda a, n: sum(x < y for x, y in zip(a, n)) / len(a),
            "reversed: on a neighbor the TRUE answer must stay more likely than the new object.",
        ),
        (
            lambda a, n: sum(x >= y for x, y in zip(a, n)) / len(a),
            "a tie is not a kept neighbor: use a strict '>'.",
        ),
        (
            lambda a, n: sum(x > y for x, y in zip(a, n)),
            "return a fraction of the neighborhood prompts, not a count.",
        ),
    ]
    return run_check(
        "neighborhood_score", fn, neighborhood_score, _NS_CASES, mistakes, raise_on_fail
    )
