"""Shared helpers of the benchmark scripts: timing, tables and JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from medit_lite.results import results_dir

#: where results are written: the package's data/results (benchmarks/results links there),
#: or $MEDIT_RESULTS
RESULTS = results_dir()


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"\nwrote {path}")
    return path


def counterfact_sample(limit: int | None = None):
    """The CounterFact sample of ../shared/data (first ``limit`` records), or exit with a
    clear message when that folder is absent."""
    from medit_lite import load_counterfact, shared_data

    path = shared_data("counterfact_sample.json")
    if path is None:
        raise SystemExit("needs ../shared/data/counterfact_sample.json beside the repository")
    return load_counterfact(path, limit=limit)


def compact(result: dict, lifelong_without: tuple[str, ...] | None = None) -> dict:
    """An :func:`medit_lite.evaluate.evaluate` result for a JSON file: without its
    per-record ``rows``; its ``lifelong`` part dropped (``lifelong_without=None``) or kept
    without the keys named. ``"seconds"`` named there is replaced by
    ``"seconds_median"``, the median seconds per edit of the stream."""
    out = {k: v for k, v in result.items() if k not in ("rows", "lifelong")}
    if lifelong_without is not None and "lifelong" in result:
        life = {k: v for k, v in result["lifelong"].items() if k not in lifelong_without}
        if "seconds" in lifelong_without and result["lifelong"].get("seconds"):
            life["seconds_median"] = statistics.median(result["lifelong"]["seconds"])
        out["lifelong"] = life
    return out
