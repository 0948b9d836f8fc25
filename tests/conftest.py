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
