"""Chapter 4's results: locate-then-edit on the CounterFact sample.

1. independent edits (edit, measure, restore) for the unedited model and each method in
   ``--methods`` (one request at a time, as in ROME's Table 4);
2. many edits on one model (``--counts``): one stream of sequential ROME edits (each on
   top of the previous ones) scored on the requests edited so far after 10, 100 and 300
   edits, against MEMIT writing the first 10, 100 and 300 requests in one batch each.

The JSON is rewritten after every step, so an interrupted run keeps what it finished;
``--resume`` keeps the finished parts of an earlier run with the same ``--limit``.

    .venv/bin/python benchmarks/eval_locate.py --limit 300 --counts 10 100 300
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, compact, counterfact_sample, save

from medit_lite import edit, load_model
from medit_lite.editing import get_method, register
from medit_lite.evaluate import evaluate, format_table
from medit_lite.methods.memit import execute_memit, memit_targets
from medit_lite.methods.rome import context_templates
from medit_lite.metrics import locality_reference, score_requests, summarize

BASELINES = ("ft", "ft-l", "ft-m")


def _strip(result: dict) -> dict:
    return compact(result)


#: MEMIT's target vector z_i (Eq. 16) depends only on request i and the unedited model, so
#: the batches of 10, 100 and 300 share them: each z is optimised once, in the first batch
#: that contains its request, and reused by the others (``targets_reused`` says how
#: many). Give the counts in the order to run them: ``--counts 100 300 10`` times a full
#: batch of 100, then the 200 new targets of the 300 batch.
Z_CACHE: dict[tuple, tuple] = {}


def _key(r):
    return (r.prompt, r.subject, r.target_new)


MEMIT = get_method("memit")


@register("memit-reuse-z", MEMIT.hparams, MEMIT.params)
def _memit_reusing_targets(lm, requests, hp):
    """MEMIT with the z of earlier batches (benchmark-only; the update is MEMIT's)."""
    todo = [r for r in requests if _key(r) not in Z_CACHE]
    t0 = time.perf_counter()
    if todo:
        templates = context_templates(lm, hp.context_templates, hp.seed)
        zs, histories = memit_targets(lm, todo, hp, templates)
        for r, z, h in zip(todo, zs, histories):
            Z_CACHE[_key(r)] = (z, h)
    seconds_new_targets = time.perf_counter() - t0
    z = torch.stack([Z_CACHE[_key(r)][0] for r in requests])
    histories = [Z_CACHE[_key(r)][1] for r in requests]
    info = execute_memit(lm, requests, hp, targets=(z, histories))
    info["seconds_targets"] = seconds_new_targets
    info["targets_new"] = len(todo)
    return info


def memit_batch(lm, requests, ge_tokens: int = 0, ge_protocol: str = "rome") -> dict:
    """All ``requests`` written by one MEMIT call, scored (GE too with ``ge_tokens``),
    then restored."""
    reused = sum(_key(r) in Z_CACHE for r in requests)
    reference = locality_reference(lm, requests)
    with edit(lm, requests, "memit-reuse-z") as res:
        rows = score_requests(
            lm, requests, reference, generation_tokens=ge_tokens, generation_protocol=ge_protocol
        )
        info = {k: v for k, v in res.info[0].items() if k not in ("targets", "p_target")}
    return {"method": "memit", "n": len(requests), "sequential": False,
            "metrics": summarize(rows), "seconds_total": res.seconds, "targets_reused": reused,
            "seconds_per_edit": res.seconds / len(requests), "info": info}  # fmt: skip


def rome_stream(lm, requests, counts) -> dict[int, dict]:
    """Sequential ROME over ``requests``, scored on the first n after n edits."""
    r = evaluate(lm, requests, "rome", sequential=True, check_restore=True,
                 checkpoints=counts, score_checkpoints=True)  # fmt: skip
    out = {}
    for c in r["lifelong"]["curve"]:
        out[c["n_edits"]] = {
            "method": "rome", "n": c["n_edits"], "sequential": True, "metrics": c["extra"],
            "seconds_per_edit": c["seconds_per_edit"],
            "lifelong": {k: c[k] for k in ("SR", "GR", "ER", "locality", "changed_params")},
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="*", default=["none", "rome", "ft", "ft-l"])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--counts", type=int, nargs="*", default=[10, 100, 300])
    parser.add_argument(
        "--ge-tokens",
        type=int,
        default=0,
        help="GE: tokens per generation (0: no GE; ROME's protocol uses 100 in all)",
    )
    parser.add_argument(
        "--ge-protocol",
        default="rome",
        choices=["rome", "greedy"],
        help="GE protocol: ROME's (every generation prompt, top-5 sampling, seeded) or greedy",
    )
    parser.add_argument(
        "--baseline-limit",
        type=int,
        default=None,
        help="evaluate FT and FT-L (and the unedited model again) on the first N records only",
    )
    parser.add_argument(
        "--skip-rome-stream", action="store_true", help="only the MEMIT batches of --counts"
    )
    parser.add_argument("--name", default="locate_eval")
    parser.add_argument(
        "--resume", action="store_true", help="keep the results of an earlier run (same limit)"
    )
    args = parser.parse_args()
    requests = counterfact_sample(args.limit)
    lm = load_model()
    out = {"model": lm.name, "data": "counterfact_sample.json", "limit": len(requests),
           "independent": [], "many_edits": {}}  # fmt: skip
    started = time.time()
    previous = RESULTS / f"{args.name}.json"
    if args.resume and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("limit") == len(requests):
            out["independent"] = old["independent"]
            out["many_edits"] = old.get("many_edits", {})
    done = {(r["method"], r["n"]) for r in out["independent"]}

    def write():
        out["wall_seconds"] = time.time() - started
        save(args.name, out)

    jobs = [(m, requests) for m in args.methods]
    if args.baseline_limit:  # the slow baselines on a prefix, next to the unedited model there
        jobs = [(m, rs) for m, rs in jobs if m not in BASELINES]
        subset = requests[: args.baseline_limit]
        jobs += [(m, subset) for m in ["none", *BASELINES] if m in args.methods or m == "none"]
    for method, reqs in jobs:
        if (method, len(reqs)) in done:
            continue
        r = evaluate(
            lm, reqs, method, generation_tokens=args.ge_tokens,
            generation_protocol=args.ge_protocol, check_restore=True,
        )  # fmt: skip
        if args.ge_tokens:
            r["ge_protocol"] = args.ge_protocol
        out["independent"].append(_strip(r))
        done.add((method, len(reqs)))
        print(format_table([r]), flush=True)
        write()

    counts = [n for n in args.counts if n <= len(requests)]
    curves = out["many_edits"]
    for n in counts:
        curve = curves.setdefault(str(n), {})
        if "MEMIT (batch)" not in curve:
            t0 = time.perf_counter()
            batch = memit_batch(lm, requests[:n], args.ge_tokens, args.ge_protocol)
            curve["MEMIT (batch)"] = batch | {
                "label": "MEMIT (batch)", "wall_seconds": time.perf_counter() - t0}  # fmt: skip
            print(n, "MEMIT", curve["MEMIT (batch)"]["metrics"], flush=True)
            write()
    missing = [n for n in counts if "ROME (sequential)" not in curves[str(n)]]
    if args.skip_rome_stream:
        missing = []
    if missing:
        t0 = time.perf_counter()
        stream = rome_stream(lm, requests[: max(missing)], missing)
        wall = time.perf_counter() - t0
        for n in missing:
            label = {"label": "ROME (sequential)", "stream_wall_seconds": wall}
            curves[str(n)]["ROME (sequential)"] = stream[n] | label
            print(n, "ROME sequential", stream[n]["metrics"], flush=True)
        write()
    write()


if __name__ == "__main__":
    main()
