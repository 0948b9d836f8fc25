"""Checkers of chapter 2's exercises accept the reference and explain broken answers."""

from __future__ import annotations

import pytest
import torch

from medit_lite.exercises import ch02
from medit_lite.methods.grace import deferral


def test_grace_checker_accepts_a_correct_answer():
    def mine(query, keys, eps, values, layer_out):
        d, i = torch.cdist(query, keys).min(-1)
        return torch.where((d <= eps[i])[:, None], values[i], layer_out)

    assert ch02.check_grace_layer_output(mine)


def test_grace_checker_refuses_the_package_functions():
    for fn in (ch02.reference_grace_layer_output, deferral):
        result = ch02.check_grace_layer_output(fn)
        assert not result and "package's own" in result.message


@pytest.mark.parametrize(
    "broken, hint",
    [(fn, hint.split(":")[0][:30]) for fn, hint in ch02._GRACE_MISTAKES],
)
def test_grace_checker_explains_each_mistake(broken, hint):
    result = ch02.check_grace_layer_output(broken)
    assert not result and hint in result.message


def test_grace_checker_reports_other_errors():
    assert "not implemented" in ch02.check_grace_layer_output(_stub).message
    shaped = ch02.check_grace_layer_output(lambda q, k, e, v, o: o[:1])
    assert not shaped and "one row per query" in shaped.message
    wrong = ch02.check_grace_layer_output(lambda q, k, e, v, o: o + 1)
    assert not wrong and "differ" in wrong.message


def _stub(*args):
    raise NotImplementedError


def test_show_solution(capsys):
    ch02.show_solution("grace")
    assert "eps[nearest]" in capsys.readouterr().out
    with pytest.raises(ValueError):
        ch02.show_solution("nope")


# -- SERAC's scope decision -------------------------------------------------------------
def test_serac_checker_accepts_a_correct_answer():
    def mine(scores, threshold=0.5):
        if not scores:
            return -1
        k = max(range(len(scores)), key=scores.__getitem__)
        return k if scores[k] > threshold else -1

    assert ch02.check_serac_route(mine)


def test_serac_checker_refuses_the_package_functions():
    from medit_lite.methods.serac import route_decision

    for fn in (ch02.reference_serac_route, route_decision):
        result = ch02.check_serac_route(fn)
        assert not result and "package's own" in result.message


@pytest.mark.parametrize("broken, hint", ch02._SERAC_MISTAKES)
def test_serac_checker_explains_each_mistake(broken, hint):
    result = ch02.check_serac_route(broken)
    assert not result and hint in result.message


def test_serac_checker_reports_stubs_and_solution(capsys):
    assert "not implemented" in ch02.check_serac_route(_stub).message
    ch02.show_solution("serac")
    assert "threshold" in capsys.readouterr().out


# -- section 2.2: MEND's rank-one gradient and the IG Riemann sum ----------------------------
def test_mend_gradient_reference_matches_autograd():
    for u, delta in ch02._mend_cases():
        w = torch.randn(delta.shape[1], u.shape[1], requires_grad=True)
        h = u @ w.T
        (grad,) = torch.autograd.grad((h * delta).sum(), w)  # dL/dh = delta
        torch.testing.assert_close(ch02.reference_mend_gradient(u, delta), grad)


def test_mend_checker_accepts_refuses_and_explains():
    def mine(u, delta):
        return sum(torch.outer(d, x) for x, d in zip(u, delta))

    assert ch02.check_mend_gradient(mine)
    refused = ch02.check_mend_gradient(ch02.reference_mend_gradient)
    assert not refused and "package's own" in refused.message
    for broken, hint in ch02._MEND_MISTAKES:
        result = ch02.check_mend_gradient(broken)
        assert not result and hint in result.message


def test_ig_reference_is_complete_with_many_steps():
    for f, x, _ in ch02._ig_cases():
        attr = ch02.reference_integrated_gradients(f, x, 400)
        gap = float(f(x[None])[0] - f(torch.zeros_like(x)[None])[0])
        assert float(attr.sum()) == pytest.approx(gap, abs=2e-2 * max(1.0, abs(gap)))


def test_ig_checker_accepts_refuses_and_explains():
    from medit_lite.analysis.attribution import neuron_attributions

    def mine(f, x, steps):
        total = torch.zeros_like(x)
        for k in range(1, steps + 1):
            z = (k / steps * x).requires_grad_(True)
            (g,) = torch.autograd.grad(f(z[None])[0], z)
            total += g
        return x * total / steps

    assert ch02.check_integrated_gradients(mine)
    for fn in (ch02.reference_integrated_gradients, neuron_attributions):
        refused = ch02.check_integrated_gradients(fn)
        assert not refused and "package's own" in refused.message
    for broken, hint in ch02._IG_MISTAKES:
        result = ch02.check_integrated_gradients(broken)
        assert not result and hint in result.message


def test_ch02_solutions_for_mend_and_ig(capsys):
    for name in ("mend", "ig"):
        ch02.show_solution(name)
        assert "def " in capsys.readouterr().out
