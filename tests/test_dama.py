"""DAMA (Limisiewicz et al., 2024): the projection, the edit on the real model, restore."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_or_skip

from medit_lite import edit, weights_fingerprint
from medit_lite.applications import bias
from medit_lite.methods.dama import nullspace_projection, pls_directions


def test_projection_is_idempotent_and_removes_the_directions():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(12, 3, generator=g, dtype=torch.float64)
    P = nullspace_projection(B.numpy())
    assert torch.allclose(P @ P, P, atol=1e-12)
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ B, torch.zeros_like(B), atol=1e-12)
    assert torch.linalg.matrix_rank(P) == 12 - 3
    # a vector orthogonal to B is kept
    x = torch.randn(12, generator=g, dtype=torch.float64)
    x_perp = P @ x
    assert torch.allclose(P @ x_perp, x_perp, atol=1e-12)


def test_pls_finds_the_planted_direction():
    g = torch.Generator().manual_seed(2)
    d, n = 10, 300
    direction = torch.zeros(d, dtype=torch.float64)
    direction[3] = 1.0
    H = torch.randn(n, d, generator=g, dtype=torch.float64)
    V = (H @ direction)[:, None] * torch.randn(1, 4, generator=g, dtype=torch.float64)
    B = torch.as_tensor(pls_directions(H, V, 1))
    assert abs(float(B[:, 0] @ direction)) > 0.95
    with pytest.raises(ValueError, match="at least 2 prompts"):
        pls_directions(H[:1], V[:1], 1)
    assert pls_directions(H[:3], V[:3], 5).shape == (d, 2)  # at most n − 1 directions


@pytest.fixture(scope="module")
def train_requests():
    shared_or_skip("dama/train_dama.json")
    return bias.dama_requests("train", limit=24, seed=3)


def _mean_gap(lm, requests):
    p = bias.pronoun_probs(lm, [r.text for r in requests])
    return float((p[:, 0] - p[:, 1]).abs().mean())


def test_dama_reduces_the_gender_gap_and_restores(lm, train_requests, unchanged):
    before = _mean_gap(lm, train_requests)
    layers = (22, 23, 24, 25, 26, 27)
    with edit(lm, train_requests, "dama", layers=layers, nullspace_dimension=8) as result:
        info = result.info[0]
        after = _mean_gap(lm, train_requests)
        assert after < 0.9 * before, (before, after)
        for layer, P in info["projections"].items():
            P = P.double()
            assert torch.allclose(P @ P, P, atol=1e-5)
            B = info["directions"][layer].double()
            assert float((P @ B).norm()) < 1e-5
            # the new weight is P W: nothing of it is left along the fitted directions
            W = lm.weight_out_in("mlp_out", layer).detach().double()
            assert float((B.T @ W).norm()) < 1e-3 * float(W.norm())
        assert len(result.changed) == len(layers)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"nullspace_dimension": 0}, ValueError, "nullspace_dimension"),
        ({"update": "once"}, ValueError, "update"),
        ({"layers": (27, 26)}, ValueError, "increasing"),
        ({"mom2_update_weight": float("nan")}, ValueError, "finite"),
    ],
)
def test_dama_bad_hparams_change_nothing(lm, train_requests, overrides, error, match, unchanged):
    with pytest.raises(error, match=match):
        edit(lm, train_requests, "dama", **overrides)


def test_dama_one_prompt_is_an_error_that_leaves_the_model(lm, train_requests, fingerprint):
    with pytest.raises(ValueError, match="at least 2 prompts"):
        edit(lm, train_requests[:1], "dama", layers=(27,), nullspace_dimension=8)
    assert weights_fingerprint(lm) == fingerprint
