"""CaliNet on the real default model: the knowledge assessment and batch calibration."""

from __future__ import annotations

import json

import pytest
from conftest import shared_or_skip

from medit_lite import edit, score_requests, summarize
from medit_lite.methods.calinet import (
    Fact,
    SlotBank,
    assess,
    facts_from_known,
    facts_from_requests,
    kl_to_reference,
    negative_relations,
    relation_templates,
)
from medit_lite.methods.tpatcher import builtin_memory_texts

FAST = {"steps": 60}  # enough for a handful of built-in facts


@pytest.fixture(autouse=True)
def _tmp_cache(lm, tmp_path, monkeypatch):
    """Trained slots go to a temporary cache (the model is loaded before, from the real one)."""
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path / "cache"))


def test_assessment_ranks_known_fact_above_unknown(lm, facts):
    true_facts = facts_from_requests(facts)
    templates, negatives = relation_templates(true_facts), negative_relations(true_facts)
    japan = next(f for f in true_facts if f.subject == "Japan" and f.object == "Tokyo")
    wrong = Fact(japan.subject, japan.relation, japan.template, "Moscow")
    rows = assess(lm, [japan, wrong], templates, negatives)
    # CKA is a ratio: the counterfactual object is not "unknown" in absolute terms (a
    # capital is likelier after "capital of" than after other relations), but it ranks far
    # below the true one
    assert rows[0]["known"] and rows[0]["score"] > 10 * rows[1]["score"]
    # three negatives per relation, never the relation itself
    assert all(len(n) == 3 and rel not in n for rel, n in negatives.items())


def test_assessment_on_known_1000_separates_right_from_wrong(lm):
    records = json.loads(shared_or_skip("known_1000.json").read_text())
    pool = facts_from_known(records)
    templates, negatives = relation_templates(pool), negative_relations(pool)
    facts = pool[:40]
    rows = assess(lm, facts, templates, negatives)
    top1 = [r["p_true"] for r in rows]
    assert all(0 <= p <= 1 for p in top1)
    known = [r["score"] for r in rows if r["known"]]
    unknown = [r["score"] for r in rows if not r["known"]]
    assert known and min(known) > 1 >= max(unknown, default=0)


def test_assessment_rejects_bad_facts(lm):
    with pytest.raises(ValueError):
        assess(lm, [])
    with pytest.raises(ValueError, match="negative"):
        assess(lm, [Fact("Japan", "capital", "The capital of {} is", "Tokyo")])


def test_batch_calibration_flips_facts_keeps_other_facts_and_restores(lm, facts, unchanged):
    """One slot set for a batch of facts: they flip; facts of other relations keep their
    answers (neighbors of the *same* relation are CaliNet's weak spot, see the chapter)."""
    batch = [f for f in facts if f.relation in ("capital_of", "official_language")]
    others = [f for f in facts if f.relation in ("currency", "plays_sport", "instrument")]
    before = summarize(score_requests(lm, batch))
    kept_before = [r["ES"] for r in score_requests(lm, others)]
    with edit(lm, batch, "calinet", **FAST) as result:
        after = summarize(score_requests(lm, batch))
        kept_after = [r["ES"] for r in score_requests(lm, others)]
        info = result.info[0]
        assert info["facts"] == len(batch) and info["statements"] > len(batch)
        assert info["added_params"] == 3 * 64 * lm.d_model
    assert before["ES"] < 0.2 and after["ES"] >= 0.9
    # the other facts' own counterfactuals do not start winning: they still prefer the truth
    assert sum(kept_after) - sum(kept_before) <= 0.2 * len(others)


def test_trained_slots_are_cached(lm, facts, unchanged):
    batch = facts[:6]
    with edit(lm, batch, "calinet", **FAST) as first:
        pass
    with edit(lm, batch, "calinet", **FAST) as second:
        pass
    assert not first.info[0]["from_cache"] and second.info[0]["from_cache"]
    assert second.info[0]["final_loss"] == first.info[0]["final_loss"]


def test_sequential_adds_one_slot_set_per_edit_and_restores(lm, facts, unchanged):
    layer = lm.n_layers - 1
    result = edit(lm, facts[:2], "calinet", sequential=True, **FAST)
    assert len(SlotBank.of(lm, layer).sets) == 2
    first = edit(lm, facts[2], "calinet", **FAST)
    assert len(SlotBank.of(lm, layer).sets) == 3
    first.restore()
    assert len(SlotBank.of(lm, layer).sets) == 2
    result.restore()
    assert SlotBank.of(lm, layer) is None


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"lr": float("nan")}, ValueError),
        ({"n_slots": 0}, ValueError),
        ({"layer": 30}, ValueError),
        ({"steps": 1.5}, ValueError),
        ({"lr": "fast"}, TypeError),
        ({"locality_weight": -1.0}, ValueError),
        ({"locality_positions": 0}, ValueError),
        ({"memory_texts": "one text"}, TypeError),
        ({"memory_texts": ("",)}, TypeError),
    ],
)
def test_bad_hparams_rejected(lm, facts, unchanged, overrides, error):
    with pytest.raises(error):
        edit(lm, facts[:2], "calinet", **overrides)


def _next_token_logits(lm, texts):
    import torch

    with torch.no_grad():
        batch = lm.tokenize(texts)
        keep = batch["attention_mask"].bool()
        return lm.model(**batch).logits[keep & (keep.long().cumsum(-1) > 1)]


def test_locality_variant_keeps_held_out_text_closer_to_the_model(lm, facts, unchanged):
    """This project's KL term (``locality_weight``) trained on some ordinary texts keeps the
    next-token distributions of *other* ordinary texts closer to the unedited model than
    CaliNet as published does, and still calibrates the batch."""
    texts = builtin_memory_texts()
    memory, held_out = tuple(texts[:100]), texts[100:]
    batch = [f for f in facts if f.relation in ("capital_of", "official_language")]
    reference = _next_token_logits(lm, held_out)
    drift = {}
    for weight in (0.0, 10.0):
        hp = dict(FAST, locality_weight=weight, memory_texts=memory)
        with edit(lm, batch, "calinet", **hp) as result:
            drift[weight] = float(kl_to_reference(reference, _next_token_logits(lm, held_out)))
            assert summarize(score_requests(lm, batch))["ES"] >= 0.9
            info = result.info[0]
            assert (info["final_locality_kl"] is None) == (weight == 0)
    assert drift[10.0] < 0.5 * drift[0.0]


def test_locality_variant_in_a_middle_layer_runs_and_restores(lm, facts, unchanged):
    """The other training path (the whole model runs each step, slots muted for the
    reference): a short run changes the model and restores it."""
    hp = dict(steps=3, layer=lm.n_layers - 3, locality_weight=1.0)
    with edit(lm, facts[:2], "calinet", **hp) as result:
        assert result.info[0]["final_locality_kl"] is not None
        assert SlotBank.of(lm, lm.n_layers - 3) is not None
    assert SlotBank.of(lm, lm.n_layers - 3) is None
