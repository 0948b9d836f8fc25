"""SERAC on the real default model: the scope classifier separates an edit's paraphrase
from an unrelated prompt, routing reaches teacher-forced scoring and ``generate``, restore
is exact, bad input changes nothing. The classifier is trained on a small budget in a
temporary cache."""

import pytest
import torch

from medit_lite import edit
from medit_lite.context_routing import router_of
from medit_lite.methods import serac
from medit_lite.metrics import locality_reference, score_requests, score_targets
from medit_lite.requests import EditRequest

SMALL = {"train_records": 120, "steps": 150}


@pytest.fixture(scope="module")
def small(lm, tmp_path_factory):
    """A small classifier, trained once for this module in a temporary $MEDIT_CACHE."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDIT_CACHE", str(tmp_path_factory.mktemp("medit_cache")))
    hp = serac.SeracHParams(**SMALL)
    clf, log = serac.scope_classifier(lm, hp)
    yield hp, clf, log
    mp.undo()


def test_training_is_logged_cached_and_reloaded(lm, small, tmp_path_factory):
    hp, clf, log = small
    assert log.steps == SMALL["steps"] and not log.from_cache
    assert sum(log.losses[-10:]) / 10 < sum(log.losses[:10]) / 10
    assert log.path.endswith(".safetensors") and "medit_cache" in log.path
    weights = clf.proj.weight.clone()
    serac._TRAINED.clear()  # forget the in-memory copy: the next call reads the disk
    clf2, log2 = serac.scope_classifier(lm, hp)
    assert log2.from_cache and torch.equal(clf2.proj.weight, weights)


def test_classifier_scope(lm, facts, small):
    hp = small[0]
    request = facts[0]  # The capital of Japan is -> Moscow
    unrelated = next(f for f in facts if f.relation != request.relation).text
    s = serac.scope_scores(lm, [request.paraphrases[0], unrelated], [request.text], hp)
    assert s[0, 0] > hp.threshold > s[1, 0]


def test_edit_flips_keeps_neighbors_and_restores(lm, facts, small, unchanged):
    request = facts[0]
    ref = locality_reference(lm, [request])
    before = lm.generate(request.text, 4)
    with edit(lm, request, "serac", **SMALL) as result:
        row = score_requests(lm, [request], ref)[0]
        assert row["ES"] == 1.0 and row["reliability"] == 1.0
        assert row["NS"] >= 0.8 and row["locality"] >= 0.8
        assert lm.generate(request.text, 4).strip().startswith(request.target_new)
        assert result.changed == [] and result.info[0]["memory_size"] == 1
    assert router_of(lm) is None and "forward" not in lm.model.__dict__
    assert lm.generate(request.text, 4) == before


def test_routing_is_seen_by_scoring_and_generate(lm, facts, small, unchanged):
    request = facts[0]
    unrelated = next(f for f in facts if f.relation != request.relation).text
    # the unrelated prompt scored with a target that *contains* the edit: the decision is
    # made on the prompt only, so the row must not be routed
    pairs = ([unrelated, request.text], [f"{request.text} {request.target_new}", "Tokyo"])
    base = score_targets(lm, *pairs)
    base_gen = lm.generate([unrelated, request.text], 5)
    with edit(lm, request, "serac", **SMALL):
        routed = score_targets(lm, *pairs)
        routes = router_of(lm).last_routes
        assert routes[0] is None and routes[1] is not None and routes[1].source == "serac"
        # the unrouted row is the model's own answer (full logits here, the vocabulary
        # projection at the target positions only without a router: equal to rounding)
        assert torch.allclose(routed[0].logprobs, base[0].logprobs, atol=1e-5, rtol=0)
        assert routed[1].logprobs.sum() < base[1].logprobs.sum()  # Tokyo got less likely
        # generate: a left-padded batch, one row in scope, one out
        gen = lm.generate([unrelated, request.text], 5)
        assert gen[0] == base_gen[0]
        assert gen[1].strip().startswith(request.target_new)
        assert [r is not None for r in router_of(lm).last_routes] == [False, True]


def test_bad_input_changes_nothing(lm, facts, small, unchanged):
    request = facts[0]
    for bad in (
        {"threshold": float("nan")},
        {"threshold": 1.0},
        {"layer": 99},
        {"proj_dim": 0},
        {"context_template": "no placeholders"},
    ):
        with pytest.raises(ValueError):
            edit(lm, request, "serac", **SMALL, **bad)
    with pytest.raises(TypeError):
        edit(lm, request, "serac", **SMALL, threshold="high")
    long = EditRequest(prompt="{} " + "word " * 9000, subject="Japan", target_new="Moscow")
    with pytest.raises(ValueError, match="longer than"):
        edit(lm, long, "serac", **SMALL)
    with pytest.raises(ValueError):
        EditRequest(prompt="The capital of {} is", subject="Japan", target_new=" ")
    assert router_of(lm) is None


def test_sequential_and_stacked_edits_restore_exactly(lm, facts, small, unchanged):
    a, b = facts[0], facts[1]
    with edit(lm, [a, b], "serac", sequential=True, **SMALL):
        assert len(serac.memory_of(lm).entries) == 2
        rows = score_requests(lm, [a, b])
        assert [r["ES"] for r in rows] == [1.0, 1.0]
    assert router_of(lm) is None
    first = edit(lm, a, "serac", **SMALL)
    second = edit(lm, b, "serac", **SMALL)
    assert len(serac.memory_of(lm).entries) == 2
    second.restore()
    assert len(serac.memory_of(lm).entries) == 1
    assert score_requests(lm, [a])[0]["ES"] == 1.0
    first.restore()
    assert router_of(lm) is None
