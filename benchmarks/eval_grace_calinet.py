"""Chapter 2.1's results for GRACE and CaliNet.

GRACE (``grace.json``):

1. the key distances ε is chosen from (edit prompt to paraphrases, to neighborhood prompts,
   to other edit prompts) at GRACE's layer, on the first ``--n`` CounterFact records;
2. independent edits on the first ``--n`` CounterFact and zsRE records (edit, score,
   restore), against the unedited model;
3. sequential streams of ``--n`` edits on each (the lifelong harness; CounterFact scored
   at the end of the stream on every request, zsRE's SR/GR/ER/locality curve).

CaliNet (``calinet.json``):

1. contrastive knowledge assessment (CKA) over ``known_1000`` and the CounterFact sample;
2. one batch calibration of the CounterFact true facts the assessment flags as wrong (at
   least ``--facts``), then: share calibrated (the true object is the teacher-forced argmax),
   CKA after, the true object against CounterFact's counterfactual object on the fact's
   prompt and held-out paraphrases, NS on their neighbors and on the other records'
   neighbors, before and after.

The JSON is rewritten after every step, so an interrupted run keeps what it finished.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_grace_calinet.py --part grace --n 100
    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_grace_calinet.py --part calinet
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import RESULTS, counterfact_sample, save

from medit_lite import EditRequest, edit, load_model, load_zsre, shared_data
from medit_lite.evaluate import evaluate, format_table
from medit_lite.lifelong import format_curve
from medit_lite.methods import calinet, grace
from medit_lite.metrics import locality_reference, score_requests, summarize


def _strip(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("rows", "lifelong")}
    return out


def _quantiles(values) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    qs = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    return {f"q{int(q * 100):02d}": float(torch.quantile(t, q)) for q in qs}


def _median_seconds(result: dict) -> float:
    """Median seconds per edit of a sequential run (the lifelong harness times each)."""
    return statistics.median(result["lifelong"]["seconds"])


# -- GRACE -------------------------------------------------------------------------------
EPS_RULE = "half the 1st percentile of the edit-to-neighbor distances"


def grace_part(lm, n: int, out: dict, resume: bool = False) -> None:
    hp = grace.GraceHParams.for_model(lm)
    layer = hp.layer_of(lm)
    cf = counterfact_sample(n)
    zsre_path = shared_data("zsre_eval_sample.json")
    zsre = load_zsre(zsre_path, limit=n) if zsre_path else []
    out.update(n=n, layer=layer, eps=hp.eps, hparams=hp.__dict__)

    old = json.loads((RESULTS / "grace.json").read_text()) if resume else {}
    if old.get("n") == n and old.get("eps") == hp.eps and "distances" in old:
        out.update({k: v for k, v in old.items() if k != "machine"})
        out["distances"]["eps_rule"] = EPS_RULE
        print("kept the finished parts of the earlier run:", ", ".join(sorted(out)))
    else:
        _distances(lm, layer, hp, cf, out)
    save("grace", out)

    runs = [("counterfact", cf), ("zsre", zsre)]
    for name, reqs in runs:  # the streams first: they are what GRACE is for
        if not reqs:
            print(f"{name}: data absent, skipped")
            continue
        part = out.setdefault(name, {})
        if "sequential" not in part:
            cf_run = name == "counterfact"  # scored on every request so far at 2 checkpoints
            seq = evaluate(
                lm,
                reqs,
                "grace",
                sequential=True,
                every=max(1, n // 2) if cf_run else 10,
                score_checkpoints=cf_run,
            )
            part["sequential"] = _strip(seq) | {"median_seconds": _median_seconds(seq)}
            part["lifelong"] = {k: v for k, v in seq["lifelong"].items() if k != "at_end"}
            print(format_curve(seq["lifelong"]))
            save("grace", out)
    for name, reqs in runs:
        part = out.get(name)
        if part is None:
            continue
        for mode, method in (("unedited", "none"), ("independent", "grace")):
            if mode not in part:
                part[mode] = _strip(evaluate(lm, reqs, method))  # seconds_per_edit: the mean
                save("grace", out)
        print(name)
        print(format_table([part["unedited"], part["independent"], part["sequential"]]))


def _distances(lm, layer, hp, cf, out) -> None:
    t0 = time.perf_counter()
    d = grace.key_distances(lm, layer, cf)
    out["distances"] = {
        "paraphrase": d["paraphrase"],
        "neighbor": d["neighbor"],
        "other_edit_sample": d["other_edit"][::10],
        "quantiles": {k: _quantiles(v) for k, v in d.items() if v},
        "eps_rule": EPS_RULE,
        "eps_from_rule": grace.choose_epsilon(d),
        "paraphrases_within_eps": sum(x <= hp.eps for x in d["paraphrase"]) / len(d["paraphrase"]),
        "neighbors_within_eps": sum(x <= hp.eps for x in d["neighbor"]) / len(d["neighbor"]),
        "seconds": time.perf_counter() - t0,
    }
    print(f"layer {layer}, ε = {hp.eps}; rule gives {out['distances']['eps_from_rule']:.3f}")
    for k, q in out["distances"]["quantiles"].items():
        print(f"  {k:12s} " + "  ".join(f"{a}={b:.2f}" for a, b in q.items()))


# -- CaliNet -----------------------------------------------------------------------------
def calibration_requests(cf, rows) -> list[EditRequest]:
    """CounterFact records whose true fact CKA flags as wrong, as requests that *calibrate*:
    target_new = the true object, target_true = CounterFact's counterfactual object (so ES
    reads "the true object now beats the counterfactual one")."""
    out = []
    for r, row in zip(cf, rows):
        if row["known"]:
            continue
        out.append(
            EditRequest(
                prompt=r.prompt,
                subject=r.subject,
                target_new=r.target_true,
                target_true=r.target_new,
                paraphrases=r.paraphrases,
                case_id=r.case_id,
                relation=r.relation,
            )
        )
    return out


def _exact(lm, prompts, targets) -> list[bool]:
    from medit_lite.lifelong import exact_matches

    return exact_matches(lm, prompts, targets)


def calinet_part(lm, min_facts: int, steps: int, out: dict) -> None:
    cf_all = counterfact_sample()
    known_path = shared_data("known_1000.json")
    known = calinet.facts_from_known(json.loads(known_path.read_text())) if known_path else []
    cf_facts = calinet.facts_from_requests(cf_all)
    pool = cf_facts + known
    templates, negatives = calinet.relation_templates(pool), calinet.negative_relations(pool)
    out["negatives"] = {r: negatives[r] for r in sorted(negatives)}
    out["templates"] = templates

    t0 = time.perf_counter()
    cka = {"counterfact": calinet.assess(lm, cf_facts, templates, negatives)}
    out["cka_seconds"] = {"counterfact": time.perf_counter() - t0}
    out["cka"] = {}
    _cka_summary(lm, "counterfact", cka["counterfact"], out)
    save("calinet", out)

    wrong = calibration_requests(cf_all, cka["counterfact"])
    print(f"{len(wrong)} CounterFact true facts flagged wrong")
    if len(wrong) < min_facts:
        print(f"fewer than {min_facts}: calibrating all {len(wrong)}")
    batch = wrong[:min_facts]  # the first ones, in the sample's order
    # locality on facts the model knows: as many records as calibrated ones
    others = [r for r, row in zip(cf_all, cka["counterfact"]) if row["known"]][: len(batch)]
    wrong_ids = {r.case_id for r in batch}
    neighbors_of = [r for r in cf_all if r.case_id in wrong_ids]  # original CF requests

    def measure() -> dict:
        rows = score_requests(lm, batch)
        facts = calinet.facts_from_requests(
            [
                EditRequest(r.prompt, r.subject, r.target_true, r.target_new, relation=r.relation)
                for r in batch
            ]
        )
        cka_now = calinet.assess(lm, facts, templates, negatives)
        exact = _exact(lm, [r.text for r in batch], [r.target_new for r in batch])
        para = [(p, r.target_new) for r in batch for p in r.paraphrases]
        para_exact = _exact(lm, [p for p, _ in para], [t for _, t in para])
        nb = summarize(score_requests(lm, neighbors_of, ref_nb))
        held = summarize(score_requests(lm, others, ref_others))
        return {
            "calibrated": sum(exact) / len(exact),
            "calibrated_per_fact": exact,
            "cka_known": sum(r["known"] for r in cka_now) / len(cka_now),
            "ES_true_vs_counterfactual": summarize(rows).get("ES"),
            "PS_true_vs_counterfactual": summarize(rows).get("PS"),
            "paraphrase_exact": sum(para_exact) / max(1, len(para_exact)),
            "NS_their_neighbors": nb.get("NS"),
            "locality_their_neighbors": nb.get("locality"),
            "NS_other_records": held.get("NS"),
            "locality_other_records": held.get("locality"),
        }

    ref_nb = locality_reference(lm, neighbors_of)
    ref_others = locality_reference(lm, others)
    before = measure()
    with edit(lm, batch, "calinet", steps=steps) as result:
        after = measure()
        info = {k: v for k, v in result.info[0].items() if k != "losses"}
        losses = result.info[0]["losses"]
    out["calibration"] = {
        "n_facts": len(batch),
        "steps": steps,
        "before": before,
        "after": after,
        "info": info,
        "losses": losses[:: max(1, len(losses) // 200)],
        "edit_seconds": result.seconds,
        "hparams": result.hparams.__dict__,
    }
    for k in before:
        if not k.endswith("per_fact"):
            print(f"  {k:28s} {before[k]!s:>8.8}  ->  {after[k]!s:>8.8}")
    save("calinet", out)
    if known:  # the larger assessment last: the calibration result is saved already
        t0 = time.perf_counter()
        rows = calinet.assess(lm, known, templates, negatives)
        out["cka_seconds"]["known_1000"] = time.perf_counter() - t0
        _cka_summary(lm, "known_1000", rows, out)
        save("calinet", out)


def _cka_summary(lm, name: str, rows: list[dict], out: dict) -> None:
    top1 = _exact(lm, [r["prompt"] for r in rows], [r["object"] for r in rows])
    known_top1 = [t for t, r in zip(top1, rows) if r["known"]]
    unknown_top1 = [t for t, r in zip(top1, rows) if not r["known"]]
    out["cka"][name] = {
        "n": len(rows),
        "known_share": sum(r["known"] for r in rows) / len(rows),
        "scores": [r["score"] for r in rows],
        "relations": [r["relation"] for r in rows],
        "exact_match": top1,
        "exact_match_if_known": sum(known_top1) / max(1, len(known_top1)),
        "exact_match_if_unknown": sum(unknown_top1) / max(1, len(unknown_top1)),
    }
    c = out["cka"][name]
    print(
        f"CKA {name}: {len(rows)} facts, {c['known_share']:.2%} known; exact match "
        f"{c['exact_match_if_known']:.2%} of known, {c['exact_match_if_unknown']:.2%} of unknown"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("grace", "calinet", "all"), default="all")
    ap.add_argument("--n", type=int, default=100, help="records per GRACE run")
    ap.add_argument("--facts", type=int, default=60, help="flagged facts to calibrate")
    ap.add_argument("--steps", type=int, default=300, help="CaliNet training steps")
    ap.add_argument("--resume", action="store_true", help="keep finished GRACE parts")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model()
    if args.part in ("grace", "all"):
        grace_part(lm, args.n, {"method": "grace"}, args.resume)
    if args.part in ("calinet", "all"):
        calinet_part(lm, args.facts, args.steps, {"method": "calinet"})
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
