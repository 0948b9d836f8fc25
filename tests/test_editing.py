import math
from dataclasses import dataclass

import pytest
import torch

from medit_lite import edit, weights_fingerprint
from medit_lite.editing import METHODS, register
from medit_lite.methods.ft import FTHParams, FTLHParams
from medit_lite.metrics import locality_reference, score_requests, summarize
from medit_lite.requests import EditRequest


@pytest.mark.parametrize("method", ["ft", "ft-l", "ft-m"])
def test_edit_flips_a_builtin_fact_and_restores_exactly(lm, facts, method, unchanged):
    request = facts[0]
    reference = locality_reference(lm, [request])
    before = score_requests(lm, [request], reference)[0]
    result = edit(lm, request, method)
    after = score_requests(lm, [request], reference)[0]
    assert before["ES"] == 0.0 and after["ES"] == 1.0 and after["reliability"] == 1.0
    assert result.changed == [lm.module_name("mlp_out", result.hparams.layers[0]) + ".weight"]
    assert result.seconds > 0
    assert lm.generate(request.text, 3).strip().startswith(request.target_new.split()[0])
    result.restore()
    result.restore()  # idempotent


def test_ft_l_stays_inside_its_linf_ball(lm, facts, unchanged):
    name = lm.module_name("mlp_out", FTLHParams.for_model(lm).layers[0]) + ".weight"
    w0 = lm.model.get_parameter(name).detach().clone()
    with edit(lm, facts[1], "ft-l", norm_constraint=1e-3) as result:
        delta = (lm.model.get_parameter(name) - w0).abs().max().item()
        assert 0 < delta <= 1e-3 + 1e-7
        assert result.hparams.norm_constraint == 1e-3


def test_unconstrained_ft_moves_further_than_ft_l(lm, facts, unchanged):
    with edit(lm, facts[2], "ft") as ft:
        ft_norm = sum(ft.delta_norms().values())
    with edit(lm, facts[2], "ft-l", norm_constraint=1e-3) as ftl:
        ftl_norm = sum(ftl.delta_norms().values())
    assert ft_norm > ftl_norm > 0


def test_ft_l_objective_reads_every_target_token_at_the_last_prompt_position(lm):
    """ROME's FT+L loss (ft_main.py): log-softmax at the last prompt token, gathered for
    every target id, averaged; FT-M's is the teacher-forced NLL. They differ for a
    multi-token target and agree for a one-token one."""
    from medit_lite.methods import ft as ft_module
    from medit_lite.metrics import encode_pair

    prompt, target = "The Eiffel Tower is located in", "Buenos Aires, Argentina"
    p, t = encode_pair(lm, prompt, target)
    assert len(t) > 1
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p])).logits[0, -1].float()
        by_hand = -torch.log_softmax(logits, -1)[torch.tensor(t)].mean()
        ours = ft_module._prompt_last_nll(lm, [(p, t)])
        forced = ft_module._mean_target_nll(lm, [(p, t)])
        one = ft_module._prompt_last_nll(lm, [(p, t[:1])])
        one_forced = ft_module._mean_target_nll(lm, [(p, t[:1])])
    assert torch.allclose(ours, by_hand, atol=1e-4)
    assert abs(float(ours) - float(forced)) > 0.5
    assert torch.allclose(one, one_forced, atol=1e-4)


def test_ft_variants_and_released_defaults(lm):
    from medit_lite.methods.ft import PAPER_DEFAULTS, FTMHParams

    assert FTLHParams.for_model(lm).objective == "prompt_last"
    assert FTMHParams.for_model(lm).objective == "target_new"
    assert FTHParams.for_model(lm).objective == "target_new"
    assert FTMHParams.for_model(lm).norm_constraint == FTLHParams.for_model(lm).norm_constraint
    # kmeng01/rome hparams/FT/gpt2-xl_constr.json: layer 0, 25 steps, lr = ε = 5e-4
    xl = PAPER_DEFAULTS["gpt2-xl"]
    assert (xl.layers, xl.steps, xl.lr, xl.norm_constraint) == ((0,), 25, 5e-4, 5e-4)
    with pytest.raises(ValueError, match="objective"):
        edit(lm, GOOD, "ft-l", objective="last")


def test_sequential_edits_accumulate(lm, facts, unchanged):
    requests = [facts[3], facts[10], facts[20]]
    with edit(lm, requests, "ft", sequential=True) as result:
        m = summarize(score_requests(lm, requests))
        assert len(result.info) == 3
    assert m["reliability"] >= 2 / 3  # earlier edits survive later ones


def test_batch_edit_of_several_requests(lm, facts, unchanged):
    requests = facts[30:33]
    with edit(lm, requests, "ft"):
        m = summarize(score_requests(lm, requests))
    assert m["ES"] == 1.0


def test_defaults_per_model_family(lm):
    assert FTHParams.for_model(lm).norm_constraint is None
    assert FTLHParams.for_model(lm).norm_constraint > 0
    assert 0 <= FTLHParams.for_model(lm).layers[0] < lm.n_layers


GOOD = dict(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")


@pytest.mark.parametrize(
    "bad, overrides, error, match",
    [
        (dict(prompt="The Eiffel Tower is in"), {}, ValueError, "exactly one '{}'"),
        (dict(target_new=""), {}, ValueError, "target_new must not be empty"),
        (dict(target_new=" \t"), {}, ValueError, "target_new must not be empty"),
        (dict(subject=["Eiffel"]), {}, TypeError, "subject must be a string"),
        (
            dict(prompt="{} " + "very long " * 5000),
            {},
            ValueError,
            "longer than the model's context",
        ),
        ({}, dict(lr=float("nan")), ValueError, "lr must be finite"),
        ({}, dict(norm_constraint=float("inf")), ValueError, "norm_constraint must be finite"),
        ({}, dict(steps=-1), ValueError, "steps must not be negative"),
        ({}, dict(layers=(99,)), ValueError, "outside the model's 30 layers"),
        ({}, dict(learning_rate=1.0), TypeError, "unknown hyperparameter"),
    ],
)
def test_bad_input_is_rejected_before_any_weight_changes(
    lm, bad, overrides, error, match, unchanged
):
    with pytest.raises(error, match=match):
        edit(lm, {**GOOD, **bad}, "ft-l", **overrides)


def test_subject_missing_from_prompt_text(lm, unchanged):
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        edit(lm, EditRequest.from_text("The Louvre is in", "The Eiffel Tower", "Rome"), "ft")


def test_unknown_method_and_wrong_types(lm, unchanged):
    with pytest.raises(ValueError, match="unknown method 'rome2'"):
        edit(lm, GOOD, "rome2")
    with pytest.raises(TypeError, match="expected EditRequest"):
        edit(lm, ["not a request"], "ft")
    with pytest.raises(ValueError, match="no edit requests"):
        edit(lm, [], "ft")
    with pytest.raises(TypeError, match="FTLHParams"):
        edit(lm, GOOD, "ft-l", hparams=FTHParams())


@dataclass(frozen=True)
class _BreakingHParams:
    layer: int = 3

    @classmethod
    def for_model(cls, lm):
        return cls()


def test_a_failing_method_leaves_the_model_as_it_was(lm, unchanged):
    """A method that changes weights and then fails (NaN or an exception) is rolled back."""

    def params(lm, hp):
        return [lm.module_name("mlp_out", hp.layer) + ".weight"]

    @register("_test-nan", _BreakingHParams, params)
    def writes_nan(lm, requests, hp):
        lm.weight_out_in("mlp_out", hp.layer).data.fill_(math.nan)

    @register("_test-raise", _BreakingHParams, params)
    def raises(lm, requests, hp):
        lm.weight_out_in("mlp_out", hp.layer).data.add_(1.0)
        raise RuntimeError("diverged")

    try:
        with pytest.raises(FloatingPointError, match="non-finite"):
            edit(lm, GOOD, "_test-nan")
        with pytest.raises(RuntimeError, match="diverged"):
            edit(lm, GOOD, "_test-raise")
    finally:
        METHODS.pop("_test-nan")
        METHODS.pop("_test-raise")


def test_fingerprint_detects_a_one_ulp_change(lm, fingerprint):
    w = lm.weight_out_in("mlp_out", 0)
    old = w[0, 0].item()
    with torch.no_grad():
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(math.inf))
    try:
        assert weights_fingerprint(lm) != fingerprint
    finally:
        with torch.no_grad():
            w[0, 0] = old
    assert weights_fingerprint(lm) == fingerprint
