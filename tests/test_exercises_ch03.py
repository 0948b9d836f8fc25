import pytest
import torch

from medit_lite.exercises import ch03
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


# -- exercise 3.4: the initial patch of one edit ----------------------------------------
def test_init_patch_reference_is_what_tpatcher_starts_from_on_a_tiny_model(make_tiny):
    from medit_lite import EditRequest
    from medit_lite.hooks import Hooks
    from medit_lite.methods.tpatcher import Patch, edit_site
    from medit_lite.metrics import encode_pair

    lm = make_tiny(family="llama", layers=2, seed=1)
    request = EditRequest("The Eiffel Tower is in {}", "Paris", "the city of Rome in Italy")
    layer, max_neurons = 1, 3
    site = edit_site(lm, layer, request)
    assert len(site.wrong) > max_neurons  # the cap matters here
    package = Patch.init_from(site.queries[site.wrong[:max_neurons]])  # as train_patch
    prompt, target = encode_pair(lm, request.text, request.target_new)
    with torch.no_grad(), Hooks() as h:
        q = h.capture_input(lm.module("mlp", layer))
        logits = lm.model(input_ids=torch.tensor([prompt + target])).logits[0]
    keys, bias, values = ch03.reference_init_patch(
        q.value[0].float(), logits, len(prompt), torch.tensor(target), max_neurons
    )
    torch.testing.assert_close(keys, package.keys.detach())
    assert bias.shape == (max_neurons,) and not bias.any() and not values.any()
    # each key gives pre-activation 1 on its own position
    pre = torch.einsum("nd,nd->n", site.queries[site.wrong[:max_neurons]], keys)
    torch.testing.assert_close(pre, torch.ones(max_neurons))


def test_init_patch_checker_accepts_refuses_and_explains():
    from medit_lite.exercises import solution
    from medit_lite.methods.tpatcher import Patch, edit_site

    assert ch03.check_init_patch(solution("3.4"))
    assert ch03.check_init_patch(lambda *a: Patch.init_from(ch03._select(*a)))  # a Patch is fine
    for fn in (ch03.reference_init_patch, Patch.init_from, edit_site):
        refused = ch03.check_init_patch(fn)
        assert not refused and "package's own" in refused.message
    assert len(ch03._PATCH_MISTAKES) >= 2
    for broken, hint in ch03._PATCH_MISTAKES:
        result = ch03.check_init_patch(broken)
        assert not result and hint in result.message


def test_init_patch_checker_reports_other_answers():
    def random_values(*args):
        keys, bias, _ = ch03.reference_init_patch(*args)
        return keys.clone(), bias.clone(), torch.ones_like(keys)

    assert "bias and the value at 0" in ch03.check_init_patch(random_values).message
    assert "tuple (keys, bias, values)" in ch03.check_init_patch(lambda *a: 1).message
    assert "not implemented" in ch03.check_init_patch(_stub).message
    none = ch03.check_init_patch(lambda q, lg, p, t, m: ch03._init(q[:0]))
    assert not none and "neurons" in none.message


def test_solutions_of_chapter_3(capsys):
    from medit_lite.exercises import solution

    assert check_activation_loss(solution("3.1"))
    assert check_memory_loss(solution("3.2"))
    ch03.show_solution("3.2")
    assert "torch.topk" in capsys.readouterr().out
