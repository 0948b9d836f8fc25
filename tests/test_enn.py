"""Editable Neural Networks (Sinitsin et al., 2020) on the real default model: the edit is
k gradient steps with the learned step sizes, training's low-rank inner step equals that
edit, editable training runs, installing the base and every restore are bit-exact."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from medit_lite import edit, weights_fingerprint
from medit_lite.hooks import Hooks
from medit_lite.methods import enn
from medit_lite.methods.meta_edit import add_row_updates, examples, pad
from medit_lite.metrics import encode_pair, score_targets
from medit_lite.replay import final_hidden, replay_layers
from medit_lite.requests import EditRequest

#: a small training budget for the tests (the default: 150 steps on 120 records)
SMALL = {"train_records": 16, "train_steps": 6, "batch_size": 4}


def _perturbed_base(lm, hp, seed=0):
    """A base whose θ differs from the pretrained weights (as after editable training)."""
    torch.manual_seed(seed)
    base = enn.new_base(lm, hp)
    with torch.no_grad():
        for w in base.weights:
            w.add_(1e-3 * torch.randn_like(w))
        base.edit_lrs.mul_(torch.linspace(0.5, 1.5, len(base.names)))
    base.requires_grad_(False)
    return base


def test_inner_names_are_every_mlp_matrix_of_the_last_layers(lm):
    hp = enn.ENNHParams.for_model(lm)
    names = enn.inner_names(lm, hp.layers)
    assert len(names) == 3 * len(hp.layers)  # gate, up, down
    assert all(".mlp." in n for n in names)


def test_edit_is_k_sgd_steps_with_the_learned_rates(lm, facts, unchanged):
    hp = enn.ENNHParams.for_model(lm)
    base = _perturbed_base(lm, hp)
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in base.names}
    try:
        enn._write_base(lm, base)
        request = facts[0]
        weights = [params[n] for n in base.names]
        for w in weights:
            w.requires_grad_(True)
        p, t = encode_pair(lm, request.text, request.target_new)
        ids = torch.tensor([p + t])
        logits = lm.model(input_ids=ids).logits[0]
        pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
        loss = torch.nn.functional.cross_entropy(logits[pos].float(), torch.tensor(t))
        grads = torch.autograd.grad(loss, weights)
        for w in weights:
            w.requires_grad_(False)
        steps = [(lr * g).detach() for g, lr in zip(grads, base.edit_lrs)]
        expected = [w.detach() - s for w, s in zip(weights, steps)]
        enn.edit_steps(lm, base, [request], 1)
        for w, e, s in zip(weights, expected, steps):
            assert float(s.abs().max()) > 0
            assert float((w - e).abs().max()) <= 1e-3 * float(s.abs().max())
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def test_training_inner_step_equals_the_real_edit(lm, unchanged):
    """The low-rank per-row inner step of editable training gives the same logits on the
    equivalent input as writing θ − η∇ into the model."""
    hp = enn.ENNHParams.for_model(lm)
    base = _perturbed_base(lm, hp, seed=1)
    r = EditRequest(
        prompt="{} is located in",
        subject="The Eiffel Tower",
        target_new="Rome",
        paraphrases=["Where is the Eiffel Tower? It is in"],
        neighborhood=[("The Louvre is located in", "Paris")],
    )
    (ex,) = examples(lm, [r])
    trainer = enn._Trainer(lm, base, hp, [ex])
    with torch.enable_grad():
        steps = trainer._inner_steps([ex], trainer.cache.hidden([ex], [0]))
    seq = ex.equiv[0] + ex.equiv[1]
    ids, mask = pad([seq], lm.tokenizer.pad_token_id)
    with torch.no_grad(), Hooks() as h:
        enn._shift_hooks(h, trainer.modules, base, trainer.originals)
        add_row_updates(h, trainer.modules, steps)
        with replay_layers(lm, trainer.first, trainer.cache.hidden([ex], [1])):
            fast = lm.module("unembed")(final_hidden(lm, input_ids=ids, attention_mask=mask)[0])
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in base.names}
    try:
        enn._write_base(lm, base)
        enn.edit_steps(lm, base, [r], 1)
        with torch.no_grad():
            real = lm.model(input_ids=ids).logits[0]
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
    assert torch.allclose(fast.float(), real.float(), atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def small_enn(lm, facts, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("medit_cache")
    mp.setenv("MEDIT_CACHE", str(cache))
    try:
        hp = dataclasses.replace(enn.ENNHParams.for_model(lm), **SMALL)
        base, log = enn.enn_base(lm, hp)
        request = facts[0]
        before = score_targets(lm, [request.text], [request.target_new])[0].prob
        with edit(lm, request, "enn", **SMALL) as result:
            after = score_targets(lm, [request.text], [request.target_new])[0].prob
            info = result.info[0]
    finally:
        mp.undo()
    return {
        "cache": cache,
        "log": log,
        "base": base,
        "before": before,
        "after": after,
        "info": info,
    }


def test_editable_training_runs_and_moves_theta_and_rates(lm, small_enn):
    log, base = small_enn["log"], small_enn["base"]
    assert (small_enn["cache"] / "trained" / "enn").is_dir()
    assert log.steps == SMALL["train_steps"]
    assert all(math.isfinite(x) for x in log.losses)
    assert {"edit_nll", "loc_kl", "base_kl"} <= set(log.logs)
    params = dict(lm.model.named_parameters())
    moved = [
        not torch.equal(theta, enn._out_in(lm, enn._module(lm, n), params[n]).float())
        for n, theta in zip(base.names, base.weights)
    ]
    assert all(moved)
    assert not torch.allclose(base.edit_lrs, torch.full_like(base.edit_lrs, 1e-2))


def test_an_edit_raises_the_new_target(small_enn):
    assert small_enn["info"]["installed_base"] is True
    assert small_enn["after"] > 5 * small_enn["before"]


def test_install_and_every_restore_are_bit_exact(lm, facts, tmp_path, monkeypatch, unchanged):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    hp = dataclasses.replace(enn.ENNHParams.for_model(lm), **SMALL)
    with enn.install(lm, hp):
        assert enn.is_installed(lm)
        installed = weights_fingerprint(lm)
        result = edit(lm, facts[:2], "enn", **SMALL)
        assert result.info[0]["installed_base"] is False
        result.restore()
        assert weights_fingerprint(lm) == installed  # back to the ENN base, not further
        edit(lm, facts[:3], "enn", sequential=True, **SMALL).restore()
        assert weights_fingerprint(lm) == installed
        with pytest.raises(RuntimeError):
            enn.install(lm, hp)
    assert not enn.is_installed(lm)
    # without the base installed: the edit installs it, restore returns to the pretrained
    result = edit(lm, facts[1], "enn", **SMALL)
    assert enn.is_installed(lm)
    result.restore()
    assert not enn.is_installed(lm)


@pytest.mark.parametrize(
    "overrides", [{"layers": (30,)}, {"edit_lr": math.nan}, {"layers": (28, 28)}, {"edit_steps": 0}]
)
def test_bad_hyperparameters_fail_before_any_change(lm, facts, unchanged, overrides):
    with pytest.raises(ValueError):
        edit(lm, facts[0], "enn", **{**SMALL, **overrides})


def test_too_long_prompt_fails_before_any_change(lm, unchanged):
    long = EditRequest(prompt="word " * 9000 + "{} is in", subject="Paris", target_new="Rome")
    with pytest.raises(ValueError):
        edit(lm, long, "enn", **SMALL)
    assert not enn.is_installed(lm)
