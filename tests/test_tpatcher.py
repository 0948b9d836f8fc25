"""T-Patcher on the real default model: a patch fixes a mistake, stays silent on the memory
set, and is removed exactly; bad input changes nothing."""

import math

import pytest
import torch

from medit_lite import edit
from medit_lite.methods import tpatcher as tp
from medit_lite.requests import EditRequest


def _n_params(lm):
    return sum(p.numel() for p in lm.model.parameters())


def _exact(lm, prompt, target):
    from medit_lite.lifelong import exact_matches

    return exact_matches(lm, [prompt], [target])[0]


@torch.no_grad()
def _logits(lm, texts):
    batch = lm.tokenize(texts)
    return lm.model(**batch).logits


def test_patch_fixes_a_mistake_is_silent_on_memory_and_restores(lm, facts, unchanged):
    request = facts[0]  # The capital of Japan is -> Moscow
    assert not _exact(lm, request.text, request.target_new)
    memory_texts = tp.builtin_memory_texts()
    before = _logits(lm, memory_texts[:12])
    n_before = _n_params(lm)

    result = edit(lm, request, "tpatcher")
    layer = lm.n_layers - 1
    info = result.info[0]["edits"][0]
    bank = tp.PatchBank.of(lm, layer)
    (patch,) = bank.patches
    # a real module inside the last FFN, with one neuron per wrong target token
    assert f"{lm.module_name('mlp', layer)}.{tp.BANK_NAME}.patches.0.keys" in dict(
        lm.model.named_parameters()
    )
    assert patch.n_neurons == info["neurons"] >= 1
    assert _n_params(lm) - n_before == patch.n_neurons * (2 * lm.d_model + 1)
    assert _exact(lm, request.text, request.target_new)
    assert lm.generate(request.text, 3).strip().startswith("Moscow")
    # it fires on the edit's last prompt token ...
    assert tp.patch_activations(lm, [request.text]).max() > 0
    # ... and on no position of the memory set (but the first, left out as in the paper)
    memory = tp.memory_queries(lm, layer, memory_texts)
    assert patch.pre_activation(memory).max() < 0
    # so the model's logits on those texts are bit-identical, except at the first position
    after = _logits(lm, memory_texts[:12])
    assert torch.equal(before[:, 1:], after[:, 1:])
    assert info["steps"] < result.hparams.max_steps
    result.restore()
    assert tp.PatchBank.of(lm, layer) is None
    assert not _exact(lm, request.text, request.target_new)


def test_correct_prediction_is_not_patched(lm, unchanged):
    prompt = "The capital of France is"
    target = lm.generate(prompt, 3).split()[0].strip(".")
    result = edit(
        lm,
        EditRequest(prompt="The capital of {} is", subject="France", target_new=target),
        "tpatcher",
    )
    assert result.info[0]["neurons"] == 0 and result.info[0]["edits"][0]["skipped"]
    assert tp.PatchBank.of(lm, lm.n_layers - 1) is None
    result.restore()


def test_sequential_patches_keep_earlier_edits_and_restore(lm, facts, unchanged):
    requests = [facts[1], facts[2]]
    with edit(lm, requests, "tpatcher", sequential=True) as result:
        assert all(_exact(lm, r.text, r.target_new) for r in requests)
        assert len(tp.PatchBank.of(lm, lm.n_layers - 1).patches) == 2
        # the second patch was trained with the first edit in its memory
        assert result.info[1]["edits"][0]["memory_size"] > result.info[0]["edits"][0]["memory_size"]


def test_other_layer_attaches_and_restores(lm, facts, unchanged):
    layer = lm.n_layers - 3
    memory = tuple(tp.builtin_memory_texts()[:8])  # a small memory keeps this test short
    with edit(lm, facts[3], "tpatcher", layer=layer, max_steps=3, memory_texts=memory) as result:
        assert result.info[0]["layer"] == layer
        assert len(tp.PatchBank.of(lm, layer).patches) == 1


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"layer": 99}, ValueError),
        ({"max_neurons": 0}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"value_lr": 0.0}, ValueError),
        ({"memory_texts": "not a tuple"}, TypeError),
        ({"no_such_field": 1}, TypeError),
    ],
)
def test_bad_hparams_error_and_change_nothing(lm, facts, overrides, error, unchanged):
    with pytest.raises(error):
        edit(lm, facts[0], "tpatcher", **overrides)


def test_bad_request_errors_and_changes_nothing(lm, facts, unchanged):
    with pytest.raises(ValueError):
        edit(lm, [facts[0], {"prompt": "{} is", "subject": "x", "target_new": " "}], "tpatcher")


def test_failure_mid_stream_removes_every_patch(lm, facts, monkeypatch, unchanged):
    real, calls = tp.patch_one, []

    def flaky(lm_, request, hp):
        calls.append(request)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(lm_, request, hp)

    monkeypatch.setattr(tp, "patch_one", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        edit(lm, [facts[4], facts[5]], "tpatcher", sequential=True)


def test_losses_match_hand_computation():
    edit_pre = torch.tensor([1.0, -1.0])
    # activation loss: mean of exp(m_a - a) over the neurons
    assert math.isclose(
        float(tp.activation_loss(edit_pre, 0.5)), (math.exp(-0.5) + math.exp(1.5)) / 2, rel_tol=1e-6
    )
    memory_pre = torch.tensor([[-4.0, -2.0], [-5.0, 0.0], [-3.5, -6.0]])
    # S(z; 2) on memory_pre + 3: values -1,1,-2,3,-0.5,-3 -> top-2 are 3 and 1
    silent = (math.exp(3) + math.exp(1)) / 2
    # gap: memory_pre - edit_pre + 3: -2,2,-3,4,-1.5,-2 -> top-2 are 4 and 2
    gap = (math.exp(4) + math.exp(2)) / 2
    got = float(tp.memory_loss(memory_pre, edit_pre, 3.0, 3.0, top_k=2))
    assert math.isclose(got, silent + gap, rel_tol=1e-6)
    assert math.isclose(float(tp.top_k_exp_mean(torch.tensor([0.0]), 5)), 1.0)


def test_probe_memory_texts_hold_out_the_stream():
    from medit_lite.requests import Probe

    def req(i, probes):
        return EditRequest(f"Question {i} about {{}}?", f"S{i}", f"T{i}",
                           paraphrases=(f"Other question {i} about S{i}?",),
                           neighborhood=tuple(Probe(p, a) for p, a in probes))  # fmt: skip

    stream = [req(0, [("nq: shared", "x")]), req(1, [("nq: one", "y")])]
    held_out = [
        req(2, [("nq: two", "a"), ("nq: shared", "x")]),  # a stream probe: never memory
        req(3, [("nq: three", "b"), ("nq: two", "a"), ("Question 0 about S0?", "T0")]),
    ]
    texts = tp.probe_memory_texts(held_out, exclude=stream)
    assert texts == ("nq: two a", "nq: three b")
    assert tp.probe_memory_texts(held_out, exclude=stream, limit=1) == ("nq: two a",)
    assert tp.probe_memory_texts(held_out) == ("nq: two a", "nq: shared x", "nq: three b",
                                               "Question 0 about S0? T0")  # fmt: skip


def test_patch_firing_reads_which_patch_fires_on_which_neighbor(lm, facts, unchanged):
    """The firing analysis (issue: T-Patcher keeps neighbors on CounterFact) agrees with
    the patches' own activations: a patch fires on its edit prompt, and a neighbor counts
    as "firing" exactly when some patch neuron is active at its last token."""
    from medit_lite.analysis.patch_firing import neighbor_scores, patch_firing, stream_patches

    stream = facts[:3]
    before = neighbor_scores(lm, stream)
    assert [len(s) for s in before] == [len(r.neighborhood) for r in stream]
    with edit(lm, stream, "tpatcher", sequential=True) as result:
        patches = stream_patches(result)
        assert len(patches) == 3 and all(p is not None for p in patches)
        own = tp.patch_activations(lm, [r.text for r in stream])  # one neuron per edit here
        assert own.shape == (3, sum(p.n_neurons for p in patches)) and (own.diagonal() > 0).all()
        stats = patch_firing(lm, result, before)
        prompts = [p.prompt for r in stream for p in r.neighborhood]
        active = (tp.patch_activations(lm, prompts) > 0).any(-1)
    assert stats["neighbors"] == len(prompts) and stats["patches"] == 3
    assert math.isclose(stats["fires_any"], active.double().mean().item(), rel_tol=1e-9)
    assert stats["fires_own_patch"] <= stats["fires_any"]
    assert stats["ns_before"] == sum(map(sum, before)) / len(prompts)
    with pytest.raises(ValueError, match="T-Patcher"):
        with edit(lm, stream[0], "ft-l", steps=1) as other:
            stream_patches(other)
