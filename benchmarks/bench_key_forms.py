"""Issue 13.1: ROME's three insertions on the same CounterFact records.

``key_form`` (``medit_lite/methods/rome.py``): ``original`` (kmeng01/rome: the value at the
averaged key k*), ``r-rome`` (Gupta et al.'s rebuilding-rome: v* = m + δ with m = W k of
the plain prompt, written at k*) and ``k-star`` (this project's default). Each form edits
the first ``--limit`` records one at a time (edit, measure, restore) with the same value
optimisation; ES/PS/NS and the EasyEdit family, and GE with ``--ge-tokens`` (greedy, the
pages' cheap protocol). ``--stream N`` adds a sequential stream of N edits per form,
scored on the requests edited so far every ``--every`` edits (the disabling-edit
question). The JSON (``rome_key_forms.json``) is rewritten after every form.

    OMP_NUM_THREADS=1 MEDIT_QUIET=1 .venv/bin/python benchmarks/bench_key_forms.py --limit 100
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, compact, counterfact_sample, save

from medit_lite import load_model
from medit_lite.evaluate import evaluate, format_table
from medit_lite.methods.rome import KEY_FORMS

NAME = "rome_key_forms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--forms", nargs="+", default=list(KEY_FORMS), choices=KEY_FORMS)
    ap.add_argument("--ge-tokens", type=int, default=0)
    ap.add_argument("--stream", type=int, default=0)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--out", default=NAME, help="results file name (forms run in parallel "
                    "processes write one file each; --merge folds one into rome_key_forms)")
    ap.add_argument("--merge", default=None, help="fold this results file's forms into " + NAME)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge)

    lm = load_model()
    requests = counterfact_sample(args.limit)
    old = RESULTS / f"{args.out}.json"
    payload = json.loads(old.read_text()) if old.exists() else {}
    if payload.get("limit") != args.limit:
        payload = {}
    payload.pop("machine", None)
    payload.update({"model": lm.name, "data": "counterfact_sample.json", "limit": args.limit})
    payload.setdefault("forms", {})
    results = []
    for form in args.forms:
        res = evaluate(lm, requests, "rome", generation_tokens=args.ge_tokens,
                       check_restore=True, key_form=form)  # fmt: skip
        payload["forms"].setdefault(form, {})["independent"] = compact(res)
        save(args.out, payload)
        results.append(res | {"method": f"rome ({form})"})
        if args.stream:
            stream = evaluate(lm, requests[: args.stream], "rome", sequential=True,
                              every=args.every, score_checkpoints=True, key_form=form)  # fmt: skip
            payload["forms"][form]["sequential"] = compact(stream)
            save(args.out, payload)
    print(f"\nfirst {args.limit} CounterFact records, one edit at a time")
    print(format_table(results))


def merge(name: str) -> None:
    """Fold the forms of ``name``.json into rome_key_forms.json (same records only)."""
    base = json.loads((RESULTS / f"{NAME}.json").read_text())
    other = json.loads((RESULTS / f"{name}.json").read_text())
    same = ("limit", "data", "model")
    if [other[k] for k in same] != [base[k] for k in same]:
        raise SystemExit(f"{name}.json ran other records or another model: not merged")
    for form, entries in other["forms"].items():
        base["forms"].setdefault(form, {}).update(entries)
    base.pop("machine", None)
    save(NAME, base)


if __name__ == "__main__":
    main()
