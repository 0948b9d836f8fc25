"""The GPU path's dtype on the CPU: the default model loaded in bfloat16 (what
``load_model`` picks on CUDA) edits built-in facts with FT-L, ROME, MEMIT and T-Patcher and
restores them bit-exactly. Tolerances are bf16's (a weight step below half an ulp would
vanish: the edits here must still flip the facts)."""

from __future__ import annotations

import pytest
import torch

from medit_lite import edit, load_model, weights_fingerprint
from medit_lite.metrics import score_requests


@pytest.fixture(scope="module")
def lm16(tmp_path_factory):
    lm = load_model(dtype=torch.bfloat16)
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDIT_CACHE", str(tmp_path_factory.mktemp("bf16_cache")))  # its own C stats
    try:
        yield lm
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def facts16(facts):
    """Capital facts (one-token answers), which this model knows in float32."""
    return [r for r in facts if r.text.startswith("The capital of")][:3]


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("ft-l", {}),
        ("rome", {"mom2_n_samples": 4000}),
        ("memit", {"mom2_n_samples": 4000}),
        ("tpatcher", {}),
    ],
)
def test_bf16_edits_flip_facts_and_restore_exactly(lm16, facts16, method, overrides, monkeypatch):
    assert lm16.dtype == torch.bfloat16
    before = weights_fingerprint(lm16)
    n_params = sum(p.numel() for p in lm16.model.parameters())
    ok = 0
    for request in facts16:
        with edit(lm16, request, method, **overrides) as result:
            changed = [p for n, p in lm16.model.named_parameters() if n in result.changed]
            assert all(p.dtype == torch.bfloat16 for p in changed)
            ok += score_requests(lm16, [request])[0]["ES"] == 1.0
        assert weights_fingerprint(lm16) == before
        assert sum(p.numel() for p in lm16.model.parameters()) == n_params
    assert ok >= 2, f"{method} in bf16 flipped {ok} of {len(facts16)} facts"
