"""FFN concept promotion (Geva et al., 2022): value scores, the hook, restore, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from medit_lite import edit
from medit_lite.hooks import Hooks
from medit_lite.methods.ffn_promote import (
    FFNPromoteHParams,
    concept_scores,
    concept_token_ids,
    find_values,
    normed_values,
    promote_request,
)


def test_concept_scores_equal_the_brute_force_z_scores(lm):
    ids = concept_token_ids(lm, "safe, peace")
    s = concept_scores(lm, 20, ids)
    X = normed_values(lm, 20)[:5]
    logits = X @ lm.module("unembed").weight.detach().float().T  # [5, vocab]
    z = (logits[:, ids] - logits.mean(1, keepdim=True)) / logits.std(1, keepdim=True)
    assert torch.allclose(s[:5], z.mean(1), atol=1e-3)


def _mlp_keys(lm, layer, text="The movie was"):
    with Hooks() as h:
        box = h.capture_input(lm.module("mlp_out", layer))
        lm.model(**lm.tokenize([text]), use_cache=False)
    return box.value


def test_hook_sets_only_the_chosen_activations_and_restores(lm, unchanged):
    values = [(20, 7), (20, 100), (25, 3)]
    before = {l: _mlp_keys(lm, l) for l in (20, 25)}
    result = edit(lm, promote_request(values=values), "ffn-promote", coef=3.0)
    assert result.changed == []
    for layer in (20, 25):
        after = _mlp_keys(lm, layer)
        chosen = [i for l, i in values if l == layer]
        others = [i for i in range(lm.d_mlp) if i not in chosen]
        assert torch.all(after[..., chosen] == 3.0)
        if layer == 20:  # nothing below layer 20 changed, so its other keys are the same
            assert torch.equal(after[..., others], before[layer][..., others])
    result.restore()


def test_find_values_promote_the_concept_and_are_clean(lm):
    hp = replace(FFNPromoteHParams.for_model(lm), layers=(20, 21, 22), n_candidates=20)
    found = find_values(lm, "safe, peace, kind", hp)
    assert 1 <= len(found) <= hp.n_values
    assert all(v["toxicity"] < hp.max_toxicity for v in found)
    assert all(hp.layers[0] <= v["layer"] < lm.n_layers for v in found)
    assert found == sorted(found, key=lambda v: -v["score"])


@pytest.mark.parametrize(
    "request_kwargs, overrides, match",
    [
        ({"values": [(99, 0)]}, {}, "outside"),
        ({"values": [(3, 10**6)]}, {}, "outside"),
        ({}, {"n_values": 0}, "n_values"),
        ({}, {"coef": float("nan")}, "finite"),
    ],
)
def test_bad_input_leaves_no_hook(lm, request_kwargs, overrides, match, unchanged):
    with pytest.raises(ValueError, match=match):
        edit(lm, promote_request(**request_kwargs), "ffn-promote", **overrides)
