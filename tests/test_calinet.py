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
    negative_relations,
    relation_templates,
)

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
    ],
)
def test_bad_hparams_rejected(lm, facts, unchanged, overrides, error):
    with pytest.raises(error):
        edit(lm, facts[:2], "calinet", **overrides)
