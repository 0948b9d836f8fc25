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


@pytest.fixture
def tiny16(make_tiny, tmp_path, monkeypatch):
    """A tiny random GPT-2 in bf16; its C from a temporary cache over stand-in texts."""
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    texts = ["The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars."] * 30
    monkeypatch.setattr("medit_lite.stats.shared_texts", lambda: texts)
    return make_tiny(layers=3, dtype=torch.bfloat16)


def _xl(method: str, **changes):
    """GPT-2 XL's released hyperparameters, on the tiny model's layers and corpus."""
    from dataclasses import replace

    from medit_lite.methods.memit import PAPER_DEFAULTS as MEMIT_XL
    from medit_lite.methods.rome import PAPER_DEFAULTS as ROME_XL

    paper = (ROME_XL if method == "rome" else MEMIT_XL)["gpt2-xl"]
    tiny = dict(mom2_corpus="offline", mom2_n_samples=300, mom2_max_length=128)
    return replace(paper, **(tiny | changes))


REQUEST = {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}


@pytest.mark.parametrize(
    "method, layers", [("rome", (0,)), ("rome", (1,)), ("memit", (0, 1)), ("memit", (1,))]
)
def test_the_cast_update_still_writes_v_star_in_bf16(tiny16, method, layers, monkeypatch):
    """After ROME's / MEMIT's float64 update is cast into bf16, Ŵ still writes the change
    at the inserted keys (Ŵ k* ≈ v* for ROME), within bf16's tolerance, and the edit's
    info says so; recomputed here from the weights before and after the edit."""
    import medit_lite.methods.locate_edit as le
    import medit_lite.methods.rome as rome

    updates, add_update = [], le.add_update

    def spy(W, upd, keys):
        updates.append((W.detach().double().clone(), upd.double(), keys.double()))
        return add_update(W, upd, keys)

    monkeypatch.setattr(rome, "add_update", spy)
    monkeypatch.setattr(le, "add_update", spy)
    with edit(tiny16, REQUEST, method, hparams=_xl(method, layers=layers)) as result:
        info = result.info[0]
        after = [tiny16.weight_out_in("mlp_out", layer).detach().double() for layer in layers]
    errors = [info["insert_error"]] if method == "rome" else list(info["insert_errors"].values())
    assert len(updates) == len(layers) == len(errors)
    for (w0, upd, keys), w1, error in zip(updates, after, errors):
        K = keys[:, None] if keys.dim() == 1 else keys
        written = upd @ K
        lost = float(((w1 - w0) @ K - written).norm(dim=0).div(written.norm(dim=0)).max())
        assert lost == pytest.approx(error, rel=1e-6)
    assert info["insert_tolerance"] == le.insert_tolerance(torch.bfloat16)
    assert info["insert_ok"] and max(errors) <= info["insert_tolerance"]
    assert max(errors) > le.insert_tolerance(torch.float32)  # bf16 rounding, measured


def test_an_update_below_half_an_ulp_is_reported_and_warned(tiny16):
    """A value step far too small for bf16 (δ after one Adam step at lr 1e-6): the cast
    rounds ΔW away, the check reports it and ROME warns."""
    with pytest.warns(RuntimeWarning, match="keeps only"):
        hp = _xl("rome", layers=(0,), v_lr=1e-6, v_num_grad_steps=2)
        with edit(tiny16, REQUEST, "rome", hparams=hp) as result:
            info = result.info[0]
    assert not info["insert_ok"] and info["insert_error"] > 0.5


def test_add_update_measures_what_the_cast_lost():
    from medit_lite.methods.locate_edit import add_update

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    k = torch.randn(16, generator=g, dtype=torch.float64)
    big = torch.outer(torch.randn(8, generator=g, dtype=torch.float64), k) * 0.1
    ok = add_update(W.clone(), big, k)
    assert ok["insert_ok"] and 0 < ok["insert_error"] < 0.02
    lost = add_update(W.clone(), big * 1e-6, k)  # far below half an ulp of |w| ≈ 1
    assert not lost["insert_ok"] and lost["insert_error"] == pytest.approx(1.0)
    exact = add_update(W.double(), big, k)
    assert exact["insert_error"] < 1e-12 and exact["insert_ok"]
