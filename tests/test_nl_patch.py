"""Natural-language patches and IKE on the real default model: each flips a fact through
the shared context routing (seen by scoring and ``generate``), soft patching is the
mixture of its equation, restore is exact, bad input changes nothing. The gate trains on
a small budget in a temporary cache; IKE uses a small demonstration pool."""

import pytest
import torch

from medit_lite import edit
from medit_lite.context_routing import context_ids, fact_context, router_of
from medit_lite.methods import ike, nl_patch
from medit_lite.metrics import encode_pair, locality_reference, score_requests, score_targets

GATE = {"train_records": 80, "steps": 150}
IKE = {"pool_records": 40, "k": 4}


@pytest.fixture(scope="module")
def cache(lm, tmp_path_factory):
    """A temporary $MEDIT_CACHE for the gate and the demonstration pool."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDIT_CACHE", str(tmp_path_factory.mktemp("medit_cache")))
    gate, log = nl_patch.trained_gate(lm, nl_patch.NlPatchHParams(**GATE))
    yield gate, log
    mp.undo()


def _unrelated(facts, request):
    return next(f for f in facts if f.relation != request.relation and f.subject != request.subject)


def test_gate_is_trained_and_separates(lm, facts, cache):
    gate, log = cache
    assert log.steps == GATE["steps"] and "medit_cache" in log.path
    assert sum(log.losses[-10:]) < sum(log.losses[:10])
    request = facts[0]
    g = nl_patch.gate_scores(
        lm,
        [request.paraphrases[0], _unrelated(facts, request).text],
        [request],
        nl_patch.NlPatchHParams(**GATE),
    )
    assert g[0, 0] > 0.5 > g[1, 0]
    assert nl_patch.patch_text(request).startswith("If the text is about Japan, then")


def test_nl_patch_flips_keeps_neighbors_and_restores(lm, facts, cache, unchanged):
    request = facts[0]
    ref = locality_reference(lm, [request])
    before = lm.generate(request.text, 4)
    with edit(lm, request, "nl-patch", **GATE):
        row = score_requests(lm, [request], ref)[0]
        assert row["ES"] == 1.0 and row["NS"] > 0.5  # most neighbors keep their answer
        assert lm.generate(request.text, 4).strip().startswith(request.target_new)
    assert router_of(lm) is None
    assert lm.generate(request.text, 4) == before


def test_soft_patching_is_the_mixture(lm, facts, cache, unchanged):
    """P(y|x) = g·P(y|x,q) + (1−g)·P(y|x) at the scored positions, g from the router."""
    request = facts[0]
    prompt, target = request.paraphrases[0], request.target_new
    p_ids, t_ids = encode_pair(lm, prompt, target)
    base = score_targets(lm, [prompt], [target])[0].logprobs
    ctx = list(context_ids(lm, fact_context(request.text, request.target_new)))
    with edit(lm, request, "nl-patch", **GATE):
        mixed = score_targets(lm, [prompt], [target])[0].logprobs
        g = router_of(lm).last_routes[0].weight
    assert 0.0 < g <= 1.0
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ctx + p_ids + t_ids])).logits[0].float()
    pos = torch.arange(len(ctx) + len(p_ids) - 1, len(ctx) + len(p_ids) + len(t_ids) - 1)
    in_ctx = torch.log_softmax(logits[pos], -1).gather(1, torch.tensor(t_ids)[:, None])[:, 0]
    expected = torch.log(g * in_ctx.exp() + (1 - g) * base.exp())
    assert torch.allclose(mixed, expected, atol=1e-4)


def test_ike_flips_routes_every_input_and_restores(lm, facts, cache, unchanged):
    """The 135M model ignores IKE's in-context fact on some facts (Japan -> Moscow, Canada
    -> Athens keep their old answers with this pool); Kenya -> Berlin flips."""
    request = facts[2]
    unrelated = _unrelated(facts, request).text
    before = lm.generate([unrelated, request.text], 4)
    with edit(lm, request, "ike", **IKE) as result:
        assert score_requests(lm, [request])[0]["ES"] == 1.0
        gen = lm.generate([unrelated, request.text], 4)
        assert gen[1].strip().startswith(request.target_new)
        routes = router_of(lm).last_routes
        assert all(r is not None and r.source == "ike" and r.weight == 1.0 for r in routes)
        assert result.info[0]["context_tokens"][0] > 4 * 10  # k demonstrations and the fact
    assert router_of(lm) is None
    assert lm.generate([unrelated, request.text], 4) == before


def test_ike_demonstrations_have_easyedit_format(facts):
    copy, update, retain = ike.demonstrations(facts[0])
    fact = f"{facts[0].text} {facts[0].target_new}"
    assert copy == f"New Fact: {fact}\nPrompt: {fact}\n\n"
    assert update.startswith(f"New Fact: {fact}\nPrompt: {facts[0].paraphrases[0]}")
    assert retain.endswith(f"{facts[0].neighborhood[0].answer}\n\n")


@pytest.mark.parametrize("method", ["nl-patch", "ike"])
def test_sequential_stacks_and_restores(lm, facts, cache, unchanged, method):
    kw = GATE if method == "nl-patch" else IKE
    a, b = (facts[0], facts[1]) if method == "nl-patch" else (facts[2], facts[0])
    with edit(lm, [a, b], method, sequential=True, **kw):
        rows = score_requests(lm, [a, b])
        assert rows[0]["ES"] == 1.0  # the first edit survives the second
        assert method == "ike" or rows[1]["ES"] == 1.0
    assert router_of(lm) is None


def test_bad_input_changes_nothing(lm, facts, cache, unchanged):
    request = facts[0]
    for method, bad in (
        ("nl-patch", {"min_gate": 1.5}),
        ("nl-patch", {"gate_layer": 99}),
        ("nl-patch", {"lr": float("nan")}),
        ("ike", {"k": 0}),
        ("ike", {"layer": 99}),
    ):
        kw = {**(GATE if method == "nl-patch" else IKE), **bad}
        with pytest.raises(ValueError):
            edit(lm, request, method, **kw)
    with pytest.raises(TypeError):
        edit(lm, request, "ike", **{**IKE, "k": "many"})
    assert router_of(lm) is None


def test_shared_context_is_computed_once_and_matches_full_passes(lm, facts, cache):
    """The router reads a context's keys and values once for every probe behind it
    (IKE's demonstrations are hundreds of tokens): the logits it mixes in equal those of
    the whole sequence run from the first token, for two contexts and an empty one."""
    from medit_lite import context_routing

    with edit(lm, facts[:2], "ike", hparams=ike.IkeHParams(**IKE)):
        router = router_of(lm)
        contexts = [ike.ike_context(lm, r, ike.IkeHParams(**IKE)) for r in facts[:2]]
        ctx_ids = [list(context_ids(lm, c)) for c in contexts] + [[]]
        tails = [encode_pair(lm, r.prompt.format(r.subject), r.target_new) for r in facts[:3]]
        seqs = [c + p + t for c in ctx_ids for p, t in tails]
        starts = [len(c) for c in ctx_ids for _ in tails]
        fast = context_routing._run(router, seqs, starts, batch_size=2)
        with torch.no_grad():
            for seq, start, got in zip(seqs, starts, fast):
                full = router.base_forward(input_ids=torch.tensor([seq])).logits[0, start:]
                assert got.shape == full.shape
                assert torch.allclose(got, full, atol=2e-4), (got - full).abs().max()
