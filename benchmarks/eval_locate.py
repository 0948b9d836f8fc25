"""Chapter 4's results: locate-then-edit on the CounterFact sample.

1. independent edits (edit, measure, restore) for the unedited model, FT, FT-L, ROME and
   MEMIT (one request at a time, as in ROME's Table 4), and MEMIT with all requests in
   one batch;
2. many edits on one model: sequential ROME (each edit on top of the previous ones) vs
   one MEMIT batch, at 10, 100 and 300 edits.

The JSON is rewritten after every step, so an interrupted run keeps what it finished.

    .venv/bin/python benchmarks/eval_locate.py --limit 100 --counts 10 100
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, save

from medit_lite import load_counterfact, load_model, shared_data
from medit_lite.evaluate import evaluate, format_table


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("rows", "lifelong")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["none", "rome", "memit", "ft", "ft-l"])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--counts", type=int, nargs="*", default=[10, 100, 300])
    parser.add_argument("--ge-tokens", type=int, default=0)
    parser.add_argument("--name", default="locate_eval")
    parser.add_argument(
        "--resume", action="store_true", help="keep the results of an earlier run (same limit)"
    )
    args = parser.parse_args()
    path = shared_data("counterfact_sample.json")
    if path is None:
        raise SystemExit("needs ../shared/data/counterfact_sample.json")
    lm = load_model()
    requests = load_counterfact(path, limit=args.limit)
    out = {"model": lm.name, "data": "counterfact_sample.json", "limit": len(requests),
           "independent": [], "many_edits": {}}  # fmt: skip
    started = time.time()
    previous = RESULTS / f"{args.name}.json"
    if args.resume and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("limit") == len(requests):
            out["independent"] = old["independent"]
            out["many_edits"] = old.get("many_edits", {})
    done = {r["method"] for r in out["independent"]}

    def write():
        out["wall_seconds"] = time.time() - started
        save(args.name, out)

    for method in [m for m in args.methods if m not in done]:
        r = evaluate(lm, requests, method, generation_tokens=args.ge_tokens, check_restore=True)
        out["independent"].append(_strip(r))
        print(format_table([r]), flush=True)
        write()
    for n in args.counts:
        reqs = requests[:n]
        if len(reqs) < n:
            continue
        curve = out["many_edits"].setdefault(str(n), {})
        for label, method, sequential in (("MEMIT (batch)", "memit", False),
                                          ("ROME (sequential)", "rome", True)):  # fmt: skip
            if label in curve:
                continue
            t0 = time.perf_counter()
            if sequential:
                r = evaluate(lm, reqs, method, sequential=True, check_restore=True, every=n)
            else:
                from medit_lite import edit
                from medit_lite.metrics import locality_reference, score_requests, summarize

                reference = locality_reference(lm, reqs)
                with edit(lm, reqs, method) as res:
                    rows = score_requests(lm, reqs, reference)
                r = {"method": method, "n": n, "sequential": False, "metrics": summarize(rows),
                     "seconds_per_edit": res.seconds / n}  # fmt: skip
            r = _strip(r) | {"label": label, "wall_seconds": time.perf_counter() - t0}
            curve[label] = r
            print(n, label, {k: round(v, 3) for k, v in r["metrics"].items()}, flush=True)
            write()
    write()


if __name__ == "__main__":
    main()
