"""KnowledgeEditor (De Cao et al., 2021) on the real default model: the low-rank form of
the hypernetwork's update equals the paper's ``s·(α̂ ⊙ ∇W + β̂)``, the Lagrangian's
multiplier and margin schedule, a small trained hypernetwork, exact restore, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from medit_lite import edit
from medit_lite.methods import ke
from medit_lite.methods.meta_edit import module_gradient_pairs
from medit_lite.metrics import encode_pair, score_targets
from medit_lite.requests import EditRequest

#: a small training budget for the tests (the default: 300 steps on 120 records at lr 1e-3)
SMALL = {"train_records": 24, "train_steps": 40, "batch_size": 4, "lr": 3e-3}


def _autograd_weight_gradient(lm, layer, pair, label_smoothing):
    w = lm.weight_out_in("mlp_out", layer)
    w.requires_grad_(True)
    try:
        ids = torch.tensor([pair[0] + pair[1]])
        logits = lm.model(input_ids=ids).logits[0]
        pos = torch.arange(len(pair[0]) - 1, len(pair[0]) + len(pair[1]) - 1)
        loss = torch.nn.functional.cross_entropy(
            logits[pos].float(), torch.tensor(pair[1]), label_smoothing=label_smoothing
        )
        (g,) = torch.autograd.grad(loss, w)
    finally:
        w.requires_grad_(False)
    return g.float()


def test_update_pairs_equal_the_papers_update(lm, unchanged):
    """Σ d vᵀ over the pairs == max_scale · σ(η) · (softmax(α_row)ᵀα_col ⊙ ∇W + β̂)."""
    hp = ke.KEHParams.for_model(lm)
    torch.manual_seed(0)
    editor = ke.new_editor(lm, hp)
    with torch.no_grad():  # a non-trivial scale and bias, not the initial ones
        for p in editor.conditioners.parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")
    pair = encode_pair(lm, r.text, r.target_new)
    layer = hp.layers[1]
    (grads,) = module_gradient_pairs(
        lm, [lm.module("mlp_out", layer)], [pair], label_smoothing=hp.label_smoothing
    )
    condition = editor.encode(lm, ke._condition_ids(lm, [r], ["Paris"]))
    with torch.no_grad():
        _, v, d = editor.update_pairs(1, condition, grads)
        ours = d.T @ v
        a_col, a_row, b_col, b_row, eta = editor.conditioners[1](condition)
        alpha = a_row.softmax(-1).T @ a_col
        beta = b_row.softmax(-1).T @ b_col
    grad = _autograd_weight_gradient(lm, layer, pair, hp.label_smoothing)
    paper = hp.max_scale * torch.sigmoid(eta).squeeze() * (grad * alpha + beta)
    assert torch.allclose(ours, paper, rtol=1e-3, atol=1e-6 * float(paper.abs().max()))


def test_condition_text_is_the_authors_format():
    assert ke.condition_text(" Paris", "Rome ", "Where is it?") == "Paris >> Rome || Where is it?"


def test_multiplier_ascends_and_is_projected_and_the_margin_anneals(lm):
    hp = dataclasses.replace(ke.KEHParams.for_model(lm), anneal_every=2)
    editor = ke.new_editor(lm, hp)
    # gradient *ascent* on λ: the loss λ (KL − m) with KL > m pushes λ up
    editor.multiplier.grad = None
    (editor.multiplier * torch.tensor(0.5)).backward()
    assert editor.multiplier.grad < 0  # the optimiser's descent then increases λ
    trainer = object.__new__(ke._Trainer)
    trainer.editor, trainer.hp, trainer.flipped = editor, hp, [1.0, 1.0]
    with torch.no_grad():
        editor.multiplier.fill_(-3.0)
    trainer.after_step(2, None)
    assert float(editor.multiplier.detach()) == 0.0
    assert math.isclose(float(editor.margin), hp.margin_kl_max * hp.margin_decay, rel_tol=1e-6)
    trainer.flipped += [1.0, 0.0]  # 50% success: the margin stays
    trainer.after_step(4, None)
    assert math.isclose(float(editor.margin), hp.margin_kl_max * hp.margin_decay, rel_tol=1e-6)
    for step in range(6, 400, 2):
        trainer.flipped += [1.0, 1.0]
        trainer.after_step(step, None)
    assert math.isclose(float(editor.margin), hp.margin_kl_min, rel_tol=1e-6)


@pytest.fixture(scope="module")
def small_ke(lm, facts, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("medit_cache")
    mp.setenv("MEDIT_CACHE", str(cache))
    try:
        request = next(r for r in facts if r.text.startswith("The Eiffel Tower"))  # -> Rome
        before = score_targets(lm, [request.text], [request.target_new])[0].prob
        with edit(lm, request, "ke", **SMALL) as result:
            after = score_targets(lm, [request.text], [request.target_new])[0].prob
            info = result.info[0]
        _, log = ke.ke_editor(lm, dataclasses.replace(ke.KEHParams.for_model(lm), **SMALL))
    finally:
        mp.undo()
    return {"cache": cache, "before": before, "after": after, "info": info, "log": log}


def test_small_trained_hypernetwork_learns_to_edit(small_ke):
    assert (small_ke["cache"] / "trained" / "ke").is_dir()
    # P(new) after one edit of a 40-step hypernetwork is noise-level on this model
    # (measured 0.0057 -> 0.024 with one thread, 0.0079 and 0.0048 with two); what a short
    # training does show is that the post-edit NLL of its edits falls
    assert small_ke["after"] != small_ke["before"]
    log = small_ke["log"]
    nll = log.logs["edit_nll"]
    assert sum(nll[-10:]) / 10 < sum(nll[:10]) / 10 - 0.5  # the hypernetwork learns to edit
    assert log.steps == SMALL["train_steps"]
    assert all(m >= 0 for m in log.logs["multiplier"])
    assert all(math.isfinite(x) for x in log.losses)


def test_restore_is_bit_exact(lm, facts, tmp_path, monkeypatch, unchanged):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    result = edit(lm, facts[:2], "ke", **SMALL)
    assert len(result.changed) == 3
    result.restore()
    edit(lm, facts[:3], "ke", sequential=True, **SMALL).restore()


@pytest.mark.parametrize(
    "overrides",
    [
        {"layers": (30,)},
        {"lr": math.nan},
        {"layers": (28, 28)},
        {"hidden_dim": 0},
        {"margin_kl_min": 1.0},
    ],
)
def test_bad_hyperparameters_fail_before_any_change(lm, facts, unchanged, overrides):
    with pytest.raises(ValueError):
        edit(lm, facts[0], "ke", **{**SMALL, **overrides})


def test_bad_requests_fail_before_any_change(lm, unchanged):
    long = EditRequest(prompt="word " * 9000 + "{} is in", subject="Paris", target_new="Rome")
    with pytest.raises(ValueError):
        edit(lm, long, "ke", **SMALL)
    with pytest.raises(ValueError):
        edit(lm, EditRequest(prompt="{} is in", subject="Paris", target_new=""), "ke", **SMALL)
