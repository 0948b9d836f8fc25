"""Shared fixtures: one real default model per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MEDIT_QUIET", "1")


@pytest.fixture(scope="session")
def lm():
    from medit_lite import load_model

    return load_model()


@pytest.fixture(scope="session")
def facts():
    from medit_lite import builtin_requests

    return builtin_requests()


@pytest.fixture(scope="session")
def fingerprint(lm):
    """SHA-256 of the unedited default model's weights (taken once per session)."""
    from medit_lite import weights_fingerprint

    return weights_fingerprint(lm)


def _hook_counts(lm):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in lm.model.modules()]


def _n_params(lm):
    return sum(p.numel() for p in lm.model.parameters())


@pytest.fixture
def unchanged(lm, fingerprint):
    """A test using this fails unless, after it, the model is bit-identical to the unedited
    one: same weights, no module added (same parameter count), no hook left behind."""
    from medit_lite import weights_fingerprint

    hooks, n = _hook_counts(lm), _n_params(lm)
    yield
    assert weights_fingerprint(lm) == fingerprint
    assert _n_params(lm) == n, "a module added by the test is still attached"
    assert _hook_counts(lm) == hooks, "a hook added by the test is still registered"


def shared_or_skip(name: str):
    from medit_lite import shared_data

    path = shared_data(name)
    if path is None:
        pytest.skip(f"{name} not found: ../shared/data is absent in this checkout")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer, without loading its weights."""
    from transformers import AutoTokenizer

    from medit_lite.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def make_tiny(tokenizer):
    """A factory of tiny random models (d_model 32, d_mlp 64) with the default tokenizer:
    ``make_tiny(family="gpt2", layers=2, seed=0, dtype=torch.float32, device_map=None)``.
    ``device_map`` (module name → device) dispatches the model with accelerate, as
    ``load_model(..., device_map=...)`` does."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from medit_lite.models import wrap

    def make(family="gpt2", layers=2, seed=0, dtype=torch.float32, device_map=None):
        torch.manual_seed(seed)
        if family == "gpt2":
            config = GPT2Config(n_embd=32, n_inner=64, n_layer=layers, n_head=4, n_positions=128)
        else:
            config = LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            )
        config.vocab_size = len(tokenizer)
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
        if device_map is not None:
            from medit_lite.models import dispatch

            model = dispatch(model, device_map)
        return wrap(model, tokenizer, name=f"tiny-{family}")

    return make
