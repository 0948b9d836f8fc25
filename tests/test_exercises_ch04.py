import pytest
import torch

from medit_lite.exercises import ch04
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


# -- exercise 4.4: MEMIT's residual spreading ---------------------------------------------
class _ModelStack:
    """The ToyStack vocabulary on a real model, as spread_update reads it (C = identity)."""

    def __init__(self, lm, requests, layers, templates):
        from medit_lite.methods.locate_edit import average_keys, lookup_states

        self.W = {layer: lm.weight_out_in("mlp_out", layer) for layer in layers}
        self.C = {layer: torch.eye(lm.d_mlp, dtype=torch.float64) for layer in layers}
        self._keys = lambda layer: (
            average_keys(
                lookup_states(lm, requests, ("mlp_out", layer), templates, "subject_last"), None
            ).T
        )
        self._out = lambda layer: (
            lookup_states(lm, requests, ("layer", layer), ["{}"], "subject_last", output=True)[
                :, 0
            ].T
        )

    def keys(self, layer):
        return self._keys(layer).double()

    def output(self, layer):
        return self._out(layer).double()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_spread_reference_is_memits_spread_update_on_a_tiny_model(make_tiny, family):
    from medit_lite import EditRequest
    from medit_lite.methods.locate_edit import lookup_states, spread_update

    requests = [
        EditRequest("{} is located in", "The Eiffel Tower", "Rome"),
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ]
    templates, layers, lam = ["{}", "Hello there. {}"], (0, 1), 0.5
    package, mine = make_tiny(family, layers=3, seed=4), make_tiny(family, layers=3, seed=4)
    h = lookup_states(package, requests, ("layer", 1), ["{}"], "subject_last", output=True)[:, 0]
    zs = h + torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        spread_update(package, requests, layers, zs, templates, "subject_last", None, lam)
        net = _ModelStack(mine, requests, layers, templates)
        updates = ch04.reference_spread(net, layers, zs.T.double(), lam)
    assert set(updates) == set(layers)
    for layer in layers:
        torch.testing.assert_close(
            mine.weight_out_in("mlp_out", layer), package.weight_out_in("mlp_out", layer)
        )
        assert updates[layer].norm() > 0


def test_spread_reaches_the_target_when_lambda_is_small():
    net, layers, Z, _ = ch04._case(0, (1, 2, 3), 0.5)
    ch04.reference_spread(net, layers, Z, 1e-9)
    assert (net.output(layers[-1]) - Z).abs().max() < 0.2  # most of the residual is written


def test_memit_spread_checker_accepts_refuses_and_explains():
    from medit_lite.exercises import solution
    from medit_lite.methods.locate_edit import least_squares_update, spread_update

    assert ch04.check_memit_spread(solution("4.4"))
    for fn in (ch04.reference_spread, spread_update, least_squares_update):
        refused = ch04.check_memit_spread(fn)
        assert not refused and "package's own" in refused.message
    assert len(ch04._SPREAD_MISTAKES) >= 2
    for broken, hint in ch04._SPREAD_MISTAKES:
        result = ch04.check_memit_spread(broken)
        assert not result and hint in result.message


def test_memit_spread_checker_reports_other_answers():
    def not_stored(net, layers, Z, lam):
        saved = {layer: net.W[layer].clone() for layer in layers}
        updates = ch04.reference_spread(net, layers, Z, lam)
        for layer in layers:
            net.W[layer].copy_(saved[layer])
        return updates

    assert "does not hold them" in ch04.check_memit_spread(not_stored).message
    assert "return a dict" in ch04.check_memit_spread(lambda *a: None).message
    half = ch04.check_memit_spread(
        lambda *a: {k: v / 2 for k, v in ch04.reference_spread(*a).items()}
    )
    assert not half and "differs first" in half.message


def test_solutions_of_chapter_4(capsys):
    from medit_lite.exercises import solution

    assert check_rank_one_update(solution("4.1"))
    assert check_restore(solution("4.2"))
    ch04.show_solution("4.4")
    assert "len(layers) - i" in capsys.readouterr().out
