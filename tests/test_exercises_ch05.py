import math

import pytest

from medit_lite.applications.privacy import exposure, tree_rank
from medit_lite.exercises.ch05 import (
    check_digit_rank,
    check_exposure_from_rank,
    reference_digit_rank,
    reference_exposure_from_rank,
    show_solution,
)


def test_checkers_accept_correct_answers():
    assert check_exposure_from_rank(lambda r, n: math.log2(10**n / r))
    assert check_digit_rank(lambda t, d: tree_rank(t, d) + 0)


def test_checkers_refuse_the_package_functions():
    for fn in (reference_exposure_from_rank, exposure):
        result = check_exposure_from_rank(fn)
        assert not result and "package's own" in result.message
    for fn in (reference_digit_rank, tree_rank):
        result = check_digit_rank(fn)
        assert not result and "package's own" in result.message


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda r, n: n * math.log(10) - math.log(r), "log base 2"),
        (lambda r, n: -math.log2(r), "log₂|R|"),
        (lambda r, n: n * math.log2(10) - math.log2(r + 1), "don't add 1"),
        (lambda r, n: math.log2(r), "log₂ rank alone"),
        (lambda r, n: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_exposure_checker_explains(broken, hint):
    result = check_exposure_from_rank(broken)
    assert not result and hint in result.message


def _ranks(t, d, strict=True):
    return [
        int((t[i] > t[i, x]).sum() if strict else (t[i] >= t[i, x]).sum()) for i, x in enumerate(d)
    ]


@pytest.mark.parametrize(
    "broken, hint",
    [
        (lambda t, d: sum(r * 10 ** (len(d) - 1 - i) for i, r in enumerate(_ranks(t, d))), "add 1"),
        (lambda t, d: 1 + sum(r * 10**i for i, r in enumerate(_ranks(t, d))), "reversed"),
        (
            lambda t, d: (
                1 + sum(r * 10 ** (len(d) - 1 - i) for i, r in enumerate(_ranks(t, d, False)))
            ),
            "strictly higher",
        ),
        (lambda t, d: 1 + sum(_ranks(t, d)), "place value"),
        (lambda t, d: "rank", "integer"),
        (lambda t, d: 2, "expected"),
    ],
)
def test_digit_rank_checker_explains(broken, hint):
    result = check_digit_rank(broken)
    assert not result and hint in result.message


def test_stubs_raise_on_fail_and_solutions(capsys):
    def stub(*args):
        raise NotImplementedError

    assert "not implemented" in check_exposure_from_rank(stub).message
    assert "not implemented" in check_digit_rank(stub).message
    with pytest.raises(AssertionError, match="not implemented"):
        check_digit_rank(stub, raise_on_fail=True)
    show_solution("5.2")
    assert "10 ** (L - 1 - i)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no exercise"):
        show_solution("5.9")


# -- 5.3 and 5.4: DAMA's bias slope and the projection that removes a subspace ----------
def test_bias_slope_checker():
    import torch

    from medit_lite.exercises.ch05 import check_bias_slope, reference_bias_slope

    def mine(s, f, y):
        X = torch.tensor([s, f, [1.0] * len(s)], dtype=torch.float64).T
        return float(
            torch.linalg.lstsq(X, torch.tensor(y, dtype=torch.float64)[:, None]).solution[0]
        )

    assert check_bias_slope(mine)
    refused = check_bias_slope(reference_bias_slope)
    assert not refused and "package's own" in refused.message
    from medit_lite.exercises.ch05 import _SLOPE_MISTAKES

    for broken, hint in _SLOPE_MISTAKES:
        result = check_bias_slope(broken)
        assert not result and hint in result.message


def test_remove_subspace_checker():
    import torch

    from medit_lite.exercises.ch05 import (
        _SUBSPACE_MISTAKES,
        check_remove_subspace,
        reference_remove_subspace,
    )

    def mine(B):
        Q, _ = torch.linalg.qr(B)
        return torch.eye(B.shape[0], dtype=B.dtype) - Q @ Q.T

    assert check_remove_subspace(mine)
    refused = check_remove_subspace(reference_remove_subspace)
    assert not refused and "package's own" in refused.message
    for broken, hint in _SUBSPACE_MISTAKES:
        result = check_remove_subspace(broken)
        assert not result and hint in result.message
    assert "return a" in check_remove_subspace(lambda B: B).message
    show_solution("5.4")


# -- 5.5 (build): DEPN's privacy-neuron aggregator --------------------------------------
def test_aggregate_checker_accepts_refuses_and_explains():
    import torch

    from medit_lite.exercises import solution
    from medit_lite.exercises.ch05 import (
        _AGGREGATE_MISTAKES,
        _aggregate_cases,
        check_aggregate_neurons,
        reference_aggregate_neurons,
    )
    from medit_lite.methods.depn import DEPNHParams, aggregate

    for scores, layers, threshold, share, z in _aggregate_cases():
        hp = DEPNHParams(threshold=threshold, min_share=share, neurons=z)
        assert reference_aggregate_neurons(scores, layers, threshold, share, z) == aggregate(
            scores, layers, hp
        )
    assert check_aggregate_neurons(solution("5.5"))
    for fn in (reference_aggregate_neurons, aggregate):
        refused = check_aggregate_neurons(fn)
        assert not refused and "package's own" in refused.message
    assert len(_AGGREGATE_MISTAKES) >= 2
    for broken, hint in _AGGREGATE_MISTAKES:
        result = check_aggregate_neurons(broken)
        assert not result and hint in result.message
    assert "not implemented" in check_aggregate_neurons(_stub).message
    assert "list of (layer, neuron)" in check_aggregate_neurons(lambda *a: 3).message
    shuffled = check_aggregate_neurons(lambda *a: reference_aggregate_neurons(*a)[::-1])
    assert not shuffled and "wrong order" in shuffled.message
    assert torch.is_tensor(_aggregate_cases()[0][0][0])


def _stub(*args):
    raise NotImplementedError


def test_solutions_of_chapter_5_pass_their_checkers():
    from medit_lite.exercises import solution
    from medit_lite.exercises.ch05 import check_bias_slope, check_remove_subspace

    assert check_exposure_from_rank(solution("5.1"))
    assert check_digit_rank(solution("5.2"))
    assert check_bias_slope(solution("5.3"))
    assert check_remove_subspace(solution("5.4"))
