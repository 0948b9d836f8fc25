"""Knowledge neurons (Dai et al., 2022) on the real default model: refinement, suppression
against random neurons, the value-vector edit and its exact restore, bad input."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from medit_lite import edit
from medit_lite.methods import kn

FACT = "The Eiffel Tower is located in the city of"


def test_coarse_threshold_and_refinement_counts():
    scores = torch.zeros(2, 8)
    scores[0, 1], scores[1, 3], scores[1, 4] = 1.0, 0.25, 0.1
    assert kn.coarse_neurons(scores, [5, 7], 0.2) == {(5, 1), (7, 3)}
    assert kn.coarse_neurons(-scores, [5, 7], 0.2) == set()
    counts = Counter({(1, 1): 5, (1, 2): 4, (2, 9): 3, (3, 3): 1})
    # p = 0.7 of 5 prompts: 3.5 -> two neurons (no adjustment needed)
    assert kn.refine_counts(counts, 5, 0.7, 3, adaptive=True) == [(1, 1), (1, 2)]
    # at least min_shared prompts, whatever p says
    assert kn.refine_counts(counts, 5, 0.1, 4, adaptive=False) == [(1, 1), (1, 2)]
    # too few neurons: p is lowered in steps of 0.05 (0.75 -> 0.6 keeps two)
    few = Counter({(1, 1): 5, (2, 9): 3})
    assert kn.refine_counts(few, 5, 0.75, 1, adaptive=True) == [(1, 1), (2, 9)]
    assert kn.refine_counts(few, 5, 0.75, 1, adaptive=False) == [(1, 1)]
    # six neurons shared by 5 of 6 prompts: raising p would drop all, so all six are kept
    six = Counter({(0, i): 5 for i in range(6)})
    assert kn.refine_counts(six, 6, 0.7, 3, adaptive=True) == [(0, i) for i in range(6)]


@pytest.fixture(scope="module")
def kn_edit(lm, facts, fingerprint):
    """One KN edit of the Eiffel Tower fact (-> Rome), measured and restored: refinement
    (6 prompts x 30 layers of attribution) runs once for the tests below."""
    from medit_lite import weights_fingerprint

    request = next(r for r in facts if r.text == FACT)
    before = kn.answer_probabilities(lm, [FACT], ["Rome"])
    with edit(lm, request, "kn") as result:
        neurons = [tuple(n) for n in result.info[0]["neurons"][0]]
        after = kn.answer_probabilities(lm, [FACT], ["Rome"])
        changed_cols = {}
        for name in result.changed:
            layer = next(
                j for j in range(lm.n_layers) if lm.module_name("mlp_out", j) + ".weight" == name
            )
            diff = (lm.weight_out_in("mlp_out", layer) - result.original_weights[name]).abs().sum(0)
            changed_cols[layer] = set(torch.nonzero(diff).flatten().tolist())
    assert weights_fingerprint(lm) == fingerprint
    return {
        "request": request,
        "neurons": neurons,
        "before": before,
        "after": after,
        "cols": changed_cols,
    }


def test_suppressing_refined_neurons_beats_random_neurons(lm, kn_edit, unchanged):
    prompts = kn.edit_prompts(kn_edit["request"], kn.KNHParams())
    n = len(prompts)
    neurons = kn_edit["neurons"]  # refined over these prompts for the old answer, Paris
    assert 1 <= len(neurons) <= 10
    base = kn.answer_probabilities(lm, prompts, ["Paris"] * n)
    assert float(base.min()) > 0.3  # the model knows the fact on every prompt
    own = kn.answer_probabilities(lm, prompts, ["Paris"] * n, [neurons] * n, 0.0)
    rng = random.Random(0)
    random_drops = []
    for _ in range(3):
        ns = [(rng.randrange(lm.n_layers), rng.randrange(lm.d_mlp)) for _ in neurons]
        p = kn.answer_probabilities(lm, prompts, ["Paris"] * n, [ns] * n, 0.0)
        random_drops.append(float((base - p).mean()))
    drop = float((base - own).mean())
    assert drop > 0.05
    assert drop > 3 * max(max(random_drops), 1e-4)


def test_scaling_hooks_touch_only_the_given_position(lm, unchanged):
    batch = lm.tokenize([FACT])
    with torch.no_grad():
        plain = lm.model(**batch).logits[0]
        with kn.scaled_neurons(lm, [(20, 5), (29, 7)], 0.0, torch.tensor([3])):
            patched = lm.model(**batch).logits[0]
    assert torch.equal(plain[:3], patched[:3])  # positions before it are untouched
    assert not torch.equal(plain[3], patched[3])


def test_kn_edit_moves_only_the_neurons_value_vectors(lm, kn_edit):
    assert float(kn_edit["after"][0]) > float(kn_edit["before"][0])
    by_layer = {}
    for layer, i in kn_edit["neurons"]:
        by_layer.setdefault(layer, set()).add(i)
    # only the refined neurons' value vectors (columns of W_out) moved, and restore was exact
    assert kn_edit["cols"] == by_layer


@pytest.mark.parametrize(
    "overrides",
    [{"threshold": 0.0}, {"lambda2": math.nan}, {"layers": (30,)}, {"steps": 0}],
)
def test_bad_hyperparameters_fail_before_any_change(lm, facts, unchanged, overrides):
    with pytest.raises(ValueError):
        edit(lm, facts[0], "kn", **overrides)


def test_too_long_prompt_fails_before_any_change(lm, unchanged):
    from medit_lite.requests import EditRequest

    long = EditRequest(prompt="word " * 9000 + "{} is in", subject="Paris", target_new="Rome")
    with pytest.raises(ValueError):
        edit(lm, long, "kn")
