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

``--counterfact N``: instead, T-Patcher on a stream of the first N CounterFact records
(ROME's format, ``counterfact_sample.json``), scored (ES/PS/NS and EasyEdit's metrics on
every record edited so far) after N/2 and N edits, against the unedited model on the same
records; once with the built-in memory and once with the task memory: the built-in texts
plus the neighborhood probes of CounterFact records held out from the stream (records
from ``--memory-from`` on, none of the stream's probes among them). Written to the
``counterfact`` part of ``tpatcher.json``; the zsRE part is kept.

    .venv/bin/python benchmarks/bench_tpatcher.py --counterfact 100 --memory-from 150
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, compact, print_table, save, summary

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
    parser.add_argument("--counterfact", type=int, default=0, help="CounterFact stream length")
    parser.add_argument("--firing", type=int, default=0, help="patch firing on N CF edits")
    args = parser.parse_args()

    from medit_lite import load_model
    from medit_lite.lifelong import format_curve, lifelong

    lm = load_model()
    if args.firing:
        return firing(lm, args.firing, args.memory_from, args.memory_size)
    if args.counterfact:
        return counterfact_streams(lm, args.counterfact, args.memory_from, args.memory_size)
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


def counterfact_streams(lm, n: int, memory_from: int, memory_size: int) -> None:
    """T-Patcher on a CounterFact stream with each memory set (see the module docstring)."""
    from common import counterfact_sample

    from medit_lite.evaluate import evaluate, format_table

    requests, memories = _memories(counterfact_sample(), n, memory_from, memory_size)
    path = RESULTS / "tpatcher.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload.pop("machine", None)
    part = {"n": n, "memory_from": memory_from, "memory_texts": {}, "runs": {}}
    unedited = evaluate(lm, requests, "none")
    part["unedited"] = _strip_rows(unedited)
    part["unedited_at"] = unedited_at(unedited["rows"], [max(1, n // 2), n])
    for kind, texts in memories.items():
        t0 = time.perf_counter()
        result = evaluate(
            lm, requests, "tpatcher", sequential=True, every=max(1, n // 2),
            score_checkpoints=True, memory_texts=texts,
        )  # fmt: skip
        run = _strip_rows(result)
        run["total_seconds"] = time.perf_counter() - t0
        run["median_seconds"] = summary(result["lifelong"]["seconds"])["median"]
        part["runs"][kind] = run
        part["memory_texts"][kind] = len(texts)
        print(f"memory {kind} ({len(texts)} texts)")
        print(format_table([part["unedited"], result]), flush=True)
        for n_edits, point in zip(result["lifelong"]["checkpoints"], result["lifelong"]["curve"]):
            extra = point.get("extra") or {}
            print(f"  after {n_edits:3d} edits: NS {extra.get('NS')}  ES {extra.get('ES')}")
        payload["counterfact"] = part
        save("tpatcher", payload)


def _memories(records, n: int, memory_from: int, memory_size: int):
    """The stream (first ``n`` records) and the two memory sets of the CounterFact runs."""
    from medit_lite.methods import tpatcher as tp

    if memory_from < n:
        raise SystemExit("--memory-from must lie after the stream")
    requests, held_out = records[:n], records[memory_from:]
    builtin = tuple(tp.builtin_memory_texts())
    task = builtin + tp.probe_memory_texts(held_out, exclude=requests, limit=memory_size)
    return requests, {"built-in": builtin, "task": task}


def firing(lm, n: int, memory_from: int, memory_size: int) -> None:
    """``--firing N``: which patches fire on which neighbors after N sequential CounterFact
    edits, with each memory set (:func:`medit_lite.analysis.patch_firing.patch_firing`);
    written to the ``counterfact_firing`` part of ``tpatcher.json``."""
    from common import counterfact_sample

    from medit_lite import edit
    from medit_lite.analysis.patch_firing import neighbor_scores, patch_firing

    requests, memories = _memories(counterfact_sample(), n, memory_from, memory_size)
    before = neighbor_scores(lm, requests)
    part = {"n": n, "memory_from": memory_from, "memories": {}}
    for kind, texts in memories.items():
        with edit(lm, requests, "tpatcher", sequential=True, memory_texts=texts) as result:
            stats = patch_firing(lm, result, before)
        part["memories"][kind] = {"memory_texts": len(texts), **stats}
        print(f"memory {kind} ({len(texts)} texts): " + json.dumps(stats, indent=1))
    path = RESULTS / "tpatcher.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload.pop("machine", None)
    payload["counterfact_firing"] = part
    save("tpatcher", payload)


def unedited_at(rows: list[dict], counts) -> dict:
    """The unedited model's scores on the first ``k`` records, for each checkpoint ``k``."""
    from medit_lite import summarize

    return {str(k): summarize(rows[:k]) for k in counts}


def _strip_rows(result: dict) -> dict:
    return compact(result, lifelong_without=("at_end", "success"))


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
            **{k: v for k, v in old.items() if k in ("counterfact", "counterfact_firing")},
            "runs": kept
            | {m: r | {"seconds_summary": summary(r["seconds"])} for m, r in runs.items()},
        },
    )


if __name__ == "__main__":
    main()
