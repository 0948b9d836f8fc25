"""T-Patcher vs FT-L and ROME as lifelong editors: a stream of edits applied in order.

For each method: seconds per edit (median, min, max), parameters and bytes added per
edit, and the SR / GR / ER / locality curve of :func:`medit_lite.lifelong.lifelong`
(checkpoint every ``--every`` edits). The stream is the first ``--edits`` records of zsRE
(``../shared/data/zsre_eval_sample.json``, MEND's format) where present, else the
built-in facts. Chapter 3 reads ``benchmarks/results/tpatcher.json``.

T-Patcher's memory set (``--memory``): ``builtin`` is the package's ordinary sentences;
``task`` (the default with zsRE) adds, as the paper does with its training data, the
locality questions and answers of ``--memory-size`` zsRE records held out from the stream
(records from ``--memory-from`` on; none of the stream's probes is among them).

    .venv/bin/python benchmarks/bench_tpatcher.py [--edits 100] [--methods tpatcher,ft-l,rome]
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, print_table, save, summary

ZSRE = "zsre_eval_sample.json"


def stream(n: int):
    from medit_lite import builtin_requests, load_zsre, shared_data

    path = shared_data(ZSRE)
    if path is not None:
        return f"zsRE ({ZSRE}, first {n})", load_zsre(path, limit=n)
    return f"built-in facts (first {n})", builtin_requests()[:n]


def task_memory(requests, start: int, size: int) -> tuple[str, ...]:
    """The built-in memory texts plus the probes of held-out zsRE records (``start`` on)."""
    from medit_lite import load_zsre, shared_data
    from medit_lite.methods import tpatcher as tp

    if start < len(requests):
        raise SystemExit("--memory-from must lie after the stream")
    path = shared_data(ZSRE)
    if path is None:
        return ()
    held_out = load_zsre(path)[start:]
    extra = tp.probe_memory_texts(held_out, exclude=requests, limit=size)
    return tuple(tp.builtin_memory_texts()) + extra


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--methods", default="tpatcher,ft-l,rome")
    parser.add_argument("--memory", choices=["task", "builtin"], default="task")
    parser.add_argument("--memory-from", type=int, default=500)
    parser.add_argument("--memory-size", type=int, default=300)
    args = parser.parse_args()

    from medit_lite import load_model
    from medit_lite.lifelong import format_curve, lifelong

    lm = load_model()
    name, requests = stream(args.edits)
    print(f"{lm.name}: lifelong stream of {len(requests)} edits from {name}\n")
    memory = (
        task_memory(requests, args.memory_from, args.memory_size) if args.memory == "task" else ()
    )
    runs, rows = {}, []
    for method in args.methods.split(","):
        overrides = {"memory_texts": memory} if method == "tpatcher" and memory else {}
        start = time.perf_counter()
        result = lifelong(lm, requests, method, every=args.every, **overrides)
        result["total_seconds"] = time.perf_counter() - start
        runs[method] = result
        print(format_curve(result), f"\n({result['total_seconds']:.0f} s in all)\n", flush=True)
        final = result["final"]
        rows.append(
            {
                "method": method,
                "edits": result["n"],
                "SR": f"{final['SR']:.3f}",
                "GR": f"{final['GR']:.3f}" if final["GR"] is not None else "-",
                "ER": f"{final['ER']:.3f}",
                "locality": f"{final['locality']:.3f}",
                "s/edit (median)": f"{summary(result['seconds'])['median']:.2f}",
                "added bytes/edit": f"{final['added_bytes'] / result['n']:.0f}",
                "changed params": final["changed_params"],
            }
        )
        _save(lm, name, requests, args, rows, runs, len(memory))
    print_table(rows, list(rows[0]))


def _save(lm, name, requests, args, rows, runs, memory_texts: int) -> None:
    """Written after each method, so a long run keeps what it has measured. Runs of other
    methods on the same stream already in the file are kept (``--methods`` may be split
    over several processes)."""
    path = RESULTS / "tpatcher.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    same = old.get("data") == name and old.get("every") == args.every
    table = [r for r in old.get("table", []) if same and r["method"] not in runs] + rows
    kept = {m: r for m, r in old.get("runs", {}).items() if same and m not in runs}
    save(
        "tpatcher",
        {
            "model": lm.name,
            "data": name,
            "edits": len(requests),
            "every": args.every,
            "tpatcher_memory": {
                "kind": args.memory,
                "from_record": args.memory_from,
                "texts": memory_texts,
            },  # fmt: skip
            "table": table,
            "runs": kept
            | {m: r | {"seconds_summary": summary(r["seconds"])} for m, r in runs.items()},
        },
    )


if __name__ == "__main__":
    main()
