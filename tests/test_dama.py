"""DAMA (Limisiewicz et al., 2024): the projection, the edit on the real model, restore."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_or_skip

from medit_lite import edit, weights_fingerprint
from medit_lite.applications import bias
from medit_lite.editing import get_method, make_hparams
from medit_lite.methods.dama import (
    dama_values,
    execute_dama,
    nullspace_projection,
    pls_directions,
)


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


def test_shared_values_give_the_weights_of_the_registered_method(lm, train_requests, unchanged):
    """A sweep computes V once per top layer and reuses it: each variant must end with the
    weights ``edit(..., "dama")`` gives for the same hyperparameters."""
    reqs = train_requests[:4]
    spec = get_method("dama")
    params = dict(lm.model.named_parameters())
    variants = [((26, 27), 2), ((25, 27), 3)]
    hps = [make_hparams(spec, lm, None, layers=ls, nullspace_dimension=d) for ls, d in variants]
    values = dama_values(lm, reqs, hps[0])
    for hp in hps:
        names = spec.params(lm, hp)
        with edit(lm, reqs, "dama", hparams=hp):
            reference = {n: params[n].detach().clone() for n in names}
        backup = {n: params[n].detach().clone() for n in names}
        try:
            info = execute_dama(lm, reqs, hp, values=values)
            assert info["values_precomputed"]
            for n in names:
                assert torch.equal(params[n], reference[n]), n
                assert not torch.equal(params[n], backup[n]), n
        finally:
            with torch.no_grad():
                for n, saved in backup.items():
                    params[n].copy_(saved)
    other_top = make_hparams(spec, lm, None, layers=(25, 26), nullspace_dimension=2)
    with pytest.raises(ValueError, match="other requests or hparams"):
        execute_dama(lm, reqs, other_top, values=values)
    with pytest.raises(ValueError, match="other requests or hparams"):
        execute_dama(lm, reqs[:3], hps[0], values=values)


def test_project_attention_projects_both_outputs_and_restores(lm, train_requests, unchanged):
    """The named option (not the paper): the same P on the attention output matrix too."""
    reqs = train_requests[:4]
    with edit(lm, reqs, "dama", layers=(27,), nullspace_dimension=2) as plain:
        assert plain.changed == [lm.module_name("mlp_out", 27) + ".weight"]
    with edit(
        lm, reqs, "dama", layers=(27,), nullspace_dimension=2, project_attention=True
    ) as result:
        names = [lm.module_name(k, 27) + ".weight" for k in ("mlp_out", "attn_out")]
        assert result.changed == names
        B = result.info[0]["directions"][27].double()
        for kind in ("mlp_out", "attn_out"):
            W = lm.weight_out_in(kind, 27).detach().double()
            assert float((B.T @ W).norm()) < 1e-3 * float(W.norm()), kind


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
