"""Chapter 3 exercises: T-Patcher's activation loss and memory loss.

References: :func:`medit_lite.methods.tpatcher.activation_loss` and
:func:`medit_lite.methods.tpatcher.memory_loss` (Huang et al., 2023, §3.2).
"""

from __future__ import annotations

import torch

from ..methods.tpatcher import activation_loss, memory_loss, top_k_exp_mean
from .check import CheckResult, run_check

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
