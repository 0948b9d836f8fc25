"""Chapter 2, part 2: the internal-modification methods that are not ROME/MEMIT.

1. the trained editors of MEND, KE and ENN: trained (or loaded from ``$MEDIT_CACHE``)
   with the default budget; training time, size and loss curves; for ENN also what
   editable training costs the base model (perplexity on held-out WikiBio text);
2. independent edits (edit, measure, restore) on the first ``--limit`` CounterFact and
   zsRE eval records, for the unedited model and each method in ``--methods`` (KN on the
   first ``--kn-limit`` only: its attribution runs 6 prompts x 30 layers per edit);
3. a sequential stream of ``--stream`` zsRE edits with each trained editor (each edit on
   top of the last);
4. the time of one edit of each (median of 20 zsRE edits).

The JSON is rewritten after every part, so an interrupted run keeps what it finished.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_internal.py --limit 100 --stream 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import RESULTS, compact, save, summary

from medit_lite import edit, load_counterfact, load_model, load_zsre, shared_data
from medit_lite.applications.bias import perplexity
from medit_lite.evaluate import evaluate, format_table
from medit_lite.methods import enn, ke, mend

#: the methods that train before they edit, and how to get their trained part
TRAINED = {
    "mend": lambda lm: mend.mend_editor(lm, mend.MENDHParams.for_model(lm)),
    "ke": lambda lm: ke.ke_editor(lm, ke.KEHParams.for_model(lm)),
    "enn": lambda lm: enn.enn_base(lm, enn.ENNHParams.for_model(lm)),
}


def _strip(result: dict) -> dict:
    return compact(result, lifelong_without=("seconds",))


def _data(name: str, loader, limit: int):
    path = shared_data(name)
    if path is None:
        raise SystemExit(f"needs ../shared/data/{name} beside the repository")
    return loader(path, limit=limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--kn-limit", type=int, default=20)
    parser.add_argument("--stream", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=["mend", "ke", "enn", "kn"])
    parser.add_argument("--skip-eval", action="store_true", help="only train and time")
    parser.add_argument(
        "--skip-independent",
        action="store_true",
        help="keep the independent-edit results of the last run; run the streams and timings",
    )
    args = parser.parse_args()
    lm = load_model()
    old = RESULTS / "internal.json"  # runs with other --methods keep each other's parts
    payload: dict = json.loads(old.read_text()) if old.exists() else {}
    payload.pop("machine", None)
    payload.update({"limit": args.limit, "kn_limit": args.kn_limit})
    payload.setdefault("results", {})
    for method in args.methods:
        if method in TRAINED:
            train_part(lm, payload, method)
    if args.skip_eval:
        return
    datasets = {
        "counterfact": _data("counterfact_sample.json", load_counterfact, args.limit),
        "zsre": _data("zsre_eval_sample.json", load_zsre, args.limit),
    }
    for dname, requests in datasets.items():
        if args.skip_independent:
            break
        rows = [evaluate(lm, requests, "none")]
        payload["results"][f"{dname}/none"] = _strip(rows[0])
        for method in args.methods:
            reqs = requests[: args.kn_limit] if method == "kn" else requests
            res = evaluate(lm, reqs, method)
            rows.append(res)
            payload["results"][f"{dname}/{method}"] = _strip(res)
            if method == "kn":  # the unedited model on the same records, for comparison
                base = evaluate(lm, reqs, "none")
                payload["results"][f"{dname}/none_kn_records"] = _strip(base)
            save("internal", payload)
        print(f"\n{dname} (first {args.limit}; kn: first {args.kn_limit})")
        print(format_table(rows))
    for method in [m for m in args.methods if m in TRAINED]:
        if args.stream:
            stream = _data("zsre_eval_sample.json", load_zsre, args.stream)
            res = evaluate(lm, stream, method, sequential=True, every=max(1, args.stream // 10))
            payload["results"][f"zsre/{method}/sequential"] = _strip(res)
            print(f"\n{method}, {args.stream} sequential zsRE edits")
            print(format_table([res]))
            save("internal", payload)
        times = []
        for r in datasets["zsre"][:20]:
            with edit(lm, r, method) as result:
                times.append(result.info[0]["edit_seconds"])
        payload[f"{method}_edit_seconds"] = summary(times)
        print(f"\none {method} edit: median {statistics.median(times):.3f} s (20 edits)")
        save("internal", payload)


def train_part(lm, payload: dict, method: str) -> None:
    """One method's trained part (trained now, or loaded): time, size, loss curves."""
    t0 = time.perf_counter()
    hp = {"mend": mend.MENDHParams, "ke": ke.KEHParams, "enn": enn.ENNHParams}[method]
    trained, log = TRAINED[method](lm)
    n_params = sum(p.numel() for p in trained.parameters())
    part = {
        "hparams": hp.for_model(lm).training_part(),
        "from_cache": log.from_cache,
        "train_seconds": log.seconds,
        "prep_seconds": (log.logs.get("prep_seconds") or [None])[0],
        "load_or_train_seconds_now": time.perf_counter() - t0,
        "steps": log.steps,
        "losses": log.losses,
        "editor_parameters": n_params,
        "editor_megabytes": n_params * 4 / 2**20,
    }
    part.update({k: v for k, v in log.logs.items() if k != "prep_seconds"})
    if method == "enn":  # what editable training costs the model itself
        before = perplexity(lm)
        with enn.install(lm):
            after = perplexity(lm)
        part["perplexity"] = {"pretrained": before, "enn_base": after}
        print(f"ENN base: held-out perplexity {before:.2f} -> {after:.2f}")
    payload[f"{method}_training"] = part
    print(f"{method}: {n_params:,} trained parameters, trained {log.seconds:.0f} s")
    save("internal", payload)


if __name__ == "__main__":
    main()
