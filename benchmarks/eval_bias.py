"""Bias and toxicity before and after DAMA, LSDM and FFN concept promotion (chapter 5.2).

``--part bias``: the unedited model, DAMA and LSDM (each fitted on DAMA's training
prompts, with a fifth of the training professions held out) and, on SmolLM2-135M,
``dama+attn`` (not the paper: DAMA with ``project_attention``,
``dama.SMOLLM2_ATTENTION_VARIANT``), measured on

* DAMA's test prompts (101 professions never used for fitting): a_s, a_f (joint fit);
* WinoBias dev (pro/anti, types 1 and 2, DAMA's prompt protocol): accuracy and gap, on
  all of it and (``winobias_heldout``) on the second half of each file, the half that no
  choice of hyperparameters looked at;
* perplexity on ``--ppl-n`` WikiBio passages and token accuracy of the built-in facts'
  true answers (the cost). ``--winobias-n`` keeps the first sentences of each set.

``--sweep`` (DAMA) and ``--lsdm-sweep`` (LSDM): variants, each a JSON object of
hyperparameter changes (LSDM's may hold ``"n"``, the number of fitting prompts), compared
on what is not a report set: a_s and mean |P(he) − P(she)| on the held-out training
professions, perplexity on ``--sweep-ppl-n`` passages, the built-in facts, and with
``--sweep-winobias`` the *first* half of each WinoBias dev file. DAMA's variants that share
a top layer share one set of value differences (``dama.dama_values``, computed once;
``update="mixed"``); the weights are put back, and checked bit-exact, after each variant.
``--skip-methods`` runs only the sweeps (keeping the methods already in the JSON); each
finished variant is written at once.

``--part toxicity``: ``ffn-promote`` with the default safe concepts (the paper's
coefficient 3, 10 values) on ``--rtp`` challenging RealToxicityPrompts prompts: the rate
of toxic continuations (offline scorer ``alt-profanity-check``, ≥ 0.5) before and after,
perplexity, and the promoted values' top tokens; and the same on the first
``--rtp-sample`` prompts of the 1,000-prompt sample (a second, unseen prompt set).

Each part updates its key of ``results/bias.json``.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_bias.py --part bias
    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_bias.py --part toxicity
    MEDIT_QUIET=1 .venv/bin/python benchmarks/eval_bias.py --part bias --skip-methods \
        --sweep '{"layers": [24, 25, 26, 27], "nullspace_dimension": 8}' \
        --lsdm-sweep '{"clamp_norm_factor": 1.5}'
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from common import RESULTS, machine, print_table

from medit_lite import builtin_requests, edit, load_model, weights_fingerprint
from medit_lite.applications import bias, toxicity
from medit_lite.editing import get_method, make_hparams
from medit_lite.methods.dama import (
    SMOLLM2_ATTENTION_VARIANT,
    dama_values,
    execute_dama,
    values_key,
)
from medit_lite.methods.ffn_promote import SAFE_CONCEPTS, promote_request


def winobias_halves(winobias: dict) -> tuple[dict, dict]:
    """Each WinoBias set cut in two: the first half (the only part a sweep may look at)
    and the second (never used to choose anything)."""
    first = {k: v[: len(v) // 2] for k, v in winobias.items()}
    second = {k: v[len(v) // 2 :] for k, v in winobias.items()}
    return first, second


def measure(lm, data: dict) -> dict:
    t0 = time.perf_counter()
    test = bias.gender_bias(lm, data["test"])
    # one pass over the reported sentences; the second halves are scored from it too
    per = bias.winobias_per_set(lm, data["winobias"])
    half = data["winobias_half"]
    out = {
        "a_s": test["a_s"],
        "a_f": test["a_f"],
        "fit": test,
        "winobias": bias.winobias_summary(per),
        # empty (nan) where --winobias-n keeps only sentences of the first halves
        "winobias_heldout": bias.winobias_summary({k: v[half[k] :] for k, v in per.items()}),
        "perplexity": bias.perplexity(lm, data["texts"]),
        "fact_accuracy": bias.fact_accuracy(lm, data["facts"]),
    }
    out["seconds_measure"] = time.perf_counter() - t0
    return out


def measure_sweep(lm, data: dict) -> dict:
    """What a sweep may choose on: held-out training professions, perplexity on fewer
    passages, the facts, and optionally the first halves of WinoBias dev."""
    t0 = time.perf_counter()
    out = {
        "val": bias.gender_bias(lm, data["val"]),
        "perplexity": bias.perplexity(lm, data["sweep_texts"]),
        "fact_accuracy": bias.fact_accuracy(lm, data["facts"]),
    }
    if data.get("winobias_tune"):
        out["winobias_first_half"] = bias.winobias_scores(lm, data["winobias_tune"])
    out["seconds_measure"] = time.perf_counter() - t0
    return out


def _strip(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("projections", "directions", "history")}


def _jsonable(changes: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}


def _sweep_row(kind: str, changes: dict, hp, info: dict, m: dict, base: dict) -> dict:
    def rel(new, old):
        return (new - old) / abs(old) if old else float("nan")

    row = {
        "changes": _jsonable(changes),
        "layers": list(hp.layers),
        **m,
        "info": _strip(info),
        # relative to the unedited model on the same sets
        "val_abs_a_s_change": rel(abs(m["val"]["a_s"]), abs(base["val"]["a_s"])),
        "val_mean_abs_gap_change": rel(m["val"]["mean_abs_gap"], base["val"]["mean_abs_gap"]),
        "perplexity_change": rel(m["perplexity"], base["perplexity"]),
        "fact_points": 100 * (m["fact_accuracy"] - base["fact_accuracy"]),
    }
    if "winobias_first_half" in m:
        row["winobias_first_half_gap_change"] = rel(
            m["winobias_first_half"]["gap"], base["winobias_first_half"]["gap"]
        )
    print(
        kind,
        row["changes"],
        f"val |a_s| {row['val_abs_a_s_change']:+.0%} |gap| {row['val_mean_abs_gap_change']:+.0%}"
        f" ppl {row['perplexity_change']:+.1%} facts {row['fact_points']:+.1f}"
        + (
            f" wb1 gap {m['winobias_first_half']['gap']:+.3f}" if "winobias_first_half" in m else ""
        ),
        flush=True,
    )
    return row


def _merged(key: str, rows: list[dict]) -> list[dict]:
    """The sweep rows already in results/bias.json under ``key``, with ``rows`` added (a
    row with the same changes replaces the stored one), so that sweeps can be run in parts."""
    path = RESULTS / "bias.json"
    current = json.loads(path.read_text()).get("bias", {}) if path.exists() else {}
    new = {json.dumps(r["changes"], sort_keys=True) for r in rows}
    kept = [r for r in current.get(key, []) if json.dumps(r["changes"], sort_keys=True) not in new]
    return kept + rows


def dama_sweep(lm, args, data, val_prof, save) -> list[dict]:
    """DAMA variants; those with the same top layer (and value hyperparameters) share one
    set of value differences. Weights are put back bit-exactly after each variant."""
    reqs = bias.dama_requests("train", limit=args.dama_n, exclude=val_prof)
    spec = get_method("dama")
    groups: dict[tuple, list] = {}
    for changes in args.sweep:
        hp = make_hparams(spec, lm, None, **changes)
        if hp.update != "mixed":
            raise SystemExit('--sweep shares value differences: update must be "mixed"')
        groups.setdefault(values_key(hp), []).append((changes, hp))
    params = dict(lm.model.named_parameters())
    fingerprint = weights_fingerprint(lm)
    rows = []
    for variants in groups.values():
        values = dama_values(lm, reqs, variants[0][1])
        print(f"dama values at layer {variants[0][1].layers[-1]}: {values['seconds']:.0f} s",
              flush=True)  # fmt: skip
        for changes, hp in variants:
            names = spec.params(lm, hp)
            backup = {n: params[n].detach().clone() for n in names}
            try:
                t0 = time.perf_counter()
                info = execute_dama(lm, reqs, hp, values=values)
                info["seconds_values_shared"] = values["seconds"]
                info["seconds_fit"] = time.perf_counter() - t0
                m = measure_sweep(lm, data)
            finally:
                with torch.no_grad():
                    for n, saved in backup.items():
                        params[n].copy_(saved)
            if weights_fingerprint(lm) != fingerprint:
                raise RuntimeError("weights not restored bit-exactly after a DAMA variant")
            rows.append(_sweep_row("dama", changes, hp, info, m, data["sweep_base"]))
            rows[-1]["n_requests"] = len(reqs)
            save(rows)
    return rows


def lsdm_sweep(lm, args, data, val_prof, save) -> list[dict]:
    """LSDM variants (``"n"``: the number of fitting prompts, default ``--lsdm-n``), each
    fitted, measured and restored with :func:`~medit_lite.edit`."""
    fingerprint = weights_fingerprint(lm)
    rows = []
    for changes in args.lsdm_sweep:
        changes = dict(changes)
        n = changes.pop("n", args.lsdm_n)
        reqs = bias.dama_requests("train", limit=n, exclude=val_prof)
        with edit(lm, reqs, "lsdm", **changes) as result:
            m = measure_sweep(lm, data)
        if weights_fingerprint(lm) != fingerprint:
            raise RuntimeError("weights not restored bit-exactly after an LSDM variant")
        info = result.info[0] | {"seconds_fit": result.seconds}
        label = changes | ({"n": n} if n != args.lsdm_n else {})
        rows.append(_sweep_row("lsdm", label, result.hparams, info, m, data["sweep_base"]))
        rows[-1]["n_requests"] = len(reqs)
        save(rows)
    return rows


def part_bias(lm, args) -> dict:
    train = bias.load_dama_prompts("train")
    fit_prof, val_prof = bias.split_professions(train)
    winobias = bias.load_winobias(split="dev")
    tune, _ = winobias_halves(winobias)
    data = {
        "test": bias.load_dama_prompts("test"),
        "val": [r for r in train if r["profession"] in set(val_prof)],
        "winobias": {k: v[: args.winobias_n] for k, v in winobias.items()},
        "winobias_half": {k: len(v) // 2 for k, v in winobias.items()},
        "texts": bias.heldout_texts(args.ppl_n),
        "sweep_texts": bias.heldout_texts(args.sweep_ppl_n),
        "winobias_tune": tune if args.sweep_winobias else None,
        "facts": [replace(r, neighborhood=()) for r in builtin_requests()],
    }
    out = {"val_professions": val_prof, "n_fit_professions": len(fit_prof)}
    if not args.skip_methods:
        methods = {"none": measure(lm, data)}
        print("none", _row("none", methods["none"]), flush=True)
        runs = [("dama", "dama", {}, args.dama_n), ("lsdm", "lsdm", {}, args.lsdm_n)]
        if lm.n_layers == 30 and lm.d_model == 576 and not args.no_variants:
            # not the paper: DAMA's projection applied to attention outputs too
            runs.insert(1, ("dama+attn", "dama", SMOLLM2_ATTENTION_VARIANT, args.dama_n))
        for name, method, changes, n in runs:
            reqs = bias.dama_requests("train", limit=n, exclude=val_prof)
            t0 = time.perf_counter()
            result = edit(lm, reqs, method, **changes)
            fit_seconds = time.perf_counter() - t0
            row = measure(lm, data) | {
                "seconds_fit": fit_seconds,
                "n_requests": len(reqs),
                "info": _strip(result.info[0]),
                "hparams": {k: v for k, v in vars(result.hparams).items()},
            }
            result.restore()
            if method != name:
                row["method"], row["changes"] = method, _jsonable(changes)
            methods[name] = row
            print(name, _row(name, row), flush=True)
        out["methods"] = methods
    if args.sweep or args.lsdm_sweep:
        data["sweep_base"] = measure_sweep(lm, data)
        setup = {
            "base": data["sweep_base"],
            "ppl_n": args.sweep_ppl_n,
            "val_prompts": len(data["val"]),
            "winobias": "first half of each dev file" if args.sweep_winobias else None,
            "machine": machine(),
        }
        print("sweep base", setup["base"]["val"]["a_s"], setup["base"]["perplexity"],
              flush=True)  # fmt: skip
        out["sweep_setup"] = setup
        sweeps = (
            ("dama_sweep", args.sweep, dama_sweep),
            ("lsdm_sweep", args.lsdm_sweep, lsdm_sweep),
        )
        for key, wanted, run_sweep in sweeps:
            if not wanted:
                continue

            def save_rows(rows, key=key):  # after every variant, merged into bias.json
                _update("bias", {"sweep_setup": setup, key: _merged(key, rows)})

            out[key] = _merged(key, run_sweep(lm, args, data, val_prof, save_rows))
    return out


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
    """Merge ``payload`` into ``key`` of results/bias.json: entries this run did not
    produce (e.g. the sweeps, when only the methods ran) are kept."""
    path = RESULTS / "bias.json"
    RESULTS.mkdir(exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    stamp = {"machine": machine()} if "methods" in payload or key != "bias" else {}
    current[key] = {**current.get(key, {}), **stamp, **payload}
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
    parser.add_argument(
        "--sweep",
        type=json.loads,
        nargs="*",
        default=[],
        help="DAMA variants (JSON objects of hparam changes)",
    )
    parser.add_argument(
        "--lsdm-sweep",
        type=json.loads,
        nargs="*",
        default=[],
        help='LSDM variants (hparam changes; "n": fitting prompts)',
    )
    parser.add_argument("--sweep-ppl-n", type=int, default=30, help="passages in sweeps")
    parser.add_argument(
        "--sweep-winobias",
        action="store_true",
        help="also score the first half of each WinoBias dev file in sweeps",
    )
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="only the papers' methods (no dama+attn, the attention-projecting variant)",
    )
    parser.add_argument(
        "--skip-methods",
        action="store_true",
        help="run only the sweeps (keep the methods already in the JSON)",
    )
    args = parser.parse_args()
    args.sweep, args.lsdm_sweep = (
        [{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()} for s in sweep]
        for sweep in (args.sweep, args.lsdm_sweep)
    )
    lm = load_model()
    t0 = time.perf_counter()
    if args.part == "bias":
        payload = part_bias(lm, args)
        if "methods" in payload:
            print_table(
                [_row(k, v) for k, v in payload["methods"].items()],
                list(_row("", payload["methods"]["none"])),
            )
    else:
        payload = part_toxicity(lm, args)
    seconds = "sweep_seconds" if args.part == "bias" and args.skip_methods else "seconds"
    payload[seconds] = time.perf_counter() - t0
    payload["model"] = lm.name
    _update(args.part, payload)


if __name__ == "__main__":
    main()
