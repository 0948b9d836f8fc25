"""Efficiency (高效性) of every fact-editing method on one request: chapter 1's table.

For each method, :func:`medit_lite.efficiency.edit_cost` on the first CounterFact record
of the sample (the first built-in fact without ``../shared``): a warm-up edit, ``--runs``
timed edits (median seconds, each restored), then one edit measured for memory (on the
CPU under ``torch.profiler``: the peak of what torch allocates during the edit and what
stays allocated after it beside the weights). Also the parameters changed and the
backup kept for ``restore()``. The methods that train an editor once (SERAC, the NL-patch
gate, MEND, KE, ENN) use their cached training here; chapter 1 joins their one-off
training time from ``external.json`` and ``internal.json``.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/bench_efficiency.py [--runs 3] [--methods ...]
"""

from __future__ import annotations

import argparse
import os

from common import print_table, save

from medit_lite import (
    builtin_requests,
    load_counterfact,
    load_model,
    shared_data,
    weights_fingerprint,
)
from medit_lite.efficiency import edit_cost
from medit_lite.progress import progress

#: the fact editors of the book, in the order of chapter 1's taxonomy
METHODS = (
    "serac", "ike", "nl-patch", "grace", "calinet", "tpatcher",
    "enn", "ke", "mend", "kn", "ft", "ft-l", "ft-m", "rome", "memit",
)  # fmt: skip


#: hyperparameters that make the timed edit do its whole work: CaliNet trains its slots for
#: every edit (by default a batch calibrated before is read from the cache)
OVERRIDES = {"calinet": {"use_cache": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args()

    lm = load_model()
    path = shared_data("counterfact_sample.json")
    request = load_counterfact(path, limit=1)[0] if path else builtin_requests()[0]
    before = weights_fingerprint(lm)
    costs = {}
    for method in progress(args.methods, desc="methods"):
        cost = edit_cost(lm, request, method, runs=args.runs, **OVERRIDES.get(method, {}))
        costs[method] = cost.as_dict()
        assert weights_fingerprint(lm) == before, method
    payload = {
        "model": lm.name,
        "request": request.text + " -> " + request.target_new,
        "runs": args.runs,
        "overrides": OVERRIDES,
        "load_average_end": os.getloadavg(),  # other processes sharing the CPU
        "methods": costs,
    }
    save("efficiency", payload)
    rows = [
        {
            "method": m,
            "s / edit": f"{c['seconds']:.2f}",
            "peak MiB": f"{c['peak_bytes'] / 2**20:.1f}",
            "added KiB": f"{c['added_bytes'] / 1024:.1f}",
            "weights changed": f"{c['params_changed']:,}",
        }
        for m, c in costs.items()
    ]
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
