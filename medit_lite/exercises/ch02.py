"""Chapter 2 exercises (editing without touching the weights, and the classic methods).

Each exercise has a checker ``check_*`` that runs a student's function against the
package's reference on several cases and explains recognised mistakes, and a solution
printed by ``show_solution(name)``. Exercises of this module:

* ``"grace"``: GRACE's deferral decision (Hartvigsen et al., 2023, Eq. 1), reference
  :func:`medit_lite.methods.grace.deferral`; checker :func:`check_grace_layer_output`.
* ``"serac"``: SERAC's scope decision from similarity scores (Mitchell et al., 2022),
  reference :func:`medit_lite.methods.serac.route_decision`; checker
  :func:`check_serac_route`.
* ``"mend"``: MEND's rank-one decomposition of a linear layer's gradient (Mitchell et al.,
  2022, §3.1), reference :func:`reference_mend_gradient`; checker
  :func:`check_mend_gradient`.
* ``"codebook"`` (the build task of section 2.1): GRACE's codebook update for a new edit,
  add, split or expand (Hartvigsen et al., 2023, Alg. 1), reference
  :func:`reference_codebook_update` (:func:`medit_lite.methods.grace.update_codebook`);
  checker :func:`check_codebook_update`.
* ``"ig"``: the integrated-gradients Riemann sum of knowledge neurons (Dai et al., 2022,
  Eq. 4), reference :func:`reference_integrated_gradients`; checker
  :func:`check_integrated_gradients`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods.grace import deferral
from .check import CheckResult, add_solution, call_answer, refusal, report, show_solution

__all__ = ["show_solution"]  # re-exported: ``ch02.show_solution("grace")``


# -- exercise "grace": GRACE's deferral decision --------------------------------------------
def reference_grace_layer_output(
    query: torch.Tensor,
    keys: torch.Tensor,
    eps: torch.Tensor,
    values: torch.Tensor,
    layer_out: torch.Tensor,
) -> torch.Tensor:
    """What a GRACE-wrapped layer returns for each query row (Eq. 1): the value of the
    nearest key when the query lies within *that key's* radius (``d ≤ ε``), else the
    layer's own output. Shapes: query ``[N, d]``, keys ``[n, d]``, eps ``[n]``, values
    ``[n, d_out]``, layer_out ``[N, d_out]``."""
    use, nearest, _ = deferral(query, keys, eps)
    return torch.where(use[:, None], values[nearest], layer_out)


def _grace_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(2)
    cases = []
    # 1: hand-made, in 2-D: key A at the origin (ε 1), key B at (4, 0) with a wide ε 3.5
    keys = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    eps = torch.tensor([1.0, 3.5])
    query = torch.tensor(
        [
            [0.5, 0.0],  # nearest A, inside: A's value
            [1.8, 0.0],  # nearest A (1.8 < 2.2), outside A's ε, but inside B's: defer
            [3.0, 4.0],  # 5 from A, 4.12 from B: nearest B, outside its ε 3.5: defer
            [4.0, 3.5],  # nearest B at exactly ε: B's value (≤)
            [0.0, 0.6],  # nearest A, inside
            [4.0, -2.0],  # nearest B at 2, inside B's ε (but 2² > 3.5)
            [5.5, 0.0],  # nearest B at 1.5, inside B's ε (but 1.5 > A's ε)
        ]
    )
    values = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])
    layer_out = torch.arange(21, dtype=torch.float32).reshape(7, 3) / 10
    cases.append((query, keys, eps, values, layer_out))
    # 2: random, radii from the key spacing, queries around the keys
    keys = torch.randn(5, 8, generator=g) * 3
    eps = torch.tensor([0.5, 1.5, 2.0, 0.8, 3.0])
    near = keys[torch.arange(12) % 5] + torch.randn(12, 8, generator=g) * 0.5
    values = torch.randn(5, 4, generator=g)
    cases.append((near, keys, eps, values, torch.randn(12, 4, generator=g)))
    return cases


def _any_ball(query, keys, eps, values, layer_out):
    dist = torch.cdist(query, keys)
    inside = dist <= eps[None]
    first = torch.where(inside, dist, torch.full_like(dist, float("inf"))).argmin(-1)
    return torch.where(inside.any(-1)[:, None], values[first], layer_out)


def _one_eps(query, keys, eps, values, layer_out):
    d, i = torch.cdist(query, keys).min(-1)
    return torch.where((d <= eps[0])[:, None], values[i], layer_out)


def _inverted(query, keys, eps, values, layer_out):
    d, i = torch.cdist(query, keys).min(-1)
    return torch.where((d > eps[i])[:, None], values[i], layer_out)


def _strict(query, keys, eps, values, layer_out):
    d, i = torch.cdist(query, keys).min(-1)
    return torch.where((d < eps[i])[:, None], values[i], layer_out)


def _squared(query, keys, eps, values, layer_out):
    d, i = torch.cdist(query, keys).min(-1)
    return torch.where((d**2 <= eps[i])[:, None], values[i], layer_out)


_GRACE_MISTAKES: list[tuple[Callable, str]] = [
    (
        _any_ball,
        "you answered whenever the query lies in *any* key's ball. GRACE looks only at the "
        "nearest key (argmin of the distance) and uses that key's radius: a query nearest to "
        "key A but outside A's ball defers, even if a farther key's wide ball covers it.",
    ),
    (
        _one_eps,
        "every key has its own radius ε_i (splitting and expanding change them one by one): "
        "compare with eps[nearest], not one ε for all keys.",
    ),
    (
        _inverted,
        "the decision is inverted: the codebook answers *inside* the radius (d ≤ ε) and the "
        "layer answers outside it (deferral).",
    ),
    (
        _strict,
        "a query exactly at distance ε is inside the ball: GRACE's code tests d ≤ ε, not d < ε.",
    ),
    (
        _squared,
        "ε is a Euclidean distance: compare the distance itself (not its square) with ε.",
    ),
]


def check_grace_layer_output(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(query, keys, eps, values, layer_out) -> output``, GRACE's Eq. 1 per row."""
    name = "grace_layer_output"
    refused = refusal(name, fn, (reference_grace_layer_output, deferral))
    if refused is not None:
        return report(refused, raise_on_fail)
    for i, args in enumerate(_grace_cases()):
        copies = tuple(a.clone() for a in args)
        out, failed = call_answer(name, fn, *copies)
        if failed is not None:
            return report(failed, raise_on_fail)
        expected = reference_grace_layer_output(*args)
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return report(
                CheckResult(
                    False,
                    f"{name}: return one row per query, shaped like layer_out "
                    f"{tuple(expected.shape)}; got {shape}.",
                ),
                raise_on_fail,
            )
        if not torch.allclose(out.float(), expected, atol=1e-6):
            for broken, hint in _GRACE_MISTAKES:
                if torch.allclose(out.float(), broken(*args), atol=1e-6):
                    return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
            rows = (~torch.isclose(out.float(), expected, atol=1e-6).all(-1)).nonzero().flatten()
            return report(
                CheckResult(
                    False,
                    f"{name}: case {i}, query row(s) {rows.tolist()} differ: for each query find "
                    "the nearest key, then answer with its value only if the distance is ≤ its ε.",
                ),
                raise_on_fail,
            )
    return report(CheckResult(True, f"{name}: correct on all {i + 1} cases."), raise_on_fail)


add_solution(
    "grace",
    """def grace_layer_output(query, keys, eps, values, layer_out):
    dist = torch.cdist(query, keys)              # [N, n] Euclidean distances
    d, nearest = dist.min(-1)                     # the nearest key of each query
    inside = d <= eps[nearest]                    # within THAT key's radius
    return torch.where(inside[:, None], values[nearest], layer_out)""",
)


# -- exercise "serac": SERAC's scope decision from similarity scores ------------------------
def reference_serac_route(scores, threshold: float = 0.5) -> int:
    """SERAC's routing rule for one input (Mitchell et al., 2022, §3): ``scores[k]`` is the
    scope classifier's ``s(z_k, x)`` for each stored edit; return the index of the edit
    with the highest score if that score is strictly above ``threshold``, else ``-1``
    (the base model answers). An empty memory routes nothing."""
    from ..methods.serac import route_decision

    if len(scores) == 0:
        return -1
    return int(route_decision(torch.tensor([list(scores)], dtype=torch.float32), threshold)[0])


_SERAC_CASES = [
    ([0.6, 0.9, 0.1], 0.5),  # two edits in scope: the best one is retrieved
    ([0.1, 0.3, 0.2], 0.5),  # nothing in scope: the base model
    ([0.5, 0.4], 0.5),  # exactly at the threshold: not in scope (strict >)
    ([0.7, 0.2, 0.3], 0.5),
    ([0.9, 0.1, 0.1], 0.5),  # one strong match among weak ones
    ([0.95, 0.97], 0.96),
    ([0.3], 0.2),
    ([], 0.5),  # empty memory
]


def _first_above(scores, threshold):
    return next((k for k, s in enumerate(scores) if s > threshold), -1)


def _always(scores, threshold):
    return max(range(len(scores)), key=lambda k: scores[k]) if scores else -1


def _at_least(scores, threshold):
    if not scores:
        return -1
    k = max(range(len(scores)), key=lambda k: scores[k])
    return k if scores[k] >= threshold else -1


def _as_distance(scores, threshold):
    if not scores:
        return -1
    k = min(range(len(scores)), key=lambda k: scores[k])
    return k if scores[k] < threshold else -1


def _mean(scores, threshold):
    if not scores:
        return -1
    k = max(range(len(scores)), key=lambda k: scores[k])
    return k if sum(scores) / len(scores) > threshold else -1


_SERAC_MISTAKES: list[tuple[Callable, str]] = [
    (
        _first_above,
        "you returned the FIRST edit above the threshold. SERAC retrieves the edit with the "
        "highest score (argmax over the memory) and then tests that one against the threshold.",
    ),
    (
        _always,
        "every input is routed: the threshold is missing. When even the best score is low, "
        "the input is out of scope and the untouched base model answers (return -1).",
    ),
    (
        _at_least,
        "a score exactly at the threshold is not in scope: the paper's code routes when "
        "cls_sims > 0.5 (strictly greater).",
    ),
    (
        _as_distance,
        "these are similarities s = exp(−distance) in [0, 1], high = in scope; you treated "
        "them as distances (argmin, below the threshold).",
    ),
    (
        _mean,
        "decide on the best edit's score, not on the average over the memory: one matching "
        "edit is enough, however many unrelated edits are stored.",
    ),
]


def check_serac_route(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(scores, threshold) -> int``: SERAC's scope decision for one input."""
    from ..methods.serac import route_decision
    from .check import run_check

    refused = refusal("serac_route", fn, (reference_serac_route, route_decision))
    if refused is not None:
        return report(refused, raise_on_fail)
    return run_check(
        "serac_route",
        fn,
        reference_serac_route,
        _SERAC_CASES,
        _SERAC_MISTAKES,
        raise_on_fail,
    )


add_solution(
    "serac",
    """def serac_route(scores, threshold=0.5):
    if len(scores) == 0:
        return -1                                   # nothing stored: base model
    best = max(range(len(scores)), key=lambda k: scores[k])   # retrieve: argmax_k s(z_k, x)
    return best if scores[best] > threshold else -1           # route only when s > threshold""",
)


# -- exercises "mend" and "ig" (section 2.2): shared tensor checker --------------------------
def _check_tensors(name, fn, reference, cases, mistakes, advice, refuse, raise_on_fail):
    """Run ``fn`` on each case against ``reference`` (tensors, compared with a tolerance);
    name a recognised mistake when the answers match it on every case."""
    refused = refusal(name, fn, refuse)
    if refused is not None:
        return report(refused, raise_on_fail)
    answers = []
    for args in cases:
        out, failed = call_answer(name, fn, *args)
        if failed is not None:
            return report(failed, raise_on_fail)
        answers.append(out)
    expected = [reference(*args) for args in cases]

    def same(a, b):
        return (
            isinstance(a, torch.Tensor)
            and a.shape == b.shape
            and torch.allclose(a.detach().float(), b.float(), rtol=1e-4, atol=1e-6)
        )

    if all(same(a, e) for a, e in zip(answers, expected)):
        return report(
            CheckResult(True, f"{name}: correct on all {len(cases)} cases."), raise_on_fail
        )
    for broken, hint in mistakes:
        if all(same(a, broken(*args)) for a, args in zip(answers, cases)):
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if not same(a, e))
    got = tuple(answers[i].shape) if isinstance(answers[i], torch.Tensor) else type(answers[i])
    return report(
        CheckResult(
            False,
            f"{name}: case {i} differs (expected shape {tuple(expected[i].shape)}, got {got}). "
            + advice,
        ),
        raise_on_fail,
    )


# -- exercise "mend": the rank-one decomposition of a linear layer's gradient -----------------
def reference_mend_gradient(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """MEND's identity (Mitchell et al., 2022, §3.1): for ``h_t = W u_t`` over a sequence,
    ``∇_W L = Σ_t δ_t u_tᵀ`` with ``δ_t = ∂L/∂h_t``. ``u`` is [T, d_in], ``delta`` [T, d_out];
    the result is shaped like ``W``, [d_out, d_in]."""
    return delta.T @ u


def _mend_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(1, 4, generator=g), torch.randn(1, 3, generator=g)),
        (torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)),
        (torch.randn(7, 3, generator=g), torch.randn(7, 5, generator=g)),
    ]


_MEND_MISTAKES = [
    (
        lambda u, d: u.T @ d,
        "the result is shaped (d_in, d_out); W maps u to h, so it is (d_out, d_in): δ uᵀ.",
    ),
    (
        lambda u, d: d[-1:].T @ u[-1:],
        "only the last token counted: the gradient sums δ_t u_tᵀ over every token t.",
    ),
    (
        lambda u, d: d.T @ u / u.shape[0],
        "a mean over tokens: the loss sums over positions, so does its gradient.",
    ),
    (
        lambda u, d: d.sum(0)[:, None] @ u.sum(0)[None],
        "the outer product of the sums (Σδ)(Σu)ᵀ is not the sum of the outer products Σ δ_t u_tᵀ.",
    ),
]


def check_mend_gradient(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(u, delta) -> ∇W``, MEND's rank-one decomposition; the cases are also
    checked against autograd in ``tests/test_exercises_ch02.py``."""
    return _check_tensors(
        "mend_gradient",
        fn,
        reference_mend_gradient,
        _mend_cases(),
        _MEND_MISTAKES,
        "Sum one outer product δ_t u_tᵀ per token.",
        (reference_mend_gradient,),
        raise_on_fail,
    )


add_solution(
    "mend",
    """def mend_gradient(u, delta):
    # one outer product delta_t u_t^T per token, summed: (T, d_out)^T @ (T, d_in)
    return delta.T @ u""",
)


# -- exercise "ig": the integrated-gradients Riemann sum (Dai et al., 2022, Eq. 4) ----------
def reference_integrated_gradients(f, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``Attr(x_i) = (x_i / m) Σ_{k=1}^{m} ∂f((k/m) x) / ∂x_i`` (baseline 0), with all ``m``
    scaled inputs in one batch: ``f`` maps a batch [m, d] to values [m]."""
    alphas = torch.arange(1, steps + 1, dtype=x.dtype) / steps
    scaled = (alphas[:, None] * x[None]).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(scaled).sum(), scaled)
    return x * grad.mean(0)


def _ig_cases() -> list[tuple]:
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def sig(z):
        return torch.sigmoid(z @ w)

    def quad(z):
        return (z**2).sum(-1) + z[:, 0] * z[:, 1]

    def soft(z):
        return torch.softmax(z, -1)[:, 2]

    return [
        (sig, torch.tensor([0.5, 1.0, -1.0, 0.3]), 4),
        (quad, torch.tensor([1.0, -2.0, 3.0]), 5),
        (soft, torch.tensor([0.2, -1.0, 2.0, 0.5, 1.5]), 3),
    ]


def _left_sum(f, x, steps):
    alphas = torch.arange(0, steps, dtype=x.dtype) / steps
    scaled = (alphas[:, None] * x[None]).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(scaled).sum(), scaled)
    return x * grad.mean(0)


def _grad_times_input(f, x, steps):
    z = x[None].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(z).sum(), z)
    return x * grad[0]


def _no_input(f, x, steps):
    return reference_integrated_gradients(f, x, steps) / torch.where(x == 0, 1.0, x)


def _not_averaged(f, x, steps):
    return reference_integrated_gradients(f, x, steps) * steps


_IG_MISTAKES = [
    (_left_sum, "you summed k = 0..m−1 (the left Riemann sum); Eq. 4 uses α = k/m for k = 1..m."),
    (
        _grad_times_input,
        "that is gradient × input at x only: integrate, i.e. average the gradient over α = k/m.",
    ),
    (
        _no_input,
        "the averaged gradient is not yet the attribution: multiply it by x_i (x − baseline).",
    ),
    (_not_averaged, "divide the sum of the m gradients by m (the step of the sum is x/m)."),
]


def check_integrated_gradients(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(f, x, steps) -> attributions`` [d], the Riemann sum of Eq. 4."""
    from ..analysis.attribution import neuron_attributions

    return _check_tensors(
        "integrated_gradients",
        fn,
        reference_integrated_gradients,
        _ig_cases(),
        _IG_MISTAKES,
        "Scale x by α = k/m for k = 1..m in one batch, average the gradients, multiply by x.",
        (reference_integrated_gradients, neuron_attributions),
        raise_on_fail,
    )


add_solution(
    "ig",
    """def integrated_gradients(f, x, steps):
    alphas = torch.arange(1, steps + 1, dtype=x.dtype) / steps   # k/m, k = 1..m
    scaled = (alphas[:, None] * x[None]).requires_grad_(True)    # [m, d], one batch
    (grad,) = torch.autograd.grad(f(scaled).sum(), scaled)       # rows are independent
    return x * grad.mean(0)                                      # (x/m) * sum of gradients""",
)


# -- exercise "codebook" (build, section 2.1): GRACE's codebook update ------------------------
def reference_codebook_update(
    keys: torch.Tensor,
    eps: torch.Tensor,
    labels: list,
    query: torch.Tensor,
    label: tuple,
    eps_init: float,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The codebook after GRACE's rules for a new edit (query ``[d]``, label a tuple of
    target token ids), from ``keys [n, d]``, radii ``eps [n]`` and ``labels`` (one tuple a
    key); returns new ``(keys, eps, labels)``, the inputs unchanged. With ``d`` the distance
    to the nearest key ``i*``: no key, or ``d > ε_init + ε_i*`` → add ``(query, ε_init)``;
    else a different label → add ``(query, d/2)`` and shrink ``ε_i*`` to ``d/2 − 1e-5``
    (split); else the same label → ``ε_i* = max(ε_i*, d)`` (expand, no new key).

    It runs :func:`medit_lite.methods.grace.update_codebook` itself on a
    :class:`~medit_lite.methods.grace.Codebook` holding the given entries.
    """
    from ..methods.grace import Codebook, EditSite, GraceHParams, update_codebook

    d = query.shape[-1]
    book = Codebook(d, 1, query.device, torch.float32)
    for key, radius, lab in zip(keys, eps, labels):
        book.append(key, torch.zeros(1), float(radius), lab)
    site = EditSite(
        ids=None,
        target_ids=torch.tensor(list(label)),
        key_pos=0,
        query=query.float(),
        layer_out=None,
    )
    update_codebook(book, site, torch.zeros(1), GraceHParams(eps=eps_init))
    return book.keys.detach().clone(), book.epsilons.detach().clone(), list(book.labels)


def _codebook_streams() -> list[tuple[list, float]]:
    """Edits (query, label) applied one after another from an empty codebook, and ε_init.
    The first stream, in 2-D, meets every rule (comments: the rule the reference applies)."""
    t = torch.tensor
    a, b = (1,), (2,)
    hand = [
        (t([0.0, 0.0]), a),  # empty: add (ε 1)
        (t([5.0, 0.0]), b),  # d 5 > 1 + 1: add
        (t([0.5, 0.0]), a),  # d 0.5 ≤ ε, same label: expand does nothing (0.5 < 1)
        (t([1.6, 0.0]), a),  # 1 < d 1.6 ≤ 2, same label: expand ε_0 to 1.6
        (t([5.0, 1.5]), a),  # d 1.5 ≤ 2, other label: split ε_1 → 0.75, new key ε 0.75
        (t([0.0, 2.4]), b),  # d 2.4 ≤ 1 + 1.6, other label: split ε_0 → 1.2, new ε 1.2
        (t([9.0, 0.0]), b),  # d 4 > 1 + 0.75: add
    ]
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(4, 6, generator=g) * 2.5
    rand = []
    for i in range(14):
        c = i % 4 if i < 8 else int(torch.randint(0, 4, (1,), generator=g))
        q = centres[c] + torch.randn(6, generator=g) * 0.7
        lab = (c,) if torch.rand(1, generator=g) < 0.7 else (c + 10,)
        rand.append((q, lab))
    return [(hand, 1.0), (rand, 1.5)]


def _codebook_cases() -> list[tuple]:
    """Each step of each stream as one case: (keys, eps, labels, query, label, ε_init),
    the codebook being the reference's after the earlier steps."""
    cases = []
    for stream, eps_init in _codebook_streams():
        d = stream[0][0].shape[0]
        keys, eps, labels = torch.zeros(0, d), torch.zeros(0), []
        for query, label in stream:
            cases.append((keys, eps, labels, query, label, eps_init))
            keys, eps, labels = reference_codebook_update(keys, eps, labels, query, label, eps_init)
    return cases


def _codebook_rule(
    keys,
    eps,
    labels,
    query,
    label,
    eps_init,
    reach=True,
    split=True,
    check_label=True,
    new_eps=None,
    grow_only=True,
):
    keys, eps, labels = keys.clone(), eps.clone(), list(labels)

    def add(r):
        return (
            torch.cat([keys, query[None]]),
            torch.cat([eps, torch.tensor([r])]),
            labels + [tuple(label)],
        )

    if not len(keys):
        return add(eps_init)
    dist = torch.cdist(query[None].float(), keys.float())[0]
    i = int(dist.argmin())
    d = float(dist[i])
    if d > (eps_init + float(eps[i]) if reach else float(eps[i])):
        return add(eps_init)
    if check_label and labels[i] != tuple(label):
        if not split:
            return add(eps_init)
        eps[i] = d / 2 - 1e-5
        return add(d / 2 if new_eps is None else new_eps(d, eps_init))
    if d > float(eps[i]) or not grow_only:
        eps[i] = d
    return keys, eps, labels


_CODEBOOK_MISTAKES: list[tuple[Callable, str]] = [
    (
        lambda *a: _codebook_rule(*a, reach=False),
        "a new key is added only when no ball is within reach, d > ε_init + ε_i*: the new "
        "key's own ball (radius ε_init) counts too. You compared d with ε_i* alone, so a "
        "query just outside the nearest ball got a key of its own instead of expanding it "
        "(or splitting it).",
    ),
    (
        lambda *a: _codebook_rule(*a, split=False),
        "on a conflict (the nearest key's label differs) both radii shrink to d/2, so that "
        "the two balls touch and do not overlap: you added the new key with ε_init and left "
        "the old radius alone, so the balls of two different labels overlap.",
    ),
    (
        lambda *a: _codebook_rule(*a, check_label=False),
        "compare the labels: when the nearest key holds a DIFFERENT label, expanding its ball "
        "would answer the new edit with the old value. That is a conflict: split.",
    ),
    (
        lambda *a: _codebook_rule(*a, new_eps=lambda d, e: e),
        "on a split the new key gets radius d/2 too, not ε_init: otherwise its ball reaches "
        "into the old key's.",
    ),
    (
        lambda *a: _codebook_rule(*a, grow_only=False),
        "expansion only grows a radius: when the query is already inside the ball "
        "(d ≤ ε_i*), nothing changes. You set ε_i* = d and shrank it.",
    ),
]


def _same_book(a, b) -> bool:
    (k1, e1, l1), (k2, e2, l2) = a, b
    return (
        isinstance(k1, torch.Tensor)
        and isinstance(e1, torch.Tensor)
        and k1.shape == k2.shape
        and e1.shape == e2.shape
        and torch.allclose(k1.float(), k2.float(), atol=1e-5)
        and torch.allclose(e1.float(), e2.float(), atol=1e-4)  # d/2 − 1e-5 or d/2: both fine
        and [tuple(x) for x in l1] == [tuple(x) for x in l2]
    )


def check_codebook_update(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(keys, eps, labels, query, label, eps_init) -> (keys, eps, labels)``,
    GRACE's rules for one new edit (:func:`reference_codebook_update`), on every step of
    two streams of edits."""
    from ..methods.grace import update_codebook

    name = "codebook_update"
    refused = refusal(name, fn, (reference_codebook_update, update_codebook))
    if refused is not None:
        return report(refused, raise_on_fail)
    cases = _codebook_cases()
    answers = []
    for keys, eps, labels, query, label, eps_init in cases:
        args = (keys.clone(), eps.clone(), list(labels), query.clone(), label, eps_init)
        out, failed = call_answer(name, fn, *args)
        if failed is not None:
            return report(failed, raise_on_fail)
        if not (isinstance(out, tuple | list) and len(out) == 3):
            return report(
                CheckResult(
                    False, f"{name}: return the new codebook, a tuple (keys, eps, labels)."
                ),
                raise_on_fail,
            )
        answers.append(tuple(out))
        if not (torch.equal(args[0], keys) and torch.equal(args[1], eps) and args[2] == labels):
            return report(
                CheckResult(
                    False,
                    f"{name}: the input codebook was modified; return a new one (clone, cat).",
                ),
                raise_on_fail,
            )
    expected = [reference_codebook_update(*case) for case in cases]
    if all(_same_book(a, e) for a, e in zip(answers, expected)):
        return report(
            CheckResult(True, f"{name}: correct on all {len(cases)} steps of 2 streams."),
            raise_on_fail,
        )
    for broken, hint in _CODEBOOK_MISTAKES:
        if all(_same_book(a, broken(*case)) for a, case in zip(answers, cases)):
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if not _same_book(a, e))
    keys, eps, labels, query, label, eps_init = cases[i]
    n = len(keys)
    return report(
        CheckResult(
            False,
            f"{name}: step {i} (a codebook of {n} keys, a query with label {label}, ε_init "
            f"{eps_init}): expected {len(expected[i][0])} keys with radii "
            f"{[round(float(e), 3) for e in expected[i][1]]}. Find the nearest key and its "
            "distance d; add if d > ε_init + ε_i*, else split on a different label, else expand.",
        ),
        raise_on_fail,
    )


add_solution(
    "codebook",
    """def codebook_update(keys, eps, labels, query, label, eps_init):
    def add(radius):  # a new entry (query, radius, label), the old entries kept
        return (torch.cat([keys, query[None]]), torch.cat([eps, torch.tensor([radius])]),
                labels + [tuple(label)])

    if len(keys) == 0:
        return add(eps_init)                       # the first edit
    dist = torch.cdist(query[None], keys)[0]
    i = int(dist.argmin())                         # the nearest key i*
    d = float(dist[i])
    if d > eps_init + float(eps[i]):               # no ball within reach: a new key
        return add(eps_init)
    eps = eps.clone()
    if tuple(labels[i]) != tuple(label):           # conflict: split, the balls touch
        eps[i] = d / 2 - 1e-5
        return add(d / 2)
    eps[i] = max(float(eps[i]), d)                 # same label: expand (only ever grows)
    return keys.clone(), eps, list(labels)""",
)
