"""LSDM (Cai et al., 2024): neutral targets, the least-squares edit, restore, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_or_skip

from medit_lite import edit
from medit_lite.applications import bias
from medit_lite.methods.lsdm import equalised


def test_equalised_target_shares_the_mass_and_keeps_the_rest():
    p = torch.tensor([[0.5, 0.1, 0.4], [0.2, 0.6, 0.2]])
    q = equalised(p, [0, 1])
    assert torch.allclose(q[:, 0], q[:, 1])
    assert torch.allclose(q.sum(1), p.sum(1))
    assert torch.equal(q[:, 2], p[:, 2])


@pytest.fixture(scope="module")
def train_requests():
    shared_or_skip("dama/train_dama.json")
    return bias.dama_requests("train", limit=16, seed=5)


def _mean_gap(lm, requests):
    p = bias.pronoun_probs(lm, [r.text for r in requests])
    return float((p[:, 0] - p[:, 1]).abs().mean())


def test_lsdm_reduces_the_gender_gap_and_restores(lm, train_requests, unchanged):
    before = _mean_gap(lm, train_requests)
    with edit(lm, train_requests, "lsdm", layers=(0, 1, 2)) as result:
        info = result.info[0]
        after = _mean_gap(lm, train_requests)
        assert info["gap_target"] < info["gap_before"]
        assert after < 0.8 * before, (before, after)
        assert sorted(info["update_norms"]) == [0, 1, 2]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"layers": (3, 1)}, ValueError, "increasing"),
        ({"layers": (40,)}, ValueError, "outside"),
        ({"v_lr": float("inf")}, ValueError, "finite"),
        ({"fact_token": "first"}, ValueError, "fact_token"),
    ],
)
def test_lsdm_bad_hparams_change_nothing(lm, train_requests, overrides, error, match, unchanged):
    with pytest.raises(error, match=match):
        edit(lm, train_requests, "lsdm", **overrides)
