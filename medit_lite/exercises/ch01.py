"""Chapter 1 exercises: the efficacy score (ES), the neighborhood score (NS), and the
build task: EasyEdit's token-accuracy locality.

References: :func:`medit_lite.metrics.efficacy_score` and
:func:`medit_lite.metrics.neighborhood_score` (ROME, Meng et al. 2022, §4.2);
:func:`reference_token_locality`, the locality of :func:`medit_lite.metrics.score_requests`
(EasyEdit, Wang et al., 2023) computed from logits. Solutions: ``show_solution("1.1")``,
``"1.2"``, ``"1.4"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..metrics import efficacy_score, locality_reference, neighborhood_score, score_requests
from .check import CheckResult, add_solution, call_answer, refusal, report, run_check, show_solution

__all__ = ["show_solution"]  # re-exported: ``ch01.show_solution("1.1")``

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


add_solution(
    "1.1",
    """def efficacy_score(p_new, p_true):
    # an edit succeeds when the new object is strictly more likely than the true one
    return sum(n > t for n, t in zip(p_new, p_true)) / len(p_new)""",
)
add_solution(
    "1.2",
    """def neighborhood_score(p_answer, p_new):
    # a neighbor is kept when its own answer still beats the edit's new object
    return sum(a > n for a, n in zip(p_answer, p_new)) / len(p_answer)""",
)


# -- exercise 1.4 (build): EasyEdit's token-accuracy locality -------------------------------
def reference_token_locality(
    logits_before: Sequence[torch.Tensor],
    logits_after: Sequence[torch.Tensor],
    prompt_lens: Sequence[int],
    answer_ids: Sequence[Sequence[int]],
) -> float:
    """EasyEdit's locality over neighborhood prompts, from the logits of the unedited and
    the edited model on each ``prompt + answer`` sequence (``[P_i + T_i, V]``, teacher
    forced): per prompt, the share of the ``T_i`` answer positions where the edited model's
    argmax equals the unedited one's, then the mean over prompts.

    This is the computation of :func:`medit_lite.metrics.score_requests` (its
    ``"locality"``, with :func:`~medit_lite.metrics.locality_reference` taken before the
    edit): the logit at position ``t`` predicts token ``t + 1``, so the answer's tokens are
    predicted at positions ``P - 1 ... P + T - 2`` (:func:`~medit_lite.metrics.pair_logits`).
    ``tests/test_exercises.py`` checks it against ``score_requests`` on a tiny model.
    """
    shares = []
    for before, after, p, answer in zip(logits_before, logits_after, prompt_lens, answer_ids):
        cols = torch.arange(p - 1, p + len(answer) - 1)
        reference = before[cols].argmax(-1)  # what the unedited model predicted
        shares.append(float((after[cols].argmax(-1) == reference).float().mean()))
    return sum(shares) / len(shares)


def _locality_cases() -> list[tuple]:
    """Random logits (V = 6) of a few prompts of different lengths; the edited logits
    differ from the unedited ones at some positions (prompt and answer alike), and some
    gold answer tokens differ from what the unedited model predicts."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for shapes in (((3, 1), (4, 3), (2, 2)), ((5, 4), (3, 1)), ((2, 3), (4, 2), (3, 4), (6, 1))):
        before, after, lens, answers = [], [], [], []
        for p, t in shapes:
            b = torch.randn(p + t, 6, generator=g)
            a = b.clone()
            flip = torch.rand(p + t, generator=g) < 0.5
            a[flip] = torch.randn(int(flip.sum()), 6, generator=g)  # a new prediction there
            predicted = b[p - 1 : p + t - 1].argmax(-1)
            gold = torch.randint(0, 6, (t,), generator=g)
            keep = torch.rand(t, generator=g) < 0.5
            answer = torch.where(keep, predicted, gold)
            before.append(b)
            after.append(a)
            lens.append(p)
            answers.append(answer.tolist())
        cases.append((before, after, lens, answers))
    return cases


def _shifted(before, after, lens, answers):
    shares = []
    for b, a, p, t in zip(before, after, lens, answers):
        cols = torch.arange(p, p + len(t))
        shares.append(float((a[cols].argmax(-1) == b[cols].argmax(-1)).float().mean()))
    return sum(shares) / len(shares)


def _against_gold(before, after, lens, answers):
    shares = []
    for a, p, t in zip(after, lens, answers):
        cols = torch.arange(p - 1, p + len(t) - 1)
        shares.append(float((a[cols].argmax(-1) == torch.tensor(t)).float().mean()))
    return sum(shares) / len(shares)


def _pooled(before, after, lens, answers):
    same = total = 0
    for b, a, p, t in zip(before, after, lens, answers):
        cols = torch.arange(p - 1, p + len(t) - 1)
        same += int((a[cols].argmax(-1) == b[cols].argmax(-1)).sum())
        total += len(t)
    return same / total


def _whole_sequence(before, after, lens, answers):
    shares = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for b, a in zip(before, after)]
    return sum(shares) / len(shares)


def _all_or_nothing(before, after, lens, answers):
    kept = []
    for b, a, p, t in zip(before, after, lens, answers):
        cols = torch.arange(p - 1, p + len(t) - 1)
        kept.append(float(bool((a[cols].argmax(-1) == b[cols].argmax(-1)).all())))
    return sum(kept) / len(kept)


_LOCALITY_MISTAKES: list[tuple[Callable, str]] = [
    (
        _against_gold,
        "you compared the edited model with the gold answer tokens: that is its token "
        "accuracy on the neighbors. EasyEdit's locality compares with the UNEDITED model's "
        "own predictions (locality_reference), so an answer the model got wrong before the "
        "edit still counts as kept when it gets it wrong in the same way.",
    ),
    (
        _shifted,
        "off by one position: the logits at position t predict token t + 1, so the answer "
        "tokens (positions P ... P+T-1 of the sequence) are predicted at positions "
        "P-1 ... P+T-2.",
    ),
    (
        _whole_sequence,
        "you compared every position, the prompt's included: only the positions that "
        "predict the answer's tokens count.",
    ),
    (
        _pooled,
        "you pooled the tokens of all prompts: take each prompt's share first, then the "
        "mean over prompts (a 4-token answer must not weigh 4 times a 1-token one).",
    ),
    (
        _all_or_nothing,
        "you scored each prompt 1 only when every token agrees: EasyEdit counts tokens, "
        "the share of the answer's positions that agree.",
    ),
]


def check_token_locality(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(logits_before, logits_after, prompt_lens, answer_ids) -> float``,
    EasyEdit's locality (see :func:`reference_token_locality`)."""
    name = "token_locality"
    refused = refusal(name, fn, (reference_token_locality, score_requests, locality_reference))
    if refused is not None:
        return report(refused, raise_on_fail)
    cases = _locality_cases()
    answers = []
    for case in cases:
        copies = ([b.clone() for b in case[0]], [a.clone() for a in case[1]], *case[2:])
        out, failed = call_answer(name, fn, *copies)
        if failed is not None:
            return report(failed, raise_on_fail)
        try:
            answers.append(float(out))
        except (TypeError, ValueError):
            return report(
                CheckResult(False, f"{name}: return one number (a fraction), got {out!r}."),
                raise_on_fail,
            )
    expected = [reference_token_locality(*case) for case in cases]
    if all(abs(a - e) < 1e-6 for a, e in zip(answers, expected)):
        return report(
            CheckResult(True, f"{name}: correct on all {len(cases)} cases."), raise_on_fail
        )
    for broken, hint in _LOCALITY_MISTAKES:
        if all(abs(a - broken(*case)) < 1e-6 for a, case in zip(answers, cases)):
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if abs(a - e) >= 1e-6)
    return report(
        CheckResult(
            False,
            f"{name}: case {i} ({len(cases[i][2])} prompts): expected {expected[i]:.4f}, got "
            f"{answers[i]:.4f}. Per prompt: the positions P-1 ... P+T-2, argmax of each model, "
            "the share that agree; then the mean over prompts.",
        ),
        raise_on_fail,
    )


add_solution(
    "1.4",
    """def token_locality(logits_before, logits_after, prompt_lens, answer_ids):
    shares = []
    for before, after, p, answer in zip(logits_before, logits_after, prompt_lens, answer_ids):
        cols = torch.arange(p - 1, p + len(answer) - 1)  # the positions predicting the answer
        same = after[cols].argmax(-1) == before[cols].argmax(-1)  # vs the UNEDITED model
        shares.append(same.float().mean().item())       # a share per prompt ...
    return sum(shares) / len(shares)                    # ... then the mean over prompts""",
)
