"""FFN key-value memories (Geva et al., 2021) on the real default model."""

from __future__ import annotations

import pytest
import torch

from medit_lite.analysis import ffn_memory as fm
from medit_lite.analysis import logit_lens
from medit_lite.hooks import Hooks

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of Japan is Tokyo, a very large city.",
    "Isaac Newton made major contributions to physics and mathematics.",
    "The official language of Germany is German.",
    "Mount Everest is the highest mountain on Earth.",
    "She was born in Detroit, Michigan, in 1969.",
]


@pytest.fixture(scope="module")
def triggers(lm):
    return fm.trigger_examples(lm, TEXTS, k=3)


def test_trigger_coefficients_are_the_keys_activations_at_those_prefixes(lm, triggers):
    assert triggers.values.shape == (lm.n_layers, 3, lm.d_mlp)
    assert (triggers.values[:, :-1] >= triggers.values[:, 1:]).all()  # descending
    for layer, key in [(0, 5), (14, 700), (29, 1500)]:
        ids = triggers.prefix(layer, key)
        with torch.no_grad(), Hooks() as h:
            box = h.capture_input(lm.module("mlp_out", layer))
            lm.model(input_ids=torch.tensor([ids], device=lm.device))
        coef = float(box.value[0, -1, key])
        assert coef == pytest.approx(float(triggers.values[layer, 0, key]), rel=1e-3, abs=1e-4)
        # no position of any text activates the key more than the top trigger
        all_max = max(float(_acts(lm, t, layer)[:, key].max()) for t in TEXTS)
        assert all_max == pytest.approx(float(triggers.values[layer, 0, key]), rel=1e-3, abs=1e-4)


@torch.no_grad()
def _acts(lm, text, layer):
    with Hooks() as h:
        box = h.capture_input(lm.module("mlp_out", layer))
        lm.model(**lm.tokenize([text]))
    return box.value[0]


def test_value_projection_agrees_with_the_logit_lens(lm):
    keys = [3, 400, 1200]
    top = fm.value_top_tokens(lm, 20, keys, k=5)
    w = lm.weight_out_in("mlp_out", 20)
    for row, key in zip(top, keys):
        lens = [t for t, _ in logit_lens(lm, w[:, key], 5, norm=True)]
        assert [lm.tokenizer.decode([i]) for i in row.tolist()] == lens


def test_report_per_layer_and_figure(lm, triggers):
    rep = fm.ffn_memory(lm, TEXTS, keys_per_layer=24, removal_keys=2, k=3, triggers=triggers)
    for series in (rep.agreement, rep.agreement_top10, rep.agreement_random, rep.same_last_token):
        assert len(series) == lm.n_layers and all(0 <= x <= 1 for x in series)
    assert all(a <= b for a, b in zip(rep.agreement, rep.agreement_top10))
    assert len(rep.keep_without_last) == len(rep.keep_without_first) == lm.n_layers
    assert rep.examples[29] and rep.examples[29][0]["value_tokens"]
    fig = fm.plot_ffn_memory(rep)
    assert len(fig.axes) == 2


def test_corpus_and_bad_input(lm):
    texts, source = fm.corpus(50)
    assert len(texts) == 50 and source
    with pytest.raises(ValueError):
        fm.ffn_memory(lm, [])
