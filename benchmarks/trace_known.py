"""Average causal-tracing effect over facts the default model knows (chapter 4 §4.1).

Takes ROME's known_1000.json, keeps the facts whose answer is the model's top next
token, traces the first ``--facts`` of them at the subject's last token and the prompt's
last token (3 kinds, every layer) and writes ``results/tracing_known.json``, which the
chapter loads (tracing 100 facts takes longer than a page may run).

    .venv/bin/python benchmarks/trace_known.py [--facts 100] [--samples 3]
"""

from __future__ import annotations

import argparse
import time

from common import save

from medit_lite import load_model, shared_data
from medit_lite.analysis import average_trace, known_facts, load_known_facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--layer-step", type=int, default=1, help="trace every n-th layer")
    args = parser.parse_args()
    path = shared_data("known_1000.json")
    if path is None:
        raise SystemExit("needs ../shared/data/known_1000.json")
    lm = load_model()
    records = load_known_facts(path)
    known = known_facts(lm, records)
    print(f"{len(known)} of {len(records)} facts known to {lm.name}", flush=True)
    chosen = known[: args.facts]
    t0 = time.perf_counter()
    layers = range(0, lm.n_layers, args.layer_step)
    avg = average_trace(lm, chosen, samples=args.samples, window=args.window, layers=layers)
    seconds = time.perf_counter() - t0
    payload = avg.to_dict() | {
        "model": lm.name,
        "n_records": len(records),
        "n_known": len(known),
        "seconds": seconds,
        "per_fact": {k: avg.effects[k].tolist() for k in avg.effects},
    }
    for kind in avg.effects:
        mean = avg.mean(kind)
        for i, pos in enumerate(avg.positions):
            layer = avg.layers[int(mean[i].argmax())]
            print(f"{kind:5s} {pos:12s} peak AIE {float(mean[i].max()):.3f} at layer {layer}")
    print(f"{seconds:.0f} s for {len(chosen)} facts")
    save("tracing_known", payload)


if __name__ == "__main__":
    main()
