"""Chapter 2, part 2: the internal-modification methods that are not ROME/MEMIT.

1. MEND's editor: trained (or loaded from ``$MEDIT_CACHE``) with the default budget; its
   training time, size and loss curve;
2. independent edits (edit, measure, restore) on the first ``--limit`` CounterFact and
   zsRE eval records, for the unedited model and each method in ``--methods`` (KN on the
   first ``--kn-limit`` only: its attribution runs 6 prompts x 30 layers per edit);
3. a sequential stream of ``--stream`` zsRE edits with MEND (each on top of the last);
4. the time of one MEND edit (forward/backward on the edit prompt + the editor).

The JSON is rewritten after every part, so an interrupted run keeps what it finished.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_internal.py --limit 100 --stream 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import RESULTS, save, summary

from medit_lite import edit, load_counterfact, load_model, load_zsre, shared_data
from medit_lite.evaluate import evaluate, format_table
from medit_lite.methods.mend import MENDHParams, mend_editor


def _strip(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("rows", "lifelong")}
    if "lifelong" in result:
        life = dict(result["lifelong"])
        life.pop("seconds", None)
        out["lifelong"] = life
    return out


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
    parser.add_argument("--methods", nargs="+", default=["mend", "kn"])
    args = parser.parse_args()
    lm = load_model()
    old = RESULTS / "internal.json"  # runs with other --methods keep each other's parts
    payload: dict = json.loads(old.read_text()) if old.exists() else {}
    payload.pop("machine", None)
    payload.update({"limit": args.limit, "kn_limit": args.kn_limit})
    payload.setdefault("results", {})
    if "mend" in args.methods:
        train_part(lm, payload)
    datasets = {
        "counterfact": _data("counterfact_sample.json", load_counterfact, args.limit),
        "zsre": _data("zsre_eval_sample.json", load_zsre, args.limit),
    }
    for dname, requests in datasets.items():
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
    if "mend" not in args.methods:
        return
    if args.stream:
        stream = _data("zsre_eval_sample.json", load_zsre, args.stream)
        res = evaluate(lm, stream, "mend", sequential=True, every=max(1, args.stream // 10))
        payload["results"]["zsre/mend/sequential"] = _strip(res)
        print(f"\nMEND, {args.stream} sequential zsRE edits")
        print(format_table([res]))
        save("internal", payload)
    times = []
    for r in datasets["zsre"][:20]:
        with edit(lm, r, "mend") as result:
            times.append(result.info[0]["edit_seconds"])
    payload["mend_edit_seconds"] = summary(times)
    print(f"\none MEND edit: median {statistics.median(times):.3f} s (20 edits)")
    save("internal", payload)


def train_part(lm, payload: dict) -> None:
    """MEND's editor (trained now, or loaded): training time, size, loss curve."""
    hp = MENDHParams.for_model(lm)
    t0 = time.perf_counter()
    editor, log = mend_editor(lm, hp)
    n_params = sum(p.numel() for p in editor.parameters())
    payload["mend_training"] = {
        "hparams": hp.training_part(),
        "from_cache": log.from_cache,
        "train_seconds": log.seconds,
        "prep_seconds": (log.logs.get("prep_seconds") or [None])[0],
        "load_or_train_seconds_now": time.perf_counter() - t0,
        "steps": log.steps,
        "losses": log.losses,
        "edit_nll": log.logs.get("edit_nll", []),
        "loc_kl": log.logs.get("loc_kl", []),
        "editor_parameters": n_params,
        "editor_megabytes": n_params * 4 / 2**20,
    }
    print(f"MEND editor: {n_params:,} parameters, trained {log.seconds:.0f} s")
    save("internal", payload)


if __name__ == "__main__":
    main()
