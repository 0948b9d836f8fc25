"""Which T-Patcher patches fire on which neighbors, and what that does to NS.

T-Patcher (Huang et al., 2023) adds patch neurons ``relu(x·k + b) v`` to the last FFN; its
memory loss (their Eq. 4) keeps a patch silent on the memory set, and nothing else keeps
it silent elsewhere. On CounterFact a record's neighborhood prompts share its relation and
true object but not its subject, which is where a patch trained on the edit prompt may
also fire. :func:`patch_firing` takes a T-Patcher stream already applied to the model and,
for every neighborhood prompt of the edited records, reads each patch's activation at the
prompt's last token (the position whose prediction NS and EasyEdit's locality score; the
patch adds ``relu(·) v`` to the FFN output there) and each patch's largest pre-activation
(its margin: below 0 the patch is silent), and relates firing to NS: did the prompt's
true answer still beat the edit's new object, before the stream and after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..editing import EditResult
from ..metrics import score_targets
from ..models import LM
from ..requests import EditRequest


def stream_patches(result: EditResult) -> list:
    """The patch each request of a sequential T-Patcher ``result`` added (None where an
    edit was already right and was skipped), in the order of ``result.requests``."""
    if result.method != "tpatcher":
        raise ValueError(f"needs a T-Patcher edit, got {result.method!r}")
    out = []
    for info in result.info:
        skipped = [e.get("skipped", False) for e in info["edits"]]
        patches = iter(info["patches"])
        out += [None if s else next(patches) for s in skipped]
    return out


def neighbor_scores(lm: LM, requests: Sequence[EditRequest]) -> list[list[bool]]:
    """Per request, per neighborhood prompt: is P(its true answer) > P(the request's new
    object)? (NS before averaging)."""
    prompts = [p.prompt for r in requests for p in r.neighborhood]
    answers = [p.answer for r in requests for p in r.neighborhood]
    news = [r.target_new for r in requests for _ in r.neighborhood]
    true_s = score_targets(lm, prompts, answers)
    new_s = score_targets(lm, prompts, news)
    flat = [a.prob > b.prob for a, b in zip(true_s, new_s)]
    out, start = [], 0
    for r in requests:
        out.append(flat[start : start + len(r.neighborhood)])
        start += len(r.neighborhood)
    return out


@torch.no_grad()
def _last_token_inputs(lm: LM, layer: int, texts: Sequence[str]) -> torch.Tensor:
    from ..methods.tpatcher import ffn_inputs

    return torch.stack([ffn_inputs(lm, layer, [t])[-1] for t in texts])


def patch_firing(lm: LM, result: EditResult, ns_before: list[list[bool]] | None = None) -> dict:
    """Firing statistics of the patches of a sequential T-Patcher ``result`` (still
    applied) on the neighborhood prompts of its requests. ``ns_before``: the unedited
    model's :func:`neighbor_scores` on the same requests (for the NS columns)."""
    requests = list(result.requests)
    patches = stream_patches(result)
    layer = result.info[0]["layer"]
    owners = [i for i, p in enumerate(patches) if p is not None]
    live = [patches[i] for i in owners]
    ns_after = neighbor_scores(lm, requests)
    rows = []
    for i, r in enumerate(requests):
        if not r.neighborhood:
            continue
        x = _last_token_inputs(lm, layer, [p.prompt for p in r.neighborhood])
        if live:
            pre = torch.stack([p.pre_activation(x).max(-1).values for p in live], -1)
        else:
            pre = torch.zeros(len(r.neighborhood), 0)
        for k in range(len(r.neighborhood)):
            firing = [owners[j] for j in range(len(live)) if pre[k, j] > 0]
            rows.append(
                {
                    "record": i,
                    "firing": firing,
                    "own": i in firing,
                    "same_relation": any(
                        j != i and requests[j].relation == r.relation for j in firing
                    ),
                    "other_relation": any(requests[j].relation != r.relation for j in firing),
                    "margin": float(pre[k].max()) if pre.shape[1] else float("-inf"),
                    "ns_after": ns_after[i][k],
                    "ns_before": None if ns_before is None else ns_before[i][k],
                }
            )
    return summarize_firing(rows, n_patches=len(live))


def summarize_firing(rows: list[dict], n_patches: int) -> dict:
    """Shares over the neighborhood prompts (see :func:`patch_firing`)."""
    n = len(rows)

    def share(pred, among=None) -> float | None:
        pool = [r for r in rows if among is None or among(r)]
        return sum(bool(pred(r)) for r in pool) / len(pool) if pool else None

    margins = torch.tensor([r["margin"] for r in rows]) if rows else torch.zeros(0)
    out = {
        "neighbors": n,
        "patches": n_patches,
        "fires_any": share(lambda r: r["firing"]),
        "fires_own_patch": share(lambda r: r["own"]),
        "fires_same_relation_patch": share(lambda r: r["same_relation"]),
        "fires_other_relation_patch": share(lambda r: r["other_relation"]),
        "mean_patches_firing": sum(len(r["firing"]) for r in rows) / n if n else None,
        "margin_quantiles": {
            f"q{int(q * 100):02d}": float(torch.quantile(margins, q)) for q in (0.1, 0.5, 0.9)
        }
        if len(margins)
        else {},
        "ns_after": share(lambda r: r["ns_after"]),
        "ns_after_when_firing": share(lambda r: r["ns_after"], lambda r: r["firing"]),
        "ns_after_when_silent": share(lambda r: r["ns_after"], lambda r: not r["firing"]),
    }
    if rows and rows[0]["ns_before"] is not None:
        lost = [r for r in rows if r["ns_before"] and not r["ns_after"]]
        out["ns_before"] = share(lambda r: r["ns_before"])
        out["lost"] = len(lost)
        out["lost_with_a_patch_firing"] = (
            sum(bool(r["firing"]) for r in lost) / len(lost) if lost else None
        )
        own = sum(r["own"] for r in lost)
        out["lost_with_own_patch_firing"] = own / len(lost) if lost else None
    return out
