"""The evaluation harness behind ``python -m medit_lite eval`` and the book's tables.

Independent mode (the CounterFact protocol of ROME, §4.2): for each request, edit,
measure, restore. Sequential mode: apply every request in order on one model, then
measure them all at the end (edits accumulate).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .editing import edit, weights_fingerprint
from .metrics import locality_reference, score_requests, summarize
from .models import LM
from .progress import progress
from .requests import EditRequest


def evaluate(
    lm: LM,
    requests: Sequence[EditRequest],
    method: str = "none",
    *,
    sequential: bool = False,
    generation_tokens: int = 0,
    check_restore: bool = False,
    **overrides,
) -> dict:
    """Edit and score ``requests``; ``method="none"`` scores the unedited model.

    Returns ``{"method", "n", "metrics", "seconds_per_edit", "rows"}`` where ``metrics``
    averages each key of :data:`medit_lite.metrics.METRIC_KEYS` that the data allows.
    """
    requests = list(requests)
    reference = locality_reference(lm, requests)
    before = weights_fingerprint(lm) if check_restore else None
    score = lambda reqs, ref: score_requests(lm, reqs, ref, generation_tokens)  # noqa: E731
    seconds: list[float] = []
    if method == "none":
        rows = score(requests, reference)
    elif sequential:
        start = time.perf_counter()
        result = edit(lm, requests, method, sequential=True, **overrides)
        seconds.append((time.perf_counter() - start) / len(requests))
        try:
            rows = score(requests, reference)
        finally:
            result.restore()
    else:
        rows = []
        for request, ref in progress(list(zip(requests, reference)), desc=f"eval {method}"):
            with edit(lm, request, method, **overrides) as result:
                rows += score([request], [ref])
            seconds.append(result.seconds)
    if before is not None and weights_fingerprint(lm) != before:
        raise RuntimeError("weights differ from the unedited model after restore")
    return {
        "method": method,
        "n": len(requests),
        "sequential": sequential,
        "metrics": summarize(rows),
        "seconds_per_edit": sum(seconds) / len(seconds) if seconds else 0.0,
        "rows": rows,
    }


def format_table(results: Sequence[dict]) -> str:
    """A plain-text table of several ``evaluate`` results, one row per method."""
    keys = [k for k in _ordered_keys(results)]
    header = ["method", "n"] + keys + ["s/edit"]
    lines = [header]
    for r in results:
        m = r["metrics"]
        lines.append(
            [r["method"], str(r["n"])]
            + [f"{m[k]:.3f}" if k in m else "-" for k in keys]
            + [f"{r['seconds_per_edit']:.2f}"]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines)


def _ordered_keys(results):
    from .metrics import METRIC_KEYS

    return [k for k in METRIC_KEYS if any(k in r["metrics"] for r in results)]
