import functools
import re

import pytest

from medit_lite.exercises import ch01, show_solution, solution
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


# -- the shared solutions registry ------------------------------------------------------
def _checkers():
    from medit_lite.exercises import ch01, ch02, ch03, ch04, ch05

    return {
        "1.1": ch01.check_efficacy_score,
        "1.2": ch01.check_neighborhood_score,
        "1.4": ch01.check_token_locality,
        "grace": ch02.check_grace_layer_output,
        "serac": ch02.check_serac_route,
        "codebook": ch02.check_codebook_update,
        "mend": ch02.check_mend_gradient,
        "ig": ch02.check_integrated_gradients,
        "3.1": ch03.check_activation_loss,
        "3.2": ch03.check_memory_loss,
        "3.4": ch03.check_init_patch,
        "4.1": ch04.check_rank_one_update,
        "4.2": ch04.check_restore,
        "4.4": ch04.check_memit_spread,
        "5.1": ch05.check_exposure_from_rank,
        "5.2": ch05.check_digit_rank,
        "5.3": ch05.check_bias_slope,
        "5.4": ch05.check_remove_subspace,
        "5.5": ch05.check_aggregate_neurons,
    }


def test_every_solution_is_registered_once_and_passes_its_checker():
    from medit_lite.exercises.check import SOLUTIONS

    checkers = _checkers()
    assert set(SOLUTIONS) == set(checkers)
    for key, check in checkers.items():
        assert check(solution(key)), key


def test_show_solution_prints_any_chapters_solution(capsys):
    for key in ("1.1", "grace", "3.4", "4.4", "5.5"):
        show_solution(key)
        assert "def " in capsys.readouterr().out
    with pytest.raises(ValueError, match="no exercise"):
        show_solution("9.9")


def test_chapter_modules_share_one_registry():
    from medit_lite.exercises import ch01, ch02, ch03, ch04, ch05

    assert {m.show_solution for m in (ch01, ch02, ch03, ch04, ch05)} == {show_solution}


def test_the_pages_hold_no_solution_and_name_the_reveal():
    from pathlib import Path

    pages = Path(__file__).resolve().parents[1] / "chapters"
    for name in ("01_introduction", "02_1_external", "03_tpatcher", "04_rome", "05_1_privacy"):
        text = (pages / f"{name}.md").read_text("utf-8")
        assert "# Solution" not in text, name
        assert "show_solution(" in text, name
    for name in ("01_introduction", "03_tpatcher", "04_rome"):
        text = (pages / f"{name}.md").read_text("utf-8")
        cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", text, re.S)
        hidden = [c for c in cells if c.startswith(":tags: [hide-cell]") and "def " in c]
        assert not hidden, name  # Colab shows hide-cell cells: no solution in one


# -- exercise 1.4: EasyEdit's token-accuracy locality --------------------------------------
def test_locality_reference_is_the_packages_locality_on_a_tiny_model(make_tiny):
    import torch

    from medit_lite import EditRequest, locality_reference, score_requests
    from medit_lite.metrics import encode_pair
    from medit_lite.requests import Probe

    lm = make_tiny(family="llama", layers=2, seed=3)
    probes = [
        Probe("The capital of France is", "Paris, a large city"),
        Probe("Water boils at", "100 degrees"),
        Probe("The Eiffel Tower stands in", "Paris"),
        Probe("Bananas are", "yellow when they are ripe"),
    ]
    request = EditRequest("{} is located in", "Rome", "Berlin", neighborhood=probes)

    def logits():
        out = []
        with torch.no_grad():
            for p in probes:
                prompt, answer = encode_pair(lm, p.prompt, p.answer)
                out.append(lm.model(input_ids=torch.tensor([prompt + answer])).logits[0])
        return out

    pairs = [encode_pair(lm, p.prompt, p.answer) for p in probes]
    reference = locality_reference(lm, [request])
    before = logits()
    with torch.no_grad():
        w = lm.weight_out_in("mlp_out", 1)
        saved = w.clone()
        w += torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    try:
        package = score_requests(lm, [request], reference)[0]["locality"]
        mine = ch01.reference_token_locality(
            before, logits(), [len(p) for p, _ in pairs], [t for _, t in pairs]
        )
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert 0 < package < 1  # the perturbation changed some predictions, not all
    assert mine == pytest.approx(package, abs=1e-6)


def test_token_locality_checker_accepts_refuses_and_explains():
    from medit_lite import locality_reference, score_requests

    assert ch01.check_token_locality(solution("1.4"))
    assert ch01.check_token_locality(lambda *a: ch01.reference_token_locality(*a) + 0)
    for fn in (ch01.reference_token_locality, score_requests, locality_reference):
        refused = ch01.check_token_locality(fn)
        assert not refused and "package's own" in refused.message
    for broken, hint in ch01._LOCALITY_MISTAKES:
        result = ch01.check_token_locality(broken)
        assert not result and hint in result.message
    assert len(ch01._LOCALITY_MISTAKES) >= 2


def test_token_locality_checker_reports_stubs_and_other_answers():
    def stub(*args):
        raise NotImplementedError

    assert "not implemented" in ch01.check_token_locality(stub).message
    assert "return one number" in ch01.check_token_locality(lambda *a: "one").message
    other = ch01.check_token_locality(lambda *a: 0.5)
    assert not other and "expected" in other.message
