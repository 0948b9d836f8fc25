"""The evaluation harness behind ``python -m medit_lite eval`` and the book's tables.

Independent mode (the CounterFact protocol of ROME, §4.2): for each request, edit,
measure, restore. Sequential mode: the lifelong stream of :mod:`medit_lite.lifelong`
(every request in order on one model, edits accumulate, SR/GR/ER/locality curve every
``every`` edits), then every metric on all the requests at the end.
"""

from __future__ import annotations

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
    generation_protocol: str = "greedy",
    check_restore: bool = False,
    every: int = 10,
    checkpoints: Sequence[int] | None = None,
    score_checkpoints: bool = False,
    **overrides,
) -> dict:
    """Edit and score ``requests``; ``method="none"`` scores the unedited model.

    Returns ``{"method", "n", "metrics", "seconds_per_edit", "rows"}`` where ``metrics``
    averages each key of :data:`medit_lite.metrics.METRIC_KEYS` that the data allows;
    sequential mode adds ``"lifelong"``, the :func:`medit_lite.lifelong.lifelong` result,
    with checkpoints every ``every`` edits or at the counts in ``checkpoints``; with
    ``score_checkpoints=True`` each checkpoint also holds, under ``"extra"``, the averaged
    metrics of the requests edited so far (ES/PS/NS... as the model stands then).
    ``generation_tokens``/``generation_protocol``: GE, see
    :func:`medit_lite.metrics.score_requests` (``"rome"`` is the paper's protocol).
    """
    requests = list(requests)
    reference = locality_reference(lm, requests)
    before = weights_fingerprint(lm) if check_restore else None

    def score(reqs, ref):
        return score_requests(
            lm, reqs, ref, generation_tokens, generation_protocol=generation_protocol
        )

    seconds: list[float] = []
    stream = None
    if method == "none":
        rows = score(requests, reference)
    elif sequential:
        from .lifelong import lifelong

        scored: dict[int, list] = {}  # rows scored at a checkpoint, by number of edits

        def at_checkpoint(m, n):
            scored[n] = score(requests[:n], reference[:n])
            return summarize(scored[n])

        stream = lifelong(
            lm,
            requests,
            method,
            every=every,
            checkpoints=checkpoints,
            at_checkpoint=at_checkpoint if score_checkpoints else None,
            # the last checkpoint, when scored, already holds every request's rows
            at_end=lambda m: scored.get(len(requests)) or score(requests, reference),
            **overrides,
        )
        rows = stream.pop("at_end")
        seconds += stream["seconds"]
    else:
        rows = []
        for request, ref in progress(list(zip(requests, reference)), desc=f"eval {method}"):
            with edit(lm, request, method, **overrides) as result:
                rows += score([request], [ref])
            seconds.append(result.seconds)
    if before is not None and weights_fingerprint(lm) != before:
        raise RuntimeError("weights differ from the unedited model after restore")
    out = {
        "method": method,
        "n": len(requests),
        "sequential": sequential,
        "metrics": summarize(rows),
        "seconds_per_edit": sum(seconds) / len(seconds) if seconds else 0.0,
        "rows": rows,
    }
    if stream is not None:
        out["lifelong"] = stream
    return out


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


def results_frame(results: Sequence[dict], keys: Sequence[str] | None = None):
    """:func:`format_table` as a pandas table for a page (it renders whole in HTML): one
    row per ``evaluate`` result, its metrics (``keys``, default every one present) and
    seconds per edit."""
    import pandas as pd

    keys = list(keys) if keys is not None else _ordered_keys(results)
    rows = [
        {"method": r["method"], "n": r["n"]}
        | {k: r["metrics"].get(k) for k in keys}
        | {"s / edit": r["seconds_per_edit"]}
        for r in results
    ]
    return pd.DataFrame(rows).style.hide(axis="index").format(precision=3, na_rep="–")


def _ordered_keys(results):
    from .metrics import METRIC_KEYS

    return [k for k in METRIC_KEYS if any(k in r["metrics"] for r in results)]
