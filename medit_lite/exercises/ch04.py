"""Chapter 4 exercises: ROME's rank-one update, and one restoration of causal tracing.

References: :func:`medit_lite.methods.rome.rank_one_update` (ROME Eq. 2, Meng et al.
2022) and the restoration hook of :mod:`medit_lite.analysis.tracing` (§2 of the paper).
"""

from __future__ import annotations

import torch

from ..methods.rome import rank_one_update
from .check import CheckResult, call_answer, refusal, report


# -- exercise 1: the rank-one update ---------------------------------------------------------
def _rank_one_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(4)
    cases = []
    for d_out, d_in, n in ((3, 4, 20), (5, 7, 40), (2, 6, 9)):
        W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        K = (
            torch.randn(d_in, n, generator=g, dtype=torch.float64)
            * torch.linspace(0.2, 3, d_in, dtype=torch.float64)[:, None]
        )
        C = K @ K.T / n
        k = torch.randn(d_in, generator=g, dtype=torch.float64)
        v = torch.randn(d_out, generator=g, dtype=torch.float64)
        cases.append((W, C, k, v))
    return cases


_RANK_ONE_MISTAKES = [
    (
        lambda W, C, k, v: torch.outer(v - W @ k, k) / (k @ k),
        "you left C out: the direction must be C⁻¹k (use torch.linalg.solve(C, k)), so the "
        "update avoids the directions that the layer's usual keys occupy.",
    ),
    (
        lambda W, C, k, v: (
            torch.outer(v, torch.linalg.solve(C, k)) / (torch.linalg.solve(C, k) @ k)
        ),
        "the residual is v − W k (what is missing), not v: W already maps k to W k.",
    ),
    (
        lambda W, C, k, v: torch.outer(v - W @ k, torch.linalg.solve(C, k)),
        "divide by (C⁻¹k)ᵀk so that (W + ΔW) k equals v exactly.",
    ),
    (
        lambda W, C, k, v: torch.outer(v - W @ k, C @ k) / ((C @ k) @ k),
        "that multiplies by C; the update uses the inverse, C⁻¹k.",
    ),
]


def check_rank_one_update(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(W, C, k, v) -> ΔW``: the change of W (d_out × d_in) with the least effect
    on keys distributed with second moment C such that (W + ΔW) k = v."""
    name = "rank_one_update"
    refused = refusal(name, fn, (rank_one_update,))
    if refused is not None:
        return report(refused, raise_on_fail)
    for i, (W, C, k, v) in enumerate(_rank_one_cases()):
        out, fail = call_answer(name, fn, W.clone(), C.clone(), k.clone(), v.clone())
        if fail is not None:
            return report(fail, raise_on_fail)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(W.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return report(
                CheckResult(
                    False, f"{name}: return a tensor shaped like W {tuple(W.shape)}, got {shape}."
                ),
                raise_on_fail,
            )
        expected = rank_one_update(W, C, k, v)
        if not torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-8):
            for broken, hint in _RANK_ONE_MISTAKES:
                if torch.allclose(out.double(), broken(W, C, k, v), rtol=1e-5, atol=1e-8):
                    return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
            stored = torch.allclose((W + out.double()) @ k, v, atol=1e-6)
            hint = (
                "(W + ΔW) k = v holds, but this is not the update that disturbs the other "
                "keys least."
                if stored
                else "(W + ΔW) k ≠ v: the new key does not map to the new value."
            )
            return report(CheckResult(False, f"{name}: case {i} differs. {hint}"), raise_on_fail)
    return report(CheckResult(True, f"{name}: correct on all 3 cases."), raise_on_fail)


# -- exercise 2: one restoration ------------------------------------------------------------
def reference_restore(corrupted: torch.Tensor, clean: torch.Tensor, token: int) -> torch.Tensor:
    """The corrupted hidden states [batch, tokens, d] with position ``token`` of every row
    set back to the clean run's state ``clean`` [tokens, d]; the input is not modified."""
    out = corrupted.clone()
    out[:, token] = clean[token]
    return out


def _restore_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(3, 6, 4, generator=g), torch.randn(6, 4, generator=g), 2),
        (torch.randn(1, 5, 3, generator=g), torch.randn(5, 3, generator=g), 4),
        (torch.randn(4, 7, 2, generator=g), torch.randn(7, 2, generator=g), -1),
    ]


_RESTORE_MISTAKES = [
    (lambda c, k, t: k.expand_as(c).clone(), "restore ONE position, not the whole sequence."),
    (lambda c, k, t: c.clone(), "nothing was restored: set position `token` to the clean state."),
    (
        lambda c, k, t: (
            torch.cat([c[:, :t], k[t:].expand(c.shape[0], -1, -1)], 1) if t >= 0 else c.clone()
        ),
        "restore only position `token`, not every position from it on.",
    ),
]


def check_restore(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(corrupted, clean, token) -> patched``, the restoration at one token used
    as a forward hook in causal tracing."""
    name = "restore"
    refused = refusal(name, fn, (reference_restore,))
    if refused is not None:
        return report(refused, raise_on_fail)
    for i, (corrupted, clean, token) in enumerate(_restore_cases()):
        original = corrupted.clone()
        out, fail = call_answer(name, fn, corrupted, clean, token)
        if fail is not None:
            return report(fail, raise_on_fail)
        if not isinstance(out, torch.Tensor) or out.shape != corrupted.shape:
            return report(
                CheckResult(
                    False,
                    f"{name}: return a tensor shaped like `corrupted` {tuple(corrupted.shape)}.",
                ),
                raise_on_fail,
            )
        expected = reference_restore(original, clean, token)
        if not torch.equal(out, expected):
            for broken, hint in _RESTORE_MISTAKES:
                try:
                    wrong = broken(original, clean, token)
                except Exception:  # noqa: BLE001 - a hint that does not apply
                    continue
                if wrong.shape == out.shape and torch.equal(out, wrong):
                    return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
            return report(
                CheckResult(
                    False, f"{name}: case {i} (token={token}) differs from the expected states."
                ),
                raise_on_fail,
            )
        if not torch.equal(corrupted, original):
            return report(
                CheckResult(
                    False,
                    f"{name}: the input was modified in place; clone it first "
                    "(a hook's input may still be needed by the rest of the network).",
                ),
                raise_on_fail,
            )
    return report(CheckResult(True, f"{name}: correct on all 3 cases."), raise_on_fail)
