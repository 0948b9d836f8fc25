"""Chapter 2.1's results for the knowledge-cache methods: SERAC, NL patches, IKE.

1. training cost: SERAC's scope classifier and the NL-patch gate (seconds, bytes; read
   from the cache when trained before, then the seconds are those of the original run);
2. independent edits (edit, measure, restore) on the first ``--limit`` CounterFact records
   and the first ``--limit`` zsRE eval records, for the unedited model and each method,
   both metric families;
3. a lifelong stream of ``--stream`` sequential zsRE edits (SR/GR/ER/locality curve) for
   the methods in ``--sequential`` (SERAC and IKE by default);
4. ``--unseen N``: SERAC on the N CounterFact records after the first ``--limit``
   (records no choice above was made on).

The JSON is rewritten after every step, so an interrupted run keeps what it finished;
entries of methods not run this time are kept from the previous JSON (so methods can be
run one by one: ``--methods ike --sequential ike --unseen 0``).

    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_external.py --limit 100 --stream 100
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, compact, counterfact_sample, save

from medit_lite import edit, load_model, load_zsre, shared_data
from medit_lite.evaluate import evaluate, format_table
from medit_lite.methods import nl_patch, serac

METHODS = ("serac", "nl-patch", "ike")


def _strip(result: dict) -> dict:
    return compact(result, lifelong_without=("success", "seconds"))


def zsre_sample(limit: int):
    path = shared_data("zsre_eval_sample.json")
    if path is None:
        raise SystemExit("needs ../shared/data/zsre_eval_sample.json beside the repository")
    return load_zsre(path, limit=limit)


def training_costs(lm, methods) -> dict:
    out = {}
    if "serac" in methods:
        out["serac"] = serac_cost(lm)
    if "nl-patch" in methods:
        out["nl-patch"] = gate_cost(lm)
    return out


def serac_cost(lm) -> dict:
    t0 = time.perf_counter()
    clf, log = serac.scope_classifier(lm)
    cost = {
        "seconds": log.seconds,
        "wall_seconds_this_run": time.perf_counter() - t0,
        "from_cache": log.from_cache,
        "steps": log.steps,
        "bytes": clf.n_bytes,
        "final_loss": sum(log.losses[-20:]) / len(log.losses[-20:]),
        "losses": log.losses,
        "pos_acc": sum(log.logs["pos_acc"][-20:]) / 20,
        "neg_acc": sum(log.logs["neg_acc"][-20:]) / 20,
    }
    return cost


def gate_cost(lm) -> dict:
    t0 = time.perf_counter()
    gate, glog = nl_patch.trained_gate(lm)
    cost = {
        "seconds": glog.seconds,
        "wall_seconds_this_run": time.perf_counter() - t0,
        "from_cache": glog.from_cache,
        "steps": glog.steps,
        "bytes": gate.n_bytes,
        "final_loss": sum(glog.losses[-20:]) / len(glog.losses[-20:]),
        "acc": sum(glog.logs["acc"][-20:]) / 20,
    }
    return cost


def bytes_per_edit(lm, request, method) -> dict:
    with edit(lm, request, method) as result:
        info = result.info[0]
    return {k: v for k, v in info.items() if k in ("bytes_added", "context_tokens")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--stream", type=int, default=100)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--sequential", nargs="*", default=["serac", "ike"])
    ap.add_argument("--unseen", type=int, default=100)
    ap.add_argument("--datasets", nargs="*", default=["counterfact", "zsre"])
    ap.add_argument("--out", default="external", help="results file name (without .json)")
    ap.add_argument("--merge", default=None, help="merge this results file into external.json")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge)

    lm = load_model()
    old = RESULTS / f"{args.out}.json"
    payload: dict = json.loads(old.read_text()) if old.exists() else {}
    if payload.get("limit") != args.limit or payload.get("stream") != args.stream:
        payload = {}
    payload.pop("machine", None)
    payload.update({"limit": args.limit, "stream": args.stream, "model": lm.name})
    payload.setdefault("training", {}).update(training_costs(lm, args.methods))
    save(args.out, payload)
    loaders = {"counterfact": counterfact_sample, "zsre": zsre_sample}
    data = {name: loaders[name](args.limit) for name in args.datasets}
    payload["unedited"] = {}
    payload.setdefault("methods", {}).update({m: {} for m in args.methods})
    for name, requests in data.items():
        base = evaluate(lm, requests, "none")
        payload["unedited"][name] = _strip(base)
        results = [base]
        for method in args.methods:
            res = evaluate(lm, requests, method, check_restore=True)
            payload["methods"][method][name] = _strip(res)
            payload["methods"][method].setdefault("cost", bytes_per_edit(lm, requests[0], method))
            results.append(res)
            save(args.out, payload)
        print(f"\n{name}, first {args.limit} records, independent edits")
        print(format_table(results))
    stream = zsre_sample(args.stream)
    for method in args.sequential:
        res = evaluate(lm, stream, method, sequential=True, every=10)
        payload["methods"].setdefault(method, {})["zsre_sequential"] = _strip(res)
        save(args.out, payload)
        print(f"\n{method}: {args.stream} sequential zsRE edits")
        print(format_table([res]))
    if args.unseen:
        later = counterfact_sample(args.limit + args.unseen)[args.limit :]
        res = evaluate(lm, later, "serac")
        base = evaluate(lm, later, "none")
        payload["unseen_counterfact"] = {"serac": _strip(res), "unedited": _strip(base)}
        save(args.out, payload)
        print(f"\nSERAC on CounterFact records {args.limit}-{args.limit + len(later)} (unseen)")
        print(format_table([base, res]))


def merge(name: str) -> None:
    """Fold the methods (and training costs) of ``name``.json into external.json."""
    main_path, other_path = RESULTS / "external.json", RESULTS / f"{name}.json"
    base = json.loads(main_path.read_text()) if main_path.exists() else {}
    other = json.loads(other_path.read_text())
    # each result keeps its own "n": files run with different --limit can be merged;
    # the unedited scores of the other file are kept under its limit
    # per method, the datasets the other file ran replace those of the same name only
    for method, entries in other.get("methods", {}).items():
        base.setdefault("methods", {}).setdefault(method, {}).update(entries)
    base.setdefault("training", {}).update(other.get("training", {}))
    if other.get("limit") != base.get("limit"):
        base.setdefault("unedited_by_limit", {})[str(other["limit"])] = other.get("unedited", {})
    base.setdefault("model", other.get("model"))
    base.pop("machine", None)
    save("external", base)


if __name__ == "__main__":
    main()
