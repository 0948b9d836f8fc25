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


def shared_or_skip(name: str):
    from medit_lite import shared_data

    path = shared_data(name)
    if path is None:
        pytest.skip(f"{name} not found: ../shared/data is absent in this checkout")
    return path
