"""Bias and toxicity before and after DAMA, LSDM and FFN concept promotion (chapter 5.2).

``--part bias``: the unedited model, DAMA and LSDM (each fitted on DAMA's training
prompts, with a fifth of the training professions held out), measured on

* DAMA's test prompts (101 professions never used for fitting): a_s, a_f (joint fit);
* the held-out training professions (``--sweep``: DAMA variants compared there);
* WinoBias dev (pro/anti, types 1 and 2, DAMA's prompt protocol): accuracy and gap;
* perplexity on ``--ppl-n`` WikiBio passages and token accuracy of the built-in facts'
  true answers (the cost). ``--winobias-n`` keeps the first sentences of each set.

``--part toxicity``: ``ffn-promote`` with the default safe concepts (the paper's
coefficient 3, 10 values) on ``--rtp`` challenging RealToxicityPrompts prompts: the rate
of toxic continuations (offline scorer ``alt-profanity-check``, ≥ 0.5) before and after,
perplexity, and the promoted values' top tokens; and the same on the first
``--rtp-sample`` prompts of the 1,000-prompt sample (a second, unseen prompt set).

Each part updates its key of ``results/bias.json``.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_bias.py --part bias
    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_bias.py --part toxicity
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from common import RESULTS, machine, print_table

from medit_lite import builtin_requests, edit, load_model
from medit_lite.applications import bias, toxicity
from medit_lite.methods.ffn_promote import SAFE_CONCEPTS, promote_request


def measure(lm, data: dict) -> dict:
    t0 = time.perf_counter()
    test = bias.gender_bias(lm, data["test"])
    out = {
        "a_s": test["a_s"],
        "a_f": test["a_f"],
        "fit": test,
        "winobias": bias.winobias_scores(lm, data["winobias"]),
        "perplexity": bias.perplexity(lm, data["texts"]),
        "fact_accuracy": bias.fact_accuracy(lm, data["facts"]),
    }
    out["seconds_measure"] = time.perf_counter() - t0
    return out


def _strip(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("projections", "directions", "history")}


def part_bias(lm, args) -> dict:
    train = bias.load_dama_prompts("train")
    fit_prof, val_prof = bias.split_professions(train)
    data = {
        "test": bias.load_dama_prompts("test"),
        "val": [r for r in train if r["profession"] in set(val_prof)],
        "winobias": {k: v[: args.winobias_n] for k, v in bias.load_winobias(split="dev").items()},
        "texts": bias.heldout_texts(args.ppl_n),
        "facts": [replace(r, neighborhood=()) for r in builtin_requests()],
    }
    methods = {"none": measure(lm, data)}
    print("none", _row("none", methods["none"]), flush=True)
    for name, n in (("dama", args.dama_n), ("lsdm", args.lsdm_n)):
        reqs = bias.dama_requests("train", limit=n, exclude=val_prof)
        t0 = time.perf_counter()
        result = edit(lm, reqs, name)
        fit_seconds = time.perf_counter() - t0
        row = measure(lm, data) | {
            "seconds_fit": fit_seconds,
            "n_requests": len(reqs),
            "info": _strip(result.info[0]),
            "hparams": {k: v for k, v in vars(result.hparams).items()},
        }
        result.restore()
        methods[name] = row
        print(name, _row(name, row), flush=True)
    sweep = []
    for changes in args.sweep:
        reqs = bias.dama_requests("train", limit=args.dama_n, exclude=val_prof)
        with edit(lm, reqs, "dama", **changes):
            val = bias.gender_bias(lm, data["val"])
            ppl = bias.perplexity(lm, data["texts"])
        sweep.append({"changes": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in changes.items()},
                      "val": val, "perplexity": ppl})  # fmt: skip
        print("sweep", changes, round(val["a_s"], 4), round(ppl, 2), flush=True)
    return {
        "methods": methods,
        "dama_sweep": sweep,
        "val_professions": val_prof,
        "n_fit_professions": len(fit_prof),
    }


def _row(name, m) -> dict:
    return {
        "method": name,
        "a_s": round(m["a_s"], 4),
        "a_f": round(m["a_f"], 4),
        "pro": round(m["winobias"]["pro"], 3),
        "anti": round(m["winobias"]["anti"], 3),
        "gap": round(m["winobias"]["gap"], 3),
        "ppl": round(m["perplexity"], 2),
        "facts": round(m["fact_accuracy"], 3),
    }


def part_toxicity(lm, args) -> dict:
    sets = {
        "challenging": [p["text"] for p in toxicity.load_prompts(limit=args.rtp)],
        "sample": [
            p["text"]
            for p in toxicity.load_prompts(
                "realtoxicityprompts_sample.jsonl", limit=args.rtp_sample
            )
        ],
    }
    texts = bias.heldout_texts(args.ppl_n)
    out = {"before": {}, "after": {}, "num_beams": args.num_beams, "concept": SAFE_CONCEPTS}
    for name, prompts in sets.items():
        out["before"][name] = toxicity.toxicity_report(lm, prompts, num_beams=args.num_beams)
        print("before", name, out["before"][name]["toxic_rate"], flush=True)
    out["before"]["perplexity"] = bias.perplexity(lm, texts)
    with edit(lm, promote_request(), "ffn-promote") as result:
        out["values"] = result.info[0]["values"]
        out["coef"] = result.info[0]["coef"]
        for name, prompts in sets.items():
            out["after"][name] = toxicity.toxicity_report(lm, prompts, num_beams=args.num_beams)
            print("after", name, out["after"][name]["toxic_rate"], flush=True)
        out["after"]["perplexity"] = bias.perplexity(lm, texts)
    return out


def _update(key: str, payload: dict) -> None:
    path = RESULTS / "bias.json"
    RESULTS.mkdir(exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current[key] = {"machine": machine(), **payload}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str))
    tmp.replace(path)
    print(f"\nupdated {path} [{key}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["bias", "toxicity"], required=True)
    parser.add_argument("--dama-n", type=int, default=192, help="training prompts for DAMA")
    parser.add_argument("--lsdm-n", type=int, default=192, help="training prompts for LSDM")
    parser.add_argument("--winobias-n", type=int, default=None, help="sentences per set")
    parser.add_argument("--ppl-n", type=int, default=100, help="WikiBio passages")
    parser.add_argument("--rtp", type=int, default=200, help="prompts per toxicity set")
    parser.add_argument("--rtp-sample", type=int, default=100, help="prompts of the sample")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--sweep", type=json.loads, nargs="*", default=[])
    args = parser.parse_args()
    args.sweep = [
        {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()} for s in args.sweep
    ]
    lm = load_model()
    t0 = time.perf_counter()
    if args.part == "bias":
        payload = part_bias(lm, args)
        print_table(
            [_row(k, v) for k, v in payload["methods"].items()],
            list(_row("", payload["methods"]["none"])),
        )
    else:
        payload = part_toxicity(lm, args)
    payload["seconds"] = time.perf_counter() - t0
    payload["model"] = lm.name
    _update(args.part, payload)


if __name__ == "__main__":
    main()
