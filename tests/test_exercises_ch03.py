import pytest
import torch

from medit_lite.exercises.ch03 import check_activation_loss, check_memory_loss
from medit_lite.methods.tpatcher import activation_loss, memory_loss, top_k_exp_mean


def test_checkers_accept_a_correct_answer_and_refuse_the_packages_own():
    assert check_activation_loss(lambda a, m: activation_loss(a, m))
    assert check_memory_loss(lambda *args: memory_loss(*args))
    assert "package's own" in check_activation_loss(activation_loss).message
    assert "package's own" in check_memory_loss(memory_loss).message


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda a, m: torch.exp(a - m).mean(), "sign is reversed"),
        (lambda a, m: torch.exp(-a).mean(), "margin m_a is missing"),
        (lambda a, m: torch.exp(m - a).sum(), "mean"),
        (lambda a, m: torch.clamp(m - a, min=0).mean(), "hinge"),
        (lambda a, m: torch.tensor(1.0), "expected"),
        (lambda a, m: a[10], "IndexError"),
    ],
)
def test_activation_checker_explains_broken_answers(broken, hint):
    result = check_activation_loss(broken)
    assert not result and hint in result.message


def _stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda m, a, b, g, k: torch.exp(m + b).mean() + torch.exp(m - a + g).mean(), "LARGEST"),
        (lambda m, a, b, g, k: top_k_exp_mean(m + b, k), "second term is missing"),
        (
            lambda m, a, b, g, k: top_k_exp_mean(m - b, k) + top_k_exp_mean(m - a + g, k),
            "sign of beta",
        ),
        (
            lambda m, a, b, g, k: top_k_exp_mean(m + b, k) + top_k_exp_mean(a - m + g, k),
            "gap term is reversed",
        ),
        (
            lambda m, a, b, g, k: (
                torch.topk((m + b).flatten(), min(k, m.numel())).values.mean()
                + torch.topk((m - a + g).flatten(), min(k, m.numel())).values.mean()
            ),
            "exponential",
        ),
        (_stub, "not implemented yet"),
    ],
)
def test_memory_checker_explains_broken_answers(broken, hint):
    result = check_memory_loss(broken)
    assert not result and hint in result.message
