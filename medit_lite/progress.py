"""Progress bars for long work: shown in a terminal or notebook, quiet in CI logs."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, desc: str | None = None, total: int | None = None, **kwargs):
    """A tqdm bar, disabled when ``CI`` is set or ``MEDIT_QUIET=1``."""
    quiet = bool(os.environ.get("CI")) or os.environ.get("MEDIT_QUIET") == "1"
    kwargs.setdefault("leave", False)
    asked = kwargs.pop("disable", None)
    disable = True if quiet else asked
    return tqdm(iterable, desc=desc, total=total, disable=disable, **kwargs)
