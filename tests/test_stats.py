"""The second-moment cache on tiny random models: keyed by the weights that feed the layer
(not the name: every wrapped model is "custom"), dtype, layer, corpus contents, sample
count and length; every test here caches under a temporary ``$MEDIT_CACHE``."""

from __future__ import annotations

import pytest
import torch

import medit_lite.stats as stats
from medit_lite import edit
from medit_lite.hooks import Hooks
from medit_lite.stats import second_moment, second_moments

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.",
    "Water boils at one hundred degrees Celsius at sea level, a fact known for centuries.",
    "The violin is a wooden string instrument, the smallest of its family in common use.",
] * 4
N = 200  # key vectors: above the tiny models' d_mlp of 64


@pytest.fixture(autouse=True)
def temp_cache(tmp_path, monkeypatch):
    """Never the user's cache."""
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    return tmp_path


def _c(lm, layer=1, corpus=TEXTS, n=N, **kw):
    return second_moment(lm, layer, corpus, n, batch_size=4, **kw)


def test_the_cache_tells_models_of_one_name_apart(make_tiny, temp_cache):
    """Two different random models both called "tiny-gpt2": the second must not get the
    first's C (the old cache, keyed by name, returned it)."""
    a, b = make_tiny(seed=0), make_tiny(seed=1)
    assert a.name == b.name
    first = _c(a)
    other = _c(b)
    assert not other.cached and other.path != first.path
    assert not torch.allclose(other.mom2, first.mom2)
    assert _c(a).cached and str(temp_cache) in str(first.path)


def test_the_key_follows_the_weights_that_feed_the_layer(make_tiny):
    """An edit below the layer (or of its MLP input) changes its key; an edit of the
    layer's own ``mlp_out`` (what ROME writes) or of a layer above does not."""
    lm = make_tiny(layers=3)
    first = _c(lm)
    with torch.no_grad():
        lm.weight_out_in("mlp_out", 1).add_(1.0)  # not an input of layer 1's keys
        lm.weight_out_in("mlp_out", 2).add_(1.0)
    assert _c(lm).cached
    for kind, layer in (("mlp_out", 0), ("mlp_in", 1)):
        w = lm.weight_out_in(kind, layer)
        saved = w.detach().clone()
        with torch.no_grad():
            w.add_(0.01)
        changed = _c(lm)
        assert not changed.cached and changed.path != first.path, (kind, layer)
        with torch.no_grad():
            w.copy_(saved)
        assert _c(lm).path == first.path  # the same weights again: the same entry


def test_the_key_holds_dtype_layer_count_length_and_corpus(make_tiny):
    lm = make_tiny()
    base = _c(lm)
    variants = [
        _c(make_tiny(dtype=torch.bfloat16)),
        _c(lm, layer=0),
        _c(lm, n=N + 1),
        _c(lm, max_length=32),
        _c(lm, corpus=TEXTS[::-1]),
    ]
    paths = {base.path} | {v.path for v in variants}
    assert len(paths) == 1 + len(variants)
    assert not any(v.cached for v in variants)


def test_the_offline_corpus_key_follows_the_shared_texts(make_tiny, monkeypatch):
    """The offline corpus with and without ../shared are different texts: different keys
    (the old cache named both "offline")."""
    lm = make_tiny()
    monkeypatch.setattr(stats, "shared_texts", lambda: TEXTS * 2)
    with_shared = _c(lm, corpus="offline")
    monkeypatch.setattr(stats, "shared_texts", lambda: [t.upper() for t in TEXTS * 2])
    other = _c(lm, corpus="offline")
    assert not other.cached and other.path != with_shared.path
    monkeypatch.setattr(stats, "shared_texts", lambda: [])  # no ../shared: model samples
    key = stats.stats_key(lm, 1, "offline", N, 128)
    assert "noshared" in key["corpus"] and stats.model_fingerprint(lm) in key["corpus"]


def test_a_corpus_smaller_than_one_batch_works(make_tiny):
    """5 texts with ``batch_size=16``: one short batch (the old code never tokenized it
    and ran out of text), equal to the direct average of the keys."""
    lm = make_tiny()
    texts = TEXTS[:5]
    n = sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    assert n >= lm.d_mlp
    got = second_moments(lm, [1], texts, n, batch_size=16, cache=False)[1]
    keys = []
    for t in texts:
        with Hooks() as h:
            box = h.capture_input(lm.module("mlp_out", 1))
            lm.model(**lm.tokenize([t]))
        keys.append(box.value[0])
    K = torch.cat(keys).double()
    assert torch.allclose(got.mom2.double(), K.T @ K / n, rtol=1e-4, atol=1e-6)


def test_fewer_samples_than_d_mlp_is_a_clear_error_before_any_work(make_tiny, monkeypatch):
    """mom2_n_samples < d_mlp makes C singular: ROME and MEMIT refuse it at validation,
    before k*, v* or C are computed; second_moments refuses it too."""
    lm = make_tiny()

    def no_work(*args, **kwargs):
        raise AssertionError("computed something before rejecting mom2_n_samples")

    monkeypatch.setattr(stats, "corpus_texts", no_work)
    monkeypatch.setattr("medit_lite.methods.locate_edit.optimise_delta", no_work)
    request = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}
    for method, layers in (("rome", (1,)), ("memit", (0, 1))):
        with pytest.raises(ValueError, match="mom2_n_samples.*singular"):
            edit(lm, request, method, layers=layers, mom2_n_samples=lm.d_mlp - 1)
    with pytest.raises(ValueError, match="singular"):
        second_moments(lm, [1], TEXTS, lm.d_mlp - 1)


def test_a_stream_keeps_each_layers_first_key(make_tiny):
    """Inside reuse_statistics() (lifelong streams, sequential edits) a layer keeps the C
    it first got, as the reference keeps the unedited model's C; outside it, a change
    below the layer gives a new key."""
    lm = make_tiny()
    with stats.reuse_statistics():
        first = _c(lm)
        with torch.no_grad():
            lm.weight_out_in("mlp_out", 0).add_(0.01)
        assert _c(lm).cached and _c(lm).path == first.path
    assert _c(lm).path != first.path


def test_a_changed_cache_entry_is_recomputed(make_tiny):
    """A file at the right path saved under another key (an older layout) is not used."""
    lm = make_tiny()
    first = _c(lm)
    saved = torch.load(first.path)
    saved["key"] = dict(saved["key"], weights="something else")
    saved["mom2"] = saved["mom2"] * 0
    torch.save(saved, first.path)
    again = _c(lm)
    assert not again.cached and torch.allclose(again.mom2, first.mom2)
