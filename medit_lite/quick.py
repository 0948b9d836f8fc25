"""The reduced setting of the pages: ``MEDIT_QUICK=1``.

`make test` executes every chapter twice: once in the book build (the full page, on the
shared data) and once as a reader on Colab would, in an empty folder with no
``../shared`` (``tests/test_colab.py``). The second run checks that each page runs top to
bottom on its own; it need not repeat the page's longer computations, so it sets
``MEDIT_QUICK=1`` and the cells that edit many records or draw many samples take the small
sizes they name with :func:`sized`. Nothing else changes: the same code runs on the same
model, only on fewer items.
"""

from __future__ import annotations

import os


def is_quick() -> bool:
    """True under ``MEDIT_QUICK=1`` (the smoke run of the pages)."""
    return os.environ.get("MEDIT_QUICK") == "1"


def sized(full: int, quick: int) -> int:
    """``full`` on a page as the book runs it; ``quick`` in the smoke run of the pages."""
    if quick > full:
        raise ValueError(f"the quick size ({quick}) must not exceed the full one ({full})")
    return quick if is_quick() else full
