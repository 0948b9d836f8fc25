import functools

import pytest

from medit_lite.exercises.ch01 import check_efficacy_score, check_neighborhood_score
from medit_lite.metrics import efficacy_score, neighborhood_score


def test_checkers_accept_a_correct_answer_and_refuse_the_packages_own():
    assert check_efficacy_score(lambda n, t: efficacy_score(n, t))
    assert check_neighborhood_score(lambda a, n: neighborhood_score(a, n))
    for check, ref in (
        (check_efficacy_score, efficacy_score),
        (check_neighborhood_score, neighborhood_score),
    ):
        refused = check(ref)
        assert not refused and "package's own function" in refused.message
        assert not check(functools.partial(ref))


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda n, t: sum(a >= b for a, b in zip(n, t)) / len(n), "strict '>'"),
        (lambda n, t: sum(a > b for a, b in zip(n, t)), "fraction"),
        (lambda n, t: sum(a < b for a, b in zip(n, t)) / len(n), "reversed"),
        (lambda n, t: sum(a - b for a, b in zip(n, t)) / len(n), "efficacy magnitude"),
        (lambda n, t: 0.5, "expected"),
        (lambda n, t: n[10], "IndexError"),
    ],
)
def test_efficacy_checker_explains_broken_answers(broken, hint):
    result = check_efficacy_score(broken)
    assert not result and hint in result.message


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda a, n: sum(x < y for x, y in zip(a, n)) / len(a), "reversed"),
        (lambda a, n: sum(x >= y for x, y in zip(a, n)) / len(a), "strict '>'"),
        (lambda a, n: sum(x > y for x, y in zip(a, n)), "fraction"),
    ],
)
def test_neighborhood_checker_explains_broken_answers(broken, hint):
    result = check_neighborhood_score(broken)
    assert not result and hint in result.message


def test_stub_and_raise_on_fail():
    def stub(p_new, p_true):
        raise NotImplementedError

    assert "not implemented" in check_efficacy_score(stub).message
    with pytest.raises(AssertionError, match="not implemented"):
        check_efficacy_score(stub, raise_on_fail=True)
