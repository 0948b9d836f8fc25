"""Chapter 4 exercises: ROME's rank-one update, one restoration of causal tracing, and the
build task: MEMIT's spreading of the residual over the edited layers.

References: :func:`medit_lite.methods.rome.rank_one_update` (ROME Eq. 2, Meng et al.
2022), the restoration hook of :mod:`medit_lite.analysis.tracing` (§2 of the paper) and
:func:`medit_lite.methods.locate_edit.spread_update` (MEMIT's Alg. 1, Meng et al., 2023),
here on a small residual stack (:class:`ToyStack`). Solutions: ``show_solution("4.1")``,
``"4.2"``, ``"4.4"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..methods.locate_edit import least_squares_update, spread_update
from ..methods.rome import rank_one_update
from .check import CheckResult, add_solution, call_answer, refusal, report, show_solution

__all__ = ["ToyStack", "show_solution"]  # re-exported: ``ch04.show_solution("4.1")``


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


add_solution(
    "4.1",
    """def my_rank_one_update(W, C, k, v):
    u = torch.linalg.solve(C, k)              # C^-1 k: the direction of the update
    return torch.outer(v - W @ k, u) / (u @ k)  # scaled so that (W + dW) k = v exactly""",
)
add_solution(
    "4.2",
    """def my_restore(corrupted, clean, token):
    out = corrupted.clone()      # never modify a hook's input in place
    out[:, token] = clean[token]  # every row of the batch gets the clean state at `token`
    return out""",
)


# -- exercise 4.4 (build): MEMIT's residual spreading ----------------------------------------
class ToyStack:
    """A small residual stack with MEMIT's vocabulary, for exercise 4.4.

    The residual stream of ``n`` inputs (columns of ``X``, ``d × n``) passes ``n_layers``
    layers, each adding an MLP's output: ``k_l = tanh(A_l h)`` (the MLP's hidden
    activation, the *key* of layer ``l``, ``d_in`` wide) and ``h ← h + W_l k_l``, where
    ``W_l`` (``d × d_in``) is the MLP's output matrix that MEMIT edits.

    * ``net.W[l]``: the output matrix of layer ``l`` (float64); change it in place;
    * ``net.C[l]``: the second moment of layer ``l``'s keys over ordinary text (``d_in × d_in``);
    * ``net.keys(l)``: the keys ``K`` (``d_in × n``) of layer ``l``, with the current weights;
    * ``net.output(l)``: the residual stream after layer ``l`` (``d × n``), current weights.
    """

    def __init__(self, d: int = 4, d_in: int = 6, n_layers: int = 5, n: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.X = torch.randn(d, n, generator=g, dtype=f64)
        self.A = [torch.randn(d_in, d, generator=g, dtype=f64) / d**0.5 for _ in range(n_layers)]
        self.W = {l: torch.randn(d, d_in, generator=g, dtype=f64) * 0.3 for l in range(n_layers)}
        self.C = {}
        for l in range(n_layers):  # keys of 200 ordinary inputs, not the edited ones
            k = torch.tanh(self.A[l] @ torch.randn(d, 200, generator=g, dtype=f64))
            self.C[l] = k @ k.T / 200
        self.n_layers = n_layers

    def _run(self, upto: int, keys: bool) -> torch.Tensor:
        h = self.X.clone()
        for l in range(self.n_layers):
            k = torch.tanh(self.A[l] @ h)
            if keys and l == upto:
                return k
            h = h + self.W[l] @ k
            if not keys and l == upto:
                return h
        raise IndexError(f"layer {upto} is outside the stack's {self.n_layers} layers")

    def keys(self, layer: int) -> torch.Tensor:
        """``K`` (``d_in × n``): the keys of ``layer`` with the current weights."""
        return self._run(layer, keys=True)

    def output(self, layer: int) -> torch.Tensor:
        """``H`` (``d × n``): the residual stream after ``layer`` with the current weights."""
        return self._run(layer, keys=False)


def reference_spread(net, layers: Sequence[int], Z: torch.Tensor, lam: float) -> dict:
    """MEMIT's Alg. 1, step 2, on ``net`` (:class:`ToyStack` or anything with its
    attributes), in place: for each layer ``l`` of ``layers``, lowest first, the keys
    ``K`` at ``l`` (with the layers below already updated), the residual still missing at
    the top layer's output ``R = (Z − H) / (layers left)``, and
    ``ΔW = R Kᵀ (λ C_l + K Kᵀ)⁻¹`` added to ``W_l``. Returns ``{l: ΔW}``.

    The steps of :func:`medit_lite.methods.locate_edit.spread_update` (which reads keys
    and outputs from a real model); ``tests/test_exercises_ch04.py`` runs both on a tiny
    model and compares the weights.
    """
    top = layers[-1]
    updates = {}
    for i, layer in enumerate(layers):
        K = net.keys(layer)
        R = (Z - net.output(top)) / (len(layers) - i)
        update = least_squares_update(K, R, net.C[layer], lam)
        net.W[layer] += update.to(net.W[layer].dtype)
        updates[layer] = update
    return updates


def _spread_cases() -> list[tuple]:
    """(seed, layers, lam): each case builds a fresh stack and targets Z near its output."""
    return [(0, (1, 2, 3), 0.5), (1, (0, 1, 2, 3, 4), 2.0), (2, (2, 4), 1.0)]


def _case(seed, layers, lam):
    net = ToyStack(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    Z = net.output(layers[-1]) + torch.randn(*net.X.shape, generator=g, dtype=torch.float64)
    return net, tuple(layers), Z, lam


def _solve(K, R, C, lam):
    return R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)


def _loop(net, layers, Z, lam, *, stale_h=False, stale_k=False, share="left", apply=True, C=True):
    top = layers[-1]
    H0 = net.output(top)
    K0 = {layer: net.keys(layer) for layer in layers}
    out = {}
    for i, layer in enumerate(layers):
        K = K0[layer] if stale_k else net.keys(layer)
        R = Z - (H0 if stale_h else net.output(top))
        R = R / {"left": len(layers) - i, "even": len(layers), "all": 1}[share]
        eye = torch.eye(K.shape[0], dtype=K.dtype)
        update = _solve(K, R, net.C[layer] if C else eye, lam)
        if apply:
            net.W[layer] += update
        out[layer] = update
    return out


def _top_first(net, layers, Z, lam):
    top = layers[-1]
    out = {}
    for i, layer in enumerate(reversed(layers)):
        K = net.keys(layer)
        R = (Z - net.output(top)) / (len(layers) - i)
        out[layer] = _solve(K, R, net.C[layer], lam)
        net.W[layer] += out[layer]
    return out


_SPREAD_MISTAKES: list[tuple[Callable, str]] = [
    (
        lambda *a: _loop(*a, apply=False),
        "each layer's ΔW must be added to net.W[l] before the next layer is computed: the "
        "layers above read keys, and the top layer's output, that the update below changed.",
    ),
    (
        lambda *a: _loop(*a, stale_h=True),
        "the residual is recomputed at every layer, R = Z − H with H the top layer's output "
        "under the CURRENT weights: what the layers below already wrote is no longer missing.",
    ),
    (
        lambda *a: _loop(*a, stale_k=True),
        "read each layer's keys when its turn comes (net.keys(l) inside the loop): the "
        "updates of the layers below change the keys of the layers above.",
    ),
    (
        lambda *a: _loop(*a, share="even"),
        "divide the residual by the number of layers LEFT (L − i), not by all L layers: the "
        "residual is recomputed, so 1/L of it each time leaves most of it unwritten.",
    ),
    (
        lambda *a: _loop(*a, share="all"),
        "the whole residual went into the lowest layer: MEMIT spreads it, layer l takes "
        "1/(layers left) of what is still missing.",
    ),
    (
        _top_first,
        "visit the layers lowest first: an update changes the keys of every layer above it, "
        "so the upper layers must be solved after (and with) the lower ones' changes.",
    ),
    (
        lambda *a: _loop(*a, C=False),
        "λ multiplies C_l, the second moment of the layer's usual keys (net.C[l]), not the "
        "identity: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ avoids the directions ordinary text uses.",
    ),
]


def _same_updates(a, b) -> bool:
    return a.keys() == b.keys() and all(
        isinstance(a[k], torch.Tensor)
        and a[k].shape == b[k].shape
        and torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=1e-9)
        for k in b
    )


def check_memit_spread(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(net, layers, Z, lam) -> {layer: ΔW}``, MEMIT's spreading of the residual
    over ``layers`` on a :class:`ToyStack` (see :func:`reference_spread`)."""
    name = "memit_spread"
    refused = refusal(name, fn, (reference_spread, spread_update, least_squares_update))
    if refused is not None:
        return report(refused, raise_on_fail)
    cases = _spread_cases()
    answers = []
    for case in cases:
        net, layers, Z, lam = _case(*case)
        out, failed = call_answer(name, fn, net, layers, Z.clone(), lam)
        if failed is not None:
            return report(failed, raise_on_fail)
        if not isinstance(out, dict) or set(out) != set(layers):
            return report(
                CheckResult(
                    False, f"{name}: return a dict {{layer: ΔW}} for the layers {list(layers)}."
                ),
                raise_on_fail,
            )
        answers.append((out, {layer: net.W[layer].clone() for layer in layers}))
    results = []
    for case in cases:
        net, layers, Z, lam = _case(*case)
        results.append((reference_spread(net, layers, Z, lam), net))
    if all(_same_updates(a, e) for (a, _), (e, _) in zip(answers, results)):
        if all(
            _same_updates(w, {layer: net.W[layer] for layer in w})
            for (_, w), (_, net) in zip(answers, results)
        ):
            return report(
                CheckResult(True, f"{name}: correct on all {len(cases)} cases."), raise_on_fail
            )
        return report(
            CheckResult(
                False,
                f"{name}: the updates are right, but net.W does not hold them: add each ΔW "
                "to net.W[l] (in place).",
            ),
            raise_on_fail,
        )
    for broken, hint in _SPREAD_MISTAKES:
        if all(_same_updates(a, broken(*_case(*case))) for (a, _), case in zip(answers, cases)):
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    i = next(
        i for i, ((a, _), (e, _)) in enumerate(zip(answers, results)) if not _same_updates(a, e)
    )
    layer = next(
        k for k in results[i][0] if not _same_updates({k: answers[i][0][k]}, {k: results[i][0][k]})
    )
    return report(
        CheckResult(
            False,
            f"{name}: case {i} (layers {list(cases[i][1])}): ΔW of layer {layer} differs first. "
            "Per layer, lowest first: K = net.keys(l), R = (Z − net.output(top)) / (layers "
            "left), ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, net.W[l] += ΔW.",
        ),
        raise_on_fail,
    )


add_solution(
    "4.4",
    """def memit_spread(net, layers, Z, lam):
    top = layers[-1]
    updates = {}
    for i, l in enumerate(layers):                   # lowest layer first
        K = net.keys(l)                              # keys with the layers below updated
        R = (Z - net.output(top)) / (len(layers) - i)  # what is still missing, shared out
        A = lam * net.C[l] + K @ K.T                 # λC + K Kᵀ (symmetric)
        dW = torch.linalg.solve(A, K @ R.T).T        # R Kᵀ (λC + K Kᵀ)⁻¹
        net.W[l] += dW                               # the next layers see this change
        updates[l] = dW
    return updates""",
)
