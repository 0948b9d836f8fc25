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


def test_ft_l_steps_below_half_an_ulp_accumulate_in_bf16(lm):
    """A tiny random GPT-2 in bf16 with steps far below its weights' ulp (lr = 2e-5, 25
    steps) and GPT-2 XL's FT+L setting (lr = ε = 5e-4): the float32 master copy accumulates
    the steps, so the weights move by about min(ε, lr × steps) each, inside the ℓ∞ ball.
    Stepping the bf16 weights themselves moved them by half of that (measured: mean
    2.6e-4 instead of 4.9e-4 at lr 2e-5)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from medit_lite.models import wrap

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64)
    config.vocab_size = len(lm.tokenizer)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    tiny = wrap(model, lm.tokenizer, name="tiny-gpt2-bf16")
    request = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}
    name = tiny.module_name("mlp_out", 0) + ".weight"
    w0 = tiny.model.get_parameter(name).detach().clone()
    eps, steps = 5e-4, 25
    slack = float(torch.finfo(torch.bfloat16).eps) * float(w0.float().abs().max())
    for lr in (5e-4, 2e-5):
        with edit(tiny, request, "ft-l", layers=(0,), lr=lr, norm_constraint=eps, steps=steps):
            w = tiny.model.get_parameter(name).detach()
            moved = (w.float() - w0.float()).abs()
            assert w.dtype == torch.bfloat16
            assert float(moved.mean()) > 0.8 * min(eps, lr * steps), f"lr={lr}: steps rounded away"
            assert float(moved.max()) <= eps + slack
        assert torch.equal(tiny.model.get_parameter(name), w0)
