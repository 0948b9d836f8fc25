"""Lifelong (sequential) editing: a stream of edits applied in order, measured as it goes.

This is the protocol of T-Patcher (Huang et al., 2023, §4.1), shared by every method:
the edits of a stream arrive one at a time and each is applied on top of all earlier ones
(``edit(lm, request, method)`` called once per request, the results stacked). After every
``every`` edits (and after the last), or at the edit counts listed in ``checkpoints``, the
harness takes a checkpoint:

* **SR**, success rate: the share of the edits so far that held *right after their own
  edit* (measured once per edit, just after it);
* **ER**, edit retention: the share of the edits so far that *still* hold now;
* **GR**, generalization rate: the share of the paraphrases of the edits so far on which
  the new target is predicted now (micro-average over paraphrases);
* **locality**: the share of a fixed set of unrelated probes (by default the
  neighborhood prompts of the stream's requests) on which the model still predicts
  exactly what the unedited model predicted: T-Patcher's TrainR/TestR idea, "what the
  model got before, it still gets";
* **added_params** (and ``added_bytes``): parameters the method added to the model
  (patch neurons, codebooks...); **changed_params**: elements of the original weights
  that differ from their original values (fine-tuning, ROME...);
* **seconds_per_edit**: mean wall-clock seconds of the ``edit`` calls so far.

"Holds" means exact match under teacher forcing: every target token is the model's argmax
given the prompt and the gold earlier target tokens. At the end every edit is undone,
newest first, and the model is checked to be bit-identical to the start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .editing import EditResult, edit, weights_fingerprint
from .metrics import score_targets
from .models import LM
from .progress import progress
from .requests import EditRequest, Probe, as_requests
from .stats import reuse_statistics

CURVE_KEYS = ("SR", "GR", "ER", "locality", "added_params", "changed_params", "seconds_per_edit")


def exact_matches(lm: LM, prompts: Sequence[str], targets: Sequence[str]) -> list[bool]:
    """For each pair: is every target token the argmax prediction (teacher forcing)?"""
    if not prompts:
        return []
    return [bool((s.predicted == s.target_ids).all()) for s in score_targets(lm, prompts, targets)]


def default_locality_probes(requests: Sequence[EditRequest], limit: int = 100) -> list[Probe]:
    """The neighborhood probes of the stream's requests, at most ``limit``, without duplicates
    and without the prompts the stream edits (an edit prompt or paraphrase of one request
    may be another's neighbor: it is in scope, not a locality probe)."""
    seen = {r.text for r in requests} | {p for r in requests for p in r.paraphrases}
    out = []
    for r in requests:
        for p in r.neighborhood:
            if p.prompt not in seen and len(out) < limit:
                seen.add(p.prompt)
                out.append(p)
    return out


def _predictions(lm: LM, probes: Sequence[Probe]) -> list[torch.Tensor]:
    if not probes:
        return []
    scores = score_targets(lm, [p.prompt for p in probes], [p.answer for p in probes])
    return [s.predicted for s in scores]


def _n_params(lm: LM) -> int:
    return sum(p.numel() for p in lm.model.parameters())


def lifelong(
    lm: LM,
    requests,
    method: str = "ft-l",
    *,
    every: int = 10,
    checkpoints: Sequence[int] | None = None,
    locality: Sequence[Probe] | None = None,
    locality_size: int = 100,
    at_checkpoint=None,
    at_end=None,
    hparams=None,
    **overrides,
) -> dict:
    """Apply ``requests`` one after another with ``method``; measure after every ``every``
    edits, or, when ``checkpoints`` is given, after exactly those numbers of edits (the
    last edit always gets a checkpoint).

    ``locality`` is the probe set of the locality metric (default: up to
    ``locality_size`` neighborhood probes of the requests). Returns a dict with
    ``method``, ``n``, ``sequential`` (True), ``every``, ``final`` (the last checkpoint),
    ``curve`` (one dict per checkpoint with ``n_edits`` and :data:`CURVE_KEYS`),
    ``success`` (per edit, right after it), ``seconds`` (per edit) and
    ``already_correct`` (edits the unedited model already got right). The model is
    restored exactly before it returns, also on errors. ``at_checkpoint(lm, n)``, if
    given, is called at each checkpoint (``n`` edits applied) and what it returns is kept
    under the checkpoint's ``"extra"`` key (e.g. CounterFact scores of the first ``n``
    requests). ``at_end(lm)``, if given, is called
    after the last edit, before restoring; what it returns is under ``"at_end"``.
    """
    reqs = as_requests(requests)
    if not reqs:
        raise ValueError("lifelong editing needs at least one request")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    marks = _checkpoint_set(checkpoints, every, len(reqs))
    probes = (
        list(locality) if locality is not None else default_locality_probes(reqs, locality_size)
    )

    fingerprint = weights_fingerprint(lm)
    n_params = _n_params(lm)
    start_params = {id(p) for p in lm.model.parameters()}
    reference = _predictions(lm, probes)
    already = exact_matches(lm, [r.text for r in reqs], [r.target_new for r in reqs])

    results: list[EditResult] = []
    originals: dict[str, torch.Tensor] = {}
    success: list[bool] = []
    seconds: list[float] = []
    curve: list[dict] = []
    with reuse_statistics():  # each layer keeps its first C, as in the reference code
        try:
            for i, request in enumerate(progress(reqs, desc=f"lifelong {method}")):
                result = edit(lm, request, method, hparams=hparams, **overrides)
                results.append(result)
                for name, saved in result.original_weights.items():
                    originals.setdefault(name, saved)
                seconds.append(result.seconds)
                success += exact_matches(lm, [request.text], [request.target_new])
                n = i + 1
                if n in marks:
                    curve.append(
                        _checkpoint(lm, reqs[:n], success, seconds, probes, reference, originals)
                        | {"added_params": _n_params(lm) - n_params}
                    )
                    curve[-1]["added_bytes"] = added_bytes(lm, start_params)
                    if at_checkpoint is not None:
                        curve[-1]["extra"] = at_checkpoint(lm, n)
            end = at_end(lm) if at_end is not None else None
        finally:
            for result in reversed(results):
                result.restore()
    if weights_fingerprint(lm) != fingerprint or _n_params(lm) != n_params:
        raise RuntimeError(f"{method}: the model differs from the start after restoring")
    return {
        "method": method,
        "n": len(reqs),
        "sequential": True,
        "every": every,
        "checkpoints": sorted(marks),
        "locality_probes": len(probes),
        "final": curve[-1],
        "curve": curve,
        "success": success,
        "seconds": seconds,
        "already_correct": sum(already),
        "at_end": end,
    }


def added_bytes(lm: LM, start_params: set[int]) -> int:
    """Bytes of the parameters not among ``start_params`` (ids of the model's parameters
    at the start), each at its own element size: a patch kept in float32 on a bf16 model
    takes 4 bytes per number, not 2."""
    return sum(
        p.numel() * p.element_size() for p in lm.model.parameters() if id(p) not in start_params
    )


def _checkpoint_set(checkpoints, every: int, n: int) -> set[int]:
    """The edit counts after which a checkpoint is taken (always including ``n``)."""
    if checkpoints is None:
        return set(range(every, n + 1, every)) | {n}
    marks = list(checkpoints)
    for k in marks:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            raise ValueError(f"checkpoints must be edit counts between 1 and {n}, got {k!r}")
    return set(marks) | {n}


@torch.no_grad()
def _checkpoint(lm, done, success, seconds, probes, reference, originals) -> dict:
    n = len(done)
    retained = exact_matches(lm, [r.text for r in done], [r.target_new for r in done])
    para = [(p, r.target_new) for r in done for p in r.paraphrases]
    general = exact_matches(lm, [p for p, _ in para], [t for _, t in para])
    now = _predictions(lm, probes)
    kept = [bool(torch.equal(a, b)) for a, b in zip(now, reference)]
    params = dict(lm.model.named_parameters())
    changed = sum(int((params[k] != v).sum()) for k, v in originals.items())
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "n_edits": n,
        "SR": mean(success[:n]),
        "GR": mean(general),
        "ER": mean(retained),
        "locality": mean(kept),
        "changed_params": changed,
        "seconds_per_edit": mean(seconds[:n]),
    }


def format_curve(result: dict) -> str:
    """A plain-text table of a :func:`lifelong` result, one row per checkpoint."""
    header = ["edits", "SR", "GR", "ER", "locality", "added", "changed", "s/edit"]
    rows = [header]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c in result["curve"]:
        rows.append(
            [
                str(c["n_edits"]),
                fmt(c["SR"]),
                fmt(c["GR"]),
                fmt(c["ER"]),
                fmt(c["locality"]),
                str(c["added_params"]),
                str(c["changed_params"]),
                f"{c['seconds_per_edit']:.2f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    title = f"lifelong {result['method']}: {result['n']} edits, checkpoint every {result['every']}"
    return title + "\n" + "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
