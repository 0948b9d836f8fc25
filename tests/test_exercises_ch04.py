import pytest
import torch

from medit_lite.exercises.ch04 import check_rank_one_update, check_restore, reference_restore
from medit_lite.methods.rome import rank_one_update


def test_checkers_accept_a_correct_answer_and_refuse_the_packages_own():
    assert check_rank_one_update(lambda W, C, k, v: rank_one_update(W, C, k, v))
    assert check_restore(lambda c, k, t: reference_restore(c, k, t))
    assert "package's own" in check_rank_one_update(rank_one_update).message
    assert "package's own" in check_restore(reference_restore).message


def _solve(C, k):
    return torch.linalg.solve(C, k)


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda W, C, k, v: torch.outer(v - W @ k, k) / (k @ k), "left C out"),
        (lambda W, C, k, v: torch.outer(v, _solve(C, k)) / (_solve(C, k) @ k), "v − W k"),
        (lambda W, C, k, v: torch.outer(v - W @ k, _solve(C, k)), "divide by"),
        (lambda W, C, k, v: torch.outer(v - W @ k, C @ k) / ((C @ k) @ k), "inverse"),
        (lambda W, C, k, v: torch.zeros_like(W), "does not map"),
        (lambda W, C, k, v: W[0], "shaped like W"),
        (lambda W, C, k, v: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_rank_one_checker_explains(broken, hint):
    result = check_rank_one_update(broken)
    assert not result and hint in result.message


def _in_place(c, k, t):
    c[:, t] = k[t]
    return c


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda c, k, t: k.expand_as(c).clone(), "ONE position"),
        (lambda c, k, t: c.clone(), "nothing was restored"),
        (_in_place, "in place"),
        (lambda c, k, t: c[0], "shaped like"),
    ],
)
def test_restore_checker_explains(broken, hint):
    result = check_restore(broken)
    assert not result and hint in result.message


def test_stubs_and_raise_on_fail():
    def stub(*args):
        raise NotImplementedError

    assert "not implemented" in check_rank_one_update(stub).message
    assert "not implemented" in check_restore(stub).message
    with pytest.raises(AssertionError, match="not implemented"):
        check_restore(stub, raise_on_fail=True)
