"""GRACE on the real default model: codebook rules, deferral at known distances, restore."""

from __future__ import annotations

import math

import pytest
import torch

from medit_lite import edit, score_requests, summarize
from medit_lite.methods.grace import (
    Codebook,
    EditSite,
    GraceHParams,
    codebook_size,
    deferral,
    update_codebook,
)


def _state(book: Codebook):
    return (
        book.keys.detach().clone(),
        book.values.detach().clone(),
        book.epsilons.detach().clone(),
        list(book.labels),
    )


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


def test_edit_flips_fact_keeps_neighbors_and_generates(lm, facts, unchanged):
    fact = facts[6]  # The Eiffel Tower is located in the city of -> Rome
    before = summarize(score_requests(lm, [fact]))
    with edit(lm, fact, "grace") as result:
        after = summarize(score_requests(lm, [fact]))
        text = lm.generate(fact.text, max_new_tokens=3)
        info = result.info[0]["edits"][0]
        assert info["rule"] == "add" and info["entries"] == 1
    assert before["ES"] == 0.0 and after["ES"] == 1.0
    assert after["reliability"] == 1.0
    assert after["NS"] >= before["NS"] - 1 / len(fact.neighborhood)
    assert text.strip().startswith(fact.target_new), text


def test_defers_outside_eps_and_not_inside(lm, facts, unchanged):
    """Queries built at known distances from the key: inside ε the projection answers with
    the stored value, outside it returns its own output."""
    fact = facts[0]
    hp = GraceHParams.for_model(lm)
    with edit(lm, fact, "grace"):
        book = Codebook.of(lm, hp.layer_of(lm))
        key, value, eps = book.keys[0], book.values[0], float(book.epsilons[0])
        u = torch.randn(key.shape[0], generator=torch.Generator().manual_seed(0))
        u = u / u.norm()
        q = torch.stack([key + 0.5 * eps * u, key + 0.99 * eps * u, key + 1.5 * eps * u])
        use, nearest, dist = deferral(q, book.keys, book.epsilons)
        assert use.tolist() == [True, True, False]
        assert torch.allclose(dist, torch.tensor([0.5, 0.99, 1.5]) * eps, rtol=1e-4)
        proj = lm.module("mlp_out", hp.layer_of(lm))
        with torch.no_grad():
            out = proj(q[None].to(lm.dtype))[0]
            plain = torch.nn.functional.linear(q.to(lm.dtype), proj.weight)
        assert torch.equal(out[0], value.to(out.dtype)) and torch.equal(out[1], value)
        assert torch.allclose(out[2], plain[2]) and not torch.allclose(out[2], value)
        # an unrelated prompt defers at every position
        lm.model(**lm.tokenize(["Bananas are a kind of fruit that grows in"]))
        assert not book.last_use.any()


def _site(query, label):
    return EditSite(
        ids=torch.zeros(1, 2, dtype=torch.long),
        target_ids=torch.tensor(label),
        key_pos=0,
        query=query,
        layer_out=torch.zeros(3),
    )


def test_codebook_rules_add_split_expand():
    """The paper's three rules on a small synthetic codebook (ε_init = 1)."""
    hp = GraceHParams(eps=1.0)
    book = Codebook(2, 3, "cpu", torch.float32)
    v = torch.zeros(3)
    assert update_codebook(book, _site(torch.tensor([0.0, 0.0]), [7]), v, hp)[1] == "add"
    # far away (d = 5 > ε_init + ε_0 = 2): a new key
    assert update_codebook(book, _site(torch.tensor([5.0, 0.0]), [8]), v, hp)[1] == "add"
    assert len(book) == 2
    # d = 1.5 from key 0, other label: conflict, split both radii to d/2
    i, rule, (n_before, saved) = update_codebook(book, _site(torch.tensor([0.0, 1.5]), [9]), v, hp)
    assert (i, rule, n_before, saved[0]) == (2, "split", 2, 0)
    assert math.isclose(float(book.epsilons[0]), 0.75 - 1e-5, rel_tol=1e-6)
    assert math.isclose(float(book.epsilons[2]), 0.75, rel_tol=1e-6)
    # d = 1.2 from key 1 (ε 1), same label: expand ε_1 to 1.2, no new key
    i, rule, _ = update_codebook(book, _site(torch.tensor([5.0, -1.2]), [8]), v, hp)
    assert (i, rule, len(book)) == (1, "expand", 3)
    assert math.isclose(float(book.epsilons[1]), 1.2, rel_tol=1e-6)


def test_sequential_codebook_accumulates_and_restores_newest_first(lm, facts, unchanged):
    hp = GraceHParams.for_model(lm)
    layer = hp.layer_of(lm)
    first = edit(lm, facts[0], "grace")
    state1 = _state(Codebook.of(lm, layer))
    second = edit(lm, [facts[12], facts[24]], "grace", sequential=True)
    assert codebook_size(lm, layer) == 3
    rows = score_requests(lm, [facts[0], facts[12], facts[24]])
    assert all(r["ES"] == 1.0 for r in rows)
    second.restore()
    assert _same(_state(Codebook.of(lm, layer)), state1)
    first.restore()
    assert Codebook.of(lm, layer) is None


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"eps": float("nan")}, ValueError),
        ({"eps": 0.0}, ValueError),
        ({"layer": 99}, ValueError),
        ({"n_iter": 0}, ValueError),
        ({"val_init": "hot"}, ValueError),
        ({"edit_lr": "1"}, TypeError),
    ],
)
def test_bad_hparams_rejected_before_changes(lm, facts, unchanged, overrides, error):
    with pytest.raises(error):
        edit(lm, facts[0], "grace", **overrides)


def test_bad_requests_rejected(lm, facts, unchanged):
    with pytest.raises(ValueError):
        edit(lm, {"prompt": "{} is in", "subject": "Paris", "target_new": " "}, "grace")
    long = {"prompt": "{} " + "word " * 9000, "subject": "Paris", "target_new": "France"}
    with pytest.raises(ValueError, match="longer than"):
        edit(lm, long, "grace")
