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


# -- the build task of section 2.1: GRACE's codebook update -----------------------------
def test_codebook_reference_applies_the_three_rules_on_the_hand_stream():
    cases = ch02._codebook_cases()[:7]  # the 2-D stream
    radii = []
    for case in cases:
        _, eps, labels = ch02.reference_codebook_update(*case)
        radii.append([round(float(e), 4) for e in eps])
    assert radii == [
        [1.0],  # add to an empty book
        [1.0, 1.0],  # add: no ball within reach
        [1.0, 1.0],  # inside, same label: nothing changes
        [1.6, 1.0],  # expand to d
        [1.6, 0.75, 0.75],  # conflict: split to d/2 (less 1e-5 for the old key)
        [1.2, 0.75, 0.75, 1.2],  # conflict within reach (d ≤ ε_init + ε): split
        [1.2, 0.75, 0.75, 1.2, 1.0],  # add
    ]
    assert labels == [(1,), (2,), (1,), (2,), (2,)]


def test_codebook_checker_accepts_refuses_and_explains():
    from medit_lite.exercises import solution
    from medit_lite.methods.grace import update_codebook

    assert ch02.check_codebook_update(solution("codebook"))
    assert ch02.check_codebook_update(lambda *a: ch02._codebook_rule(*a))
    for fn in (ch02.reference_codebook_update, update_codebook):
        refused = ch02.check_codebook_update(fn)
        assert not refused and "package's own" in refused.message
    assert len(ch02._CODEBOOK_MISTAKES) >= 2
    for broken, hint in ch02._CODEBOOK_MISTAKES:
        result = ch02.check_codebook_update(broken)
        assert not result and hint in result.message


def test_codebook_checker_reports_other_answers():
    def in_place(keys, eps, labels, query, label, eps_init):
        labels.append(tuple(label))
        return ch02.reference_codebook_update(keys, eps, labels[:-1], query, label, eps_init)

    assert "was modified" in ch02.check_codebook_update(in_place).message
    assert "tuple (keys, eps, labels)" in ch02.check_codebook_update(lambda *a: None).message
    assert "not implemented" in ch02.check_codebook_update(_stub).message
    always_add = ch02.check_codebook_update(
        lambda k, e, la, q, lab, ei: (
            torch.cat([k, q[None]]),
            torch.cat([e, torch.tensor([ei])]),
            la + [lab],
        )
    )
    assert not always_add and "expected" in always_add.message
