"""Chapter 5 exercises: the exposure of a secret from its rank, and the digit-wise rank.

References: :func:`medit_lite.applications.privacy.exposure` (Carlini et al., 2019,
Def. 3) and :func:`medit_lite.applications.privacy.tree_rank` (the rank DEPN's code
computes, Wu et al., 2023); the bias slope a_s of DAMA's evaluation
(:func:`medit_lite.applications.bias.bias_regression`, Limisiewicz et al., 2024) and the
projection that removes a subspace (:func:`medit_lite.methods.dama.nullspace_projection`).
The build task, exercise 5.5: DEPN's privacy-neuron aggregator
(:func:`medit_lite.methods.depn.aggregate`). Solutions: ``show_solution("5.1")`` ...
``show_solution("5.5")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..applications.privacy import exposure, tree_rank
from .check import (
    CheckResult,
    add_solution,
    call_answer,
    refusal,
    report,
    run_check,
    show_solution,
)

__all__ = ["show_solution"]  # re-exported: ``ch05.show_solution("5.1")``


def _refuse(name: str, fn: Callable, references: tuple) -> CheckResult | None:
    return refusal(name, fn, references)


# -- exercise 5.1: exposure from rank ----------------------------------------------------
def reference_exposure_from_rank(rank: int, n_digits: int) -> float:
    """Exposure in bits of a secret of ``n_digits`` digits whose rank is ``rank`` (1 =
    the most likely of all 10**n_digits candidates)."""
    return exposure(rank, 10**n_digits)


_EXPOSURE_CASES = [(1, 10), (10**10, 10), (1024, 10), (7, 3), (500, 4), (123456, 6)]

_EXPOSURE_MISTAKES = [
    (
        lambda r, n: n * math.log(10) - math.log(r),
        "exposure is measured in bits: use log base 2, not the natural log.",
    ),
    (
        lambda r, n: -math.log2(r),
        "you left out log₂|R|, the bits of the whole candidate space (|R| = 10**n_digits): "
        "exposure compares the rank with the number of candidates.",
    ),
    (
        lambda r, n: n * math.log2(10) - math.log2(r + 1),
        "rank is already 1-based (1 = the most likely candidate), so a top-ranked secret "
        "has the full log₂|R| bits: don't add 1.",
    ),
    (
        lambda r, n: math.log2(r),
        "that is log₂ rank alone: exposure is log₂|R| − log₂ rank, large when the rank is small.",
    ),
]


def check_exposure_from_rank(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(rank, n_digits) -> bits``."""
    name = "exposure_from_rank"
    refused = _refuse(name, fn, (reference_exposure_from_rank, exposure))
    if refused is not None:
        return report(refused, raise_on_fail)
    return run_check(
        name,
        fn,
        reference_exposure_from_rank,
        _EXPOSURE_CASES,
        _EXPOSURE_MISTAKES,
        raise_on_fail,
    )


# -- exercise 5.2: the digit-wise rank ---------------------------------------------------
def reference_digit_rank(table: torch.Tensor, digits: list[int]) -> int:
    """``1 + Σ_i r_i · 10^{L-1-i}``, ``r_i`` the number of digits scored strictly higher
    than the true digit ``digits[i]`` in row ``i`` of ``table`` ([L, 10])."""
    return tree_rank(table, digits)


def _digit_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(5)
    cases = []
    for L in (1, 3, 4, 10):
        table = torch.randn(L, 10, generator=g)
        digits = torch.randint(0, 10, (L,), generator=g).tolist()
        cases.append((table, digits))
    top = torch.randn(5, 10, generator=g)
    cases.append((top, top.argmax(1).tolist()))  # the most likely secret: rank 1
    return cases


def _ranks(table, digits, strict=True):
    return [
        int((table[i] > table[i, d]).sum()) if strict else int((table[i] >= table[i, d]).sum())
        for i, d in enumerate(digits)
    ]


_DIGIT_MISTAKES = [
    (
        lambda t, d: sum(r * 10 ** (len(d) - 1 - i) for i, r in enumerate(_ranks(t, d))),
        "that is the number of candidates ranked above the secret; its rank is one more "
        "(rank 1 = the most likely), so add 1.",
    ),
    (
        lambda t, d: 1 + sum(r * 10**i for i, r in enumerate(_ranks(t, d))),
        "the place values are reversed: the first digit is the most significant, each of "
        "its better alternatives puts 10^(L-1) candidates ahead.",
    ),
    (
        lambda t, d: 1 + sum(r * 10 ** (len(d) - 1 - i) for i, r in enumerate(_ranks(t, d, False))),
        "count the digits scored strictly higher than the true one: with >= the true digit "
        "counts itself.",
    ),
    (
        lambda t, d: 1 + sum(_ranks(t, d)),
        "each better digit at position i puts a whole subtree of 10^(L-1-i) candidates "
        "ahead, not one: weight r_i by its place value.",
    ),
]


def check_digit_rank(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(table, digits) -> int``, the exact digit-wise rank."""
    name = "digit_rank"
    refused = _refuse(name, fn, (reference_digit_rank, tree_rank))
    if refused is not None:
        return report(refused, raise_on_fail)
    for table, digits in _digit_cases():
        out, failed = call_answer(name, fn, table.clone(), list(digits))
        if failed is not None:
            return report(failed, raise_on_fail)
        try:
            value = int(out)
        except (TypeError, ValueError):
            return report(
                CheckResult(False, f"{name}: return an integer rank, got {out!r}."), raise_on_fail
            )
        if value != reference_digit_rank(table, digits):
            for broken, hint in _DIGIT_MISTAKES:
                if all(int(fn(t.clone(), list(d))) == broken(t, d) for t, d in _digit_cases()):
                    return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
            return report(
                CheckResult(
                    False,
                    f"{name}: for a {len(digits)}-digit secret expected "
                    f"{reference_digit_rank(table, digits)}, got {value}.",
                ),
                raise_on_fail,
            )
    return report(CheckResult(True, f"{name}: correct on all 5 cases."), raise_on_fail)


# -- exercise 5.3: DAMA's bias slope a_s -------------------------------------------------
def reference_bias_slope(x_s, x_f, y) -> float:
    """a_s of the joint least-squares fit y = a_s·x_s + a_f·x_f + b (DAMA's bias slope)."""
    from ..applications.bias import bias_regression

    return bias_regression(x_s, x_f, y)["a_s"]


def _slope_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(7)
    cases = []
    for n, (a_s, a_f, b) in (
        (40, (0.3, 0.5, 0.1)),
        (25, (-0.2, 0.8, -0.05)),
        (60, (0.0, 0.4, 0.2)),
    ):
        f = torch.rand(n, generator=g) * 2 - 1
        s = 0.6 * f + 0.4 * (torch.rand(n, generator=g) * 2 - 1)  # the scores correlate
        y = a_s * s + a_f * f + b + 0.02 * torch.randn(n, generator=g)
        cases.append((s.tolist(), f.tolist(), y.tolist()))
    return cases


def _lstsq(cols, y):
    X = torch.tensor(cols, dtype=torch.float64).T
    return torch.linalg.lstsq(X, torch.tensor(y, dtype=torch.float64)[:, None]).solution[:, 0]


def _one_slope(x, y):
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


_SLOPE_MISTAKES = [
    (
        lambda s, f, y: float(_lstsq([s, f], y)[0]),
        "add a column of ones: without the intercept b the slope has to explain the mean "
        "of P(he) − P(she) too.",
    ),
    (
        lambda s, f, y: _one_slope(s, y),
        "that is the slope of y on x_s alone; the professions' stereotypical and factual "
        "scores correlate, so fit both together (a_s is the effect of x_s at fixed x_f).",
    ),
    (
        lambda s, f, y: float(_lstsq([s, f, [1.0] * len(s)], y)[1]),
        "that is a_f, the coefficient of the factual score; a_s belongs to x_s.",
    ),
]


def check_bias_slope(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(x_s, x_f, y) -> a_s`` (lists of floats in, a float out)."""
    name = "bias_slope"
    refused = _refuse(name, fn, (reference_bias_slope,))
    if refused is not None:
        return report(refused, raise_on_fail)
    return run_check(name, fn, reference_bias_slope, _slope_cases(), _SLOPE_MISTAKES, raise_on_fail)


# -- exercise 5.4: the projection that removes a subspace ---------------------------------
def reference_remove_subspace(B: torch.Tensor) -> torch.Tensor:
    """P = I − B B⁺: the orthogonal projection onto the complement of B's columns (DAMA)."""
    from ..methods.dama import nullspace_projection

    return nullspace_projection(B.double().numpy())


def _subspace_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return [
        torch.randn(d, k, generator=g, dtype=torch.float64) * 2 for d, k in ((6, 2), (8, 3), (5, 1))
    ]


_SUBSPACE_MISTAKES = [
    (
        lambda B: torch.eye(B.shape[0], dtype=B.dtype) - B @ B.T,
        "I − B Bᵀ is a projection only when B's columns are orthonormal; use the "
        "pseudo-inverse (I − B B⁺) or orthonormalise B first (QR).",
    ),
    (
        lambda B: B @ torch.linalg.pinv(B),
        "that projects ONTO the subspace (B B⁺); DAMA removes it: I − B B⁺.",
    ),
    (
        lambda B: (
            torch.eye(B.shape[0], dtype=B.dtype)
            - torch.outer(B[:, 0], B[:, 0]) / (B[:, 0] @ B[:, 0])
        ),
        "that removes only the first column's direction: P must remove every column of B "
        "(the whole subspace they span).",
    ),
]


def check_remove_subspace(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(B) -> P`` (B: d × k, float64; P: d × d with P B = 0 and P² = P)."""
    name = "remove_subspace"
    refused = _refuse(name, fn, (reference_remove_subspace,))
    if refused is not None:
        return report(refused, raise_on_fail)
    for B in _subspace_cases():
        out, failed = call_answer(name, fn, B.clone())
        if failed is not None:
            return report(failed, raise_on_fail)
        d = B.shape[0]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (d, d):
            return report(CheckResult(False, f"{name}: return a {d} × {d} tensor."), raise_on_fail)
        out = out.double()
        if not torch.allclose(out, reference_remove_subspace(B), atol=1e-8):
            for broken, hint in _SUBSPACE_MISTAKES:
                if torch.allclose(out, broken(B), atol=1e-8):
                    return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
            hint = (
                "P B ≠ 0: the directions are not removed."
                if not torch.allclose(out @ B, torch.zeros_like(B), atol=1e-8)
                else "P B = 0, but P is not the orthogonal projection (P² = P, Pᵀ = P)."
            )
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    return report(CheckResult(True, f"{name}: correct on all 3 cases."), raise_on_fail)


# -- solutions ----------------------------------------------------------------------------
add_solution(
    "5.1",
    """def exposure_from_rank(rank, n_digits):
    return n_digits * math.log2(10) - math.log2(rank)""",
)
add_solution(
    "5.2",
    """def digit_rank(table, digits):
    L = len(digits)
    rank = 1
    for i, d in enumerate(digits):
        better = int((table[i] > table[i, d]).sum())  # digits more likely than the true one
        rank += better * 10 ** (L - 1 - i)            # each puts a subtree of 10^(L-1-i) ahead
    return rank""",
)
add_solution(
    "5.3",
    """def bias_slope(x_s, x_f, y):
    X = torch.tensor([x_s, x_f, [1.0] * len(x_s)], dtype=torch.float64).T  # with the intercept
    coef = torch.linalg.lstsq(X, torch.tensor(y, dtype=torch.float64)[:, None]).solution
    return float(coef[0])  # a_s""",
)
add_solution(
    "5.4",
    """def remove_subspace(B):
    return torch.eye(B.shape[0], dtype=B.dtype) - B @ torch.linalg.pinv(B)  # I − B B⁺""",
)


# -- exercise 5.5 (build): DEPN's privacy-neuron aggregator --------------------------------
def reference_aggregate_neurons(
    scores: list[torch.Tensor],
    layers: list[int],
    threshold: float,
    min_share: float,
    z: int,
) -> list[tuple[int, int]]:
    """DEPN's step 2 (:func:`medit_lite.methods.depn.aggregate`). ``scores[s]`` is secret
    ``s``'s attribution map ``[len(layers), d_mlp]`` (row ``j`` belongs to layer
    ``layers[j]``). Per secret, keep the neurons with score ``≥ threshold × that secret's
    max`` (a secret whose max is ≤ 0 keeps none); a neuron's frequency is the number of
    secrets that keep it. Of the neurons kept by at least ``min_share`` of the secrets (at
    least one), return the ``z`` most frequent as ``(layer, neuron)``; ties in frequency are
    broken by the summed relative score ``Σ score / max`` over the secrets that keep it,
    then by position (row-major)."""
    from ..methods.depn import DEPNHParams, aggregate

    hp = DEPNHParams(threshold=threshold, min_share=min_share, neurons=z)
    return aggregate(scores, layers, hp)


def _aggregate_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(9)
    cases = []
    for n_secrets, layers, d, threshold, share, z in (
        (4, [3, 4, 5], 8, 0.3, 0.0, 6),
        (5, [10, 12], 10, 0.2, 0.5, 5),
        (3, [0, 1, 2, 3], 5, 0.5, 0.0, 4),
    ):
        shared = torch.rand(len(layers), d, generator=g) ** 3  # some neurons carry every secret
        scores = []
        for s in range(n_secrets):
            own = torch.rand(len(layers), d, generator=g) ** 4 - 0.2
            scale = 10.0 ** (s - 1)  # secrets on very different scales
            scores.append(scale * (shared * (torch.rand(1, generator=g) + 0.5) + own))
        cases.append((scores, layers, threshold, share, z))
    # few neurons shared by most secrets, z larger than their number: min_share decides
    layers, d = [6, 7], 6
    scores = []
    for s in range(5):
        m = torch.rand(len(layers), d, generator=g) * 0.1
        m[0, 2] = m[1, 4] = 1.0  # carried by every secret
        m[s % 2, (s * 3) % d] = 0.9  # and one of its own
        scores.append(m)
    cases.append((scores, layers, 0.5, 0.6, 8))
    return cases


def _agg(
    scores,
    layers,
    threshold,
    share,
    z,
    *,
    per_secret=True,
    by="count",
    layer_ids=True,
    use_share=True,
    use_threshold=True,
):
    count = torch.zeros_like(scores[0])
    weight = torch.zeros_like(scores[0])
    total = torch.zeros_like(scores[0])
    top_all = max(float(s.max()) for s in scores)
    for s in scores:
        top = float(s.max()) if per_secret else top_all
        if top <= 0:
            continue
        kept = s >= threshold * top if use_threshold else s > 0
        count += kept
        weight += torch.where(kept, s / top, 0.0)
        total += torch.where(kept, s, 0.0)
    need = max(1e-9, share * len(scores)) if use_share else 1e-9
    eligible = count >= need
    key = {"count": count * 1e6 + weight, "raw": total, "count_only": count}[by]
    key = torch.where(eligible, key, -1.0).flatten()
    n = min(z, int(eligible.sum()))
    idx = torch.argsort(key, descending=True, stable=True)[:n]
    d = scores[0].shape[1]
    return [((layers[int(i) // d] if layer_ids else int(i) // d), int(i) % d) for i in idx]


_AGGREGATE_MISTAKES: list[tuple[Callable, str]] = [
    (
        lambda *a: _agg(*a, per_secret=False),
        "the threshold is relative to EACH secret's own maximum (threshold × max of that "
        "secret's map), not to the maximum over all secrets: attributions of different "
        "secrets live on different scales, and a global max lets one secret decide for all.",
    ),
    (
        lambda *a: _agg(*a, by="raw"),
        "rank the neurons by FREQUENCY, the number of secrets that keep them: DEPN looks for "
        "neurons shared by many secrets; summed raw scores let one secret with large "
        "attributions dominate.",
    ),
    (
        lambda *a: _agg(*a, by="count_only"),
        "ties in frequency are broken by the summed relative score (Σ score/max over the "
        "secrets keeping the neuron), not by the neuron's position.",
    ),
    (
        lambda *a: _agg(*a, layer_ids=False),
        "return the layer NUMBER: row j of a score map belongs to layers[j], not to layer j.",
    ),
    (
        lambda *a: _agg(*a, use_share=False),
        "keep only the neurons kept by at least min_share of the secrets (count ≥ min_share × "
        "number of secrets) before ranking.",
    ),
    (
        lambda *a: _agg(*a, use_threshold=False),
        "a secret keeps only the neurons with score ≥ threshold × its max, not every "
        "neuron with a positive score.",
    ),
]


def check_aggregate_neurons(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(scores, layers, threshold, min_share, z) -> [(layer, neuron), ...]``,
    DEPN's privacy-neuron aggregator (:func:`reference_aggregate_neurons`)."""
    from ..methods.depn import aggregate

    name = "aggregate_neurons"
    refused = _refuse(name, fn, (reference_aggregate_neurons, aggregate))
    if refused is not None:
        return report(refused, raise_on_fail)
    cases = _aggregate_cases()
    answers = []
    for scores, layers, threshold, share, z in cases:
        out, failed = call_answer(
            name, fn, [s.clone() for s in scores], list(layers), threshold, share, z
        )
        if failed is not None:
            return report(failed, raise_on_fail)
        try:
            answers.append([(int(la), int(i)) for la, i in out])
        except (TypeError, ValueError):
            return report(
                CheckResult(False, f"{name}: return a list of (layer, neuron) pairs, got {out!r}."),
                raise_on_fail,
            )
    expected = [reference_aggregate_neurons(*case) for case in cases]
    if answers == expected:
        return report(
            CheckResult(True, f"{name}: correct on all {len(cases)} cases."), raise_on_fail
        )
    for broken, hint in _AGGREGATE_MISTAKES:
        if all(a == broken(*case) for a, case in zip(answers, cases)):
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if a != e)
    if sorted(answers[i]) == sorted(expected[i]):
        hint = "the right neurons in the wrong order: most frequent first, ties by Σ score/max."
    else:
        hint = f"expected {expected[i]}, got {answers[i]}."
    return report(CheckResult(False, f"{name}: case {i}: {hint}"), raise_on_fail)


add_solution(
    "5.5",
    """def aggregate_neurons(scores, layers, threshold, min_share, z):
    count = torch.zeros_like(scores[0])    # how many secrets keep each neuron
    weight = torch.zeros_like(scores[0])   # the tie-break: summed relative score
    for s in scores:
        top = float(s.max())
        if top <= 0:
            continue                       # nothing attributed: this secret keeps nothing
        kept = s >= threshold * top        # relative to THIS secret's maximum
        count += kept
        weight += torch.where(kept, s / top, 0.0)
    eligible = count >= max(1e-9, min_share * len(scores))
    key = torch.where(eligible, count * 1e6 + weight, -1.0).flatten()
    order = torch.argsort(key, descending=True, stable=True)[: min(z, int(eligible.sum()))]
    d = scores[0].shape[1]
    return [(layers[int(i) // d], int(i) % d) for i in order]""",
)
