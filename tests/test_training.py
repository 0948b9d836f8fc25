"""The shared training loop: data, seeding, the loss curve, and the weights cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medit_lite import training
from medit_lite.requests import EditRequest


def _data(n=12):
    return [
        EditRequest(prompt="{} lives in", subject=f"Person {i}", target_new=f"City {i}")
        for i in range(n)
    ]


def _regression(seed=0):
    """A linear model that must learn y = 3x from the requests' indices."""
    torch.manual_seed(seed)
    model = nn.Linear(1, 1)

    def loss_fn(batch):
        x = torch.tensor([[float(r.subject.split()[1])] for r in batch])
        loss = ((model(x) - 3 * x) ** 2).mean()
        return loss, {"weight": float(model.weight.detach())}

    return model, loss_fn


def test_train_lowers_the_loss_and_logs_every_step():
    model, loss_fn = _regression()
    log = training.train(model, loss_fn, _data(), steps=400, batch_size=4, lr=0.1)
    assert log.steps == len(log.losses) == len(log.logs["weight"]) == 400
    assert log.losses[-1] < 0.01 * log.losses[0]
    assert abs(float(model.weight) - 3) < 0.1


def test_train_is_reproducible_with_a_seed_and_differs_with_another():
    runs = []
    for seed in (0, 0, 1):
        model, loss_fn = _regression()
        runs.append(training.train(model, loss_fn, _data(), steps=5, batch_size=3, seed=seed))
    assert runs[0].losses == runs[1].losses
    assert runs[0].losses != runs[2].losses  # another seed draws other batches


def test_train_rejects_bad_settings_and_a_diverging_loss():
    model, loss_fn = _regression()
    with pytest.raises(ValueError, match="steps"):
        training.train(model, loss_fn, _data(), steps=0)
    with pytest.raises(ValueError, match="no training data"):
        training.train(model, loss_fn, [], steps=1)
    frozen = nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        training.train(frozen, loss_fn, _data(), steps=1)
    with pytest.raises(FloatingPointError, match="step 0"):
        training.train(model, lambda b: model.weight.sum() * float("nan"), _data(), steps=1)


def test_load_or_train_caches_weights_and_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    model, loss_fn = _regression()
    calls = []

    def fit():
        calls.append(1)
        return training.train(model, loss_fn, _data(), steps=20, batch_size=4, lr=0.05)

    first = training.load_or_train(model, "toy", "k1", fit)
    assert not first.from_cache and calls == [1]
    assert training.trained_path("toy", "k1").exists()
    fresh, _ = _regression(seed=5)
    second = training.load_or_train(fresh, "toy", "k1", fit)
    assert second.from_cache and calls == [1]  # not trained again
    assert second.losses == first.losses
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    training.load_or_train(fresh, "toy", "k2", fit)  # another key trains anew
    assert calls == [1, 1]


def test_cache_key_changes_with_data_hparams_and_model(lm):
    data = _data()
    key = training.cache_key(lm, data, {"lr": 1e-3})
    assert key == training.cache_key(lm, list(data), {"lr": 1e-3})
    assert key != training.cache_key(lm, data[:-1], {"lr": 1e-3})
    assert key != training.cache_key(lm, data, {"lr": 2e-3})
    identity = training.model_identity(lm)
    w = lm.module("mlp_out", lm.n_layers - 1).weight
    saved = w[0, 0].clone()
    try:
        with torch.no_grad():
            w[0, 0] += 1.0
        assert training.model_identity(lm) != identity
    finally:
        with torch.no_grad():
            w[0, 0] = saved
    assert training.model_identity(lm) == identity


def test_training_requests_are_zsre_triples_or_builtin_with_a_warning(monkeypatch):
    from medit_lite.requests import shared_data

    if shared_data(training.TRAIN_FILE) is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reqs = training.training_requests()
        assert len(reqs) == 998  # two of the 1,000 records have an empty target
        assert any("left out 2 record" in str(w.message) for w in caught)
        assert all(len(r.paraphrases) == 1 and len(r.neighborhood) == 1 for r in reqs)
    monkeypatch.setattr(training, "shared_data", lambda name: None)
    with pytest.warns(UserWarning, match="built-in facts"):
        fallback = training.training_requests(limit=7)
    assert len(fallback) == 7
