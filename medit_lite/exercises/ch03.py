"""Chapter 3 exercises: T-Patcher's activation loss and memory loss, and the build task:
the initial patch of one edit.

References: :func:`medit_lite.methods.tpatcher.activation_loss` and
:func:`medit_lite.methods.tpatcher.memory_loss` (Huang et al., 2023, §3.2);
:func:`reference_init_patch`, what :func:`~medit_lite.methods.tpatcher.edit_site` and
:meth:`~medit_lite.methods.tpatcher.Patch.init_from` compute. Solutions:
``show_solution("3.1")``, ``"3.2"``, ``"3.4"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods.tpatcher import Patch, activation_loss, edit_site, memory_loss, top_k_exp_mean
from .check import CheckResult, add_solution, call_answer, refusal, report, run_check, show_solution

__all__ = ["show_solution"]  # re-exported: ``ch03.show_solution("3.1")``

# (edit_pre, act_margin): each patch neuron's pre-activation on its edit position
_ACT_CASES = [
    (torch.tensor([0.5]), 0.0),
    (torch.tensor([1.0, -1.0, 2.0]), 0.0),
    (torch.tensor([-0.3, 0.7]), 1.0),
    (torch.tensor([3.0, 0.2, -2.0, 0.0]), 0.5),
]


def check_activation_loss(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(edit_pre, margin) -> scalar``: ``mean_i exp(margin - edit_pre[i])``."""
    mistakes = [
        (
            lambda a, m: torch.exp(a - m).mean(),
            "the sign is reversed: the loss must be LARGE while the neuron does not fire, "
            "so it is exp(margin - activation), which shrinks as the activation grows.",
        ),
        (
            lambda a, m: torch.exp(-a).mean(),
            "the margin m_a is missing: the activation is pushed above m_a, exp(m_a - a).",
        ),
        (
            lambda a, m: torch.exp(m - a).sum(),
            "average over the patch neurons (mean), don't sum them.",
        ),
        (
            lambda a, m: torch.clamp(m - a, min=0).mean(),
            "that is a hinge (the paper code's 'margin' variant); T-Patcher's default is the "
            "exponential form exp(m_a - a), which keeps pushing even past the margin.",
        ),
    ]
    return run_check("activation_loss", fn, activation_loss, _ACT_CASES, mistakes, raise_on_fail)


def _memory_cases():
    g = torch.Generator().manual_seed(3)
    cases = [
        (
            torch.tensor([[-4.0, -2.0], [-5.0, 0.0], [-3.5, -6.0]]),
            torch.tensor([1.0, -1.0]),
            3.0,
            3.0,
            2,
        ),
        (torch.tensor([[-1.0], [-2.0], [-0.5], [-4.0]]), torch.tensor([0.8]), 3.0, 3.0, 2),
    ]
    for k in (3, 10):
        cases.append(
            (torch.randn(12, 3, generator=g) - 3, torch.randn(3, generator=g) + 1, 2.0, 1.0, k)
        )
    return cases


_MEMORY_CASES = _memory_cases()


def check_memory_loss(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(memory_pre, edit_pre, beta, gamma, k) -> scalar``, T-Patcher's memory loss

    ``S(memory_pre + beta; k) + S(memory_pre - edit_pre + gamma; k)`` with ``S(z; k)`` the
    mean of the ``k`` largest values of ``exp(z)``.
    """
    s = top_k_exp_mean
    mistakes = [
        (
            lambda m, a, b, g, k: torch.exp(m + b).mean() + torch.exp(m - a + g).mean(),
            "average only the k LARGEST terms (torch.topk): the memory inputs closest to "
            "firing are the ones that matter, and the mean over all of them drowns them out.",
        ),
        (
            lambda m, a, b, g, k: s(m + b, k),
            "the second term is missing: the edit's activation must also stay gamma above "
            "every memory activation, S(memory_pre - edit_pre + gamma; k).",
        ),
        (
            lambda m, a, b, g, k: s(m - b, k) + s(m - a + g, k),
            "the sign of beta: the patch must stay BELOW -beta on the memory, so the first "
            "term is S(memory_pre + beta; k).",
        ),
        (
            lambda m, a, b, g, k: s(m + b, k) + s(a - m + g, k),
            "the gap term is reversed: it penalises memory activations that come within "
            "gamma of the edit's, S(memory_pre - edit_pre + gamma; k).",
        ),
        (
            lambda m, a, b, g, k: (
                torch.topk((m + b).flatten(), min(k, m.numel())).values.mean()
                + torch.topk((m - a + g).flatten(), min(k, m.numel())).values.mean()
            ),
            "take the exponential of each term before the top-k mean: S(z; k) averages exp(z).",
        ),
    ]
    return run_check(
        "memory_loss",
        fn,
        _reference_memory_loss,
        _MEMORY_CASES,
        mistakes,
        raise_on_fail,
        refuse=(memory_loss,),
    )


def _reference_memory_loss(memory_pre, edit_pre, beta, gamma, k):
    return memory_loss(memory_pre, edit_pre, beta, gamma, k)


add_solution(
    "3.1",
    """def activation_loss(edit_pre, margin):
    # large while a neuron does not fire on its edit, decaying once it does
    return torch.exp(margin - edit_pre).mean()""",
)
add_solution(
    "3.2",
    """def memory_loss(memory_pre, edit_pre, beta, gamma, k):
    def s(z):  # S(z; k): the mean of the k largest values of exp(z)
        z = z.flatten()
        return torch.exp(torch.topk(z, min(k, z.numel())).values).mean()

    return s(memory_pre + beta) + s(memory_pre - edit_pre[None, :] + gamma)""",
)


# -- exercise 3.4 (build): the initial patch of one edit -----------------------------------
def reference_init_patch(
    queries: torch.Tensor,
    logits: torch.Tensor,
    prompt_len: int,
    target_ids: torch.Tensor,
    max_neurons: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The patch T-Patcher starts training from, for one edit ``prompt + target``.

    ``queries`` ``[P+T, d]`` are the patched FFN's inputs and ``logits`` ``[P+T, V]`` the
    model's logits at every position of the sequence; the target's ``T`` tokens are
    predicted at positions ``P-1 ... P+T-2``. One neuron per *wrongly* predicted target
    token (teacher-forced argmax ≠ target), the first ``max_neurons`` of them, each with key
    ``q / ‖q‖²`` (its pre-activation on its own position is 1), bias 0 and value 0 (the
    model is unchanged at step 0). Returns ``(keys [n, d], bias [n], values [n, d])``.

    This is what :func:`medit_lite.methods.tpatcher.edit_site` (``site.queries``,
    ``site.wrong``), ``site.wrong[:max_neurons]`` in ``train_patch`` and
    :meth:`~medit_lite.methods.tpatcher.Patch.init_from` compute; ``tests`` check it
    against them on a tiny model.
    """
    rows = torch.arange(prompt_len - 1, prompt_len + len(target_ids) - 1)
    wrong = torch.nonzero(logits[rows].argmax(-1) != target_ids).flatten()[:max_neurons]
    patch = Patch.init_from(queries[rows][wrong])
    return patch.keys.detach(), patch.bias.detach(), patch.values.detach()


def _patch_cases() -> list[tuple]:
    g = torch.Generator().manual_seed(13)
    cases = []
    for p, t, d, v, max_n, n_right in ((3, 4, 5, 7, 5, 1), (2, 6, 4, 5, 3, 2), (4, 2, 6, 9, 5, 0)):
        queries = torch.randn(p + t, d, generator=g) * 2
        logits = torch.randn(p + t, v, generator=g)
        target = torch.randint(0, v, (t,), generator=g)
        predicted = logits[p - 1 : p + t - 1].argmax(-1)
        target = torch.where(target == predicted, (target + 1) % v, target)  # all wrong ...
        right = torch.randperm(t, generator=g)[:n_right]
        target[right] = predicted[right]  # ... but these
        cases.append((queries, logits, p, target, max_n))
    # nothing wrong: no patch
    q, lg = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    cases.append((q, lg, 3, lg[2:4].argmax(-1), 5))
    return cases


def _select(queries, logits, p, target, max_n, shift=0, only_wrong=True, cap=True):
    rows = torch.arange(p - 1 + shift, p + len(target) - 1 + shift)
    picked = rows[logits[rows].argmax(-1) != target] if only_wrong else rows
    return queries[picked[:max_n] if cap else picked]


def _init(q):
    return q / q.pow(2).sum(-1, keepdim=True), q.new_zeros(q.shape[0]), torch.zeros_like(q)


def _unit_keys(*args):
    q = _select(*args)
    return q / q.norm(dim=-1, keepdim=True), q.new_zeros(q.shape[0]), torch.zeros_like(q)


def _raw_keys(*args):
    q = _select(*args)
    return q.clone(), q.new_zeros(q.shape[0]), torch.zeros_like(q)


_PATCH_MISTAKES: list[tuple[Callable, str]] = [
    (
        lambda *a: _init(_select(*a, shift=1)),
        "off by one position: the logits at position t predict token t + 1, so the target "
        "tokens are predicted (and patched) at positions P-1 ... P+T-2, not P ... P+T-1.",
    ),
    (
        lambda *a: _init(_select(*a, only_wrong=False)),
        "one neuron per WRONGLY predicted target token: where the teacher-forced argmax "
        "already equals the target, T-Patcher adds nothing.",
    ),
    (
        lambda *a: _init(_select(*a, cap=False)),
        "at most max_neurons neurons: keep the first max_neurons wrong positions.",
    ),
    (
        _unit_keys,
        "the key is q / ‖q‖², not q / ‖q‖: with it the pre-activation q·k is exactly 1 on the "
        "neuron's own position (a unit key gives ‖q‖).",
    ),
    (
        _raw_keys,
        "the key is q / ‖q‖² (pre-activation 1 on its position); k = q gives ‖q‖², a neuron "
        "that fires far too hard from the start.",
    ),
]


def _as_triple(out):
    if isinstance(out, Patch):
        return out.keys.detach(), out.bias.detach(), out.values.detach()
    if isinstance(out, tuple | list) and len(out) == 3:
        if all(isinstance(x, torch.Tensor) for x in out):
            return tuple(x.detach() for x in out)
    return None


def _same(a, b) -> bool:
    return all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=1e-5) for x, y in zip(a, b)
    )


def check_init_patch(fn, raise_on_fail: bool = False) -> CheckResult:
    """Check ``fn(queries, logits, prompt_len, target_ids, max_neurons) -> (keys, bias,
    values)``, the patch T-Patcher initialises for one edit (:func:`reference_init_patch`)."""
    name = "init_patch"
    refused = refusal(name, fn, (reference_init_patch, Patch.init_from, edit_site))
    if refused is not None:
        return report(refused, raise_on_fail)
    cases = _patch_cases()
    answers = []
    for case in cases:
        out, failed = call_answer(
            name, fn, case[0].clone(), case[1].clone(), case[2], case[3].clone(), case[4]
        )
        if failed is not None:
            return report(failed, raise_on_fail)
        triple = _as_triple(out)
        if triple is None:
            return report(
                CheckResult(False, f"{name}: return a tuple (keys, bias, values) of tensors."),
                raise_on_fail,
            )
        answers.append(triple)
    expected = [reference_init_patch(*case) for case in cases]
    if all(_same(a, e) for a, e in zip(answers, expected)):
        return report(
            CheckResult(True, f"{name}: correct on all {len(cases)} cases."), raise_on_fail
        )
    for broken, hint in _PATCH_MISTAKES:
        if all(_same(a, broken(*case)) for a, case in zip(answers, cases)):
            return report(CheckResult(False, f"{name}: {hint}"), raise_on_fail)
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if not _same(a, e))
    (keys, bias, values), k0 = answers[i], expected[i][0]
    if keys.shape != k0.shape:
        hint = (
            f"expected {k0.shape[0]} neurons (one per wrongly predicted target token, at most "
            f"max_neurons) of width {k0.shape[1]}, got keys shaped {tuple(keys.shape)}."
        )
        if not len(k0):
            hint += " Here the model predicts every target token already: no neuron at all."
    elif bias.abs().max() > 0 or values.abs().max() > 0:
        hint = (
            "start the bias and the value at 0, so that the patched model is unchanged at step 0."
        )
    else:
        hint = "the keys differ: k = q / ‖q‖² with q the FFN input at the neuron's position."
    return report(CheckResult(False, f"{name}: case {i}: {hint}"), raise_on_fail)


add_solution(
    "3.4",
    """def init_patch(queries, logits, prompt_len, target_ids, max_neurons):
    T = len(target_ids)
    rows = torch.arange(prompt_len - 1, prompt_len + T - 1)  # positions predicting the target
    wrong = rows[logits[rows].argmax(-1) != target_ids]       # where the model is wrong
    q = queries[wrong[:max_neurons]]                          # one neuron each, at most max
    keys = q / q.pow(2).sum(-1, keepdim=True)                 # q . k = 1 on its own position
    return keys, torch.zeros(len(q)), torch.zeros_like(q)     # bias 0, value 0: no change yet""",
)
