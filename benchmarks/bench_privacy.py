"""Privacy benchmark: memorisation and extraction on real text, and the canary pipeline
(fine-tune, detect, erase) with DEPN, its z sweep and the random-neuron control.

    MEDIT_QUIET=1 python benchmarks/bench_privacy.py            # -> results/privacy.json
    python benchmarks/bench_privacy.py --model gpt2-xl           # any model, on a GPU

Timings are wall-clock seconds on the machine that ran it (see ``machine`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save  # noqa: E402

from medit_lite import builtin_requests, load_model  # noqa: E402
from medit_lite.applications import privacy as pv  # noqa: E402
from medit_lite.methods import depn  # noqa: E402


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def memorisation(lm, args) -> dict:
    licences = pv.licence_texts()
    if not licences:
        return {"skipped": "no /usr/share/common-licenses on this machine"}
    controls = pv.shuffled_controls(licences)
    out = {"texts": sorted(licences), "by_prefix": []}
    for k in args.prefixes:
        row = {"prefix_tokens": k}
        for name, texts in (("licences", licences), ("controls", controls)):
            m = pv.discoverable_memorization(lm, texts, k, args.suffix, windows=args.windows)
            row[name] = {key: m[key] for key in ("windows", "exact", "matched", "accuracy")}
        out["by_prefix"].append(row)
        print(f"memorisation k={k}: licences {row['licences']}, controls {row['controls']}")
    return out


def extraction(lm, args, reference: dict) -> dict:
    index = pv.NgramIndex(lm, reference, n=8)
    train, _ = pv.wikibio_passages(args.passages, 100)
    short = [" ".join(t.split()[8:13]) for t in train[: args.prompts]]  # 5 words of text
    t0 = time.perf_counter()
    runs = {
        "empty prompt": pv.sample_generations(lm, [""], args.samples * 4, args.gen_tokens),
        "short prompts": pv.sample_generations(lm, short, args.samples, args.gen_tokens),
        "divergence": pv.sample_generations(
            lm, [pv.divergence_prompt(lm)], args.samples * 2, args.gen_tokens * 2
        ),
    }
    out = {"reference_tokens": len(index.tokens), "n": args.min_match, "runs": {}}
    for name, gens in runs.items():
        longest = [index.longest_match(g["ids"]) for g in gens]
        out["runs"][name] = {
            "generations": len(gens),
            "tokens": sum(len(g["ids"]) for g in gens),
            "rate": _mean(x >= args.min_match for x in longest),
            "longest": max(longest),
            "mean_longest": _mean(longest),
            "example": gens[max(range(len(gens)), key=longest.__getitem__)]["text"][:300],
        }
        print(f"extraction {name}: {out['runs'][name]}")
    out["seconds"] = time.perf_counter() - t0
    return out


def facts(lm) -> list[dict]:
    reqs = builtin_requests()[:4]
    return [
        {"prompt": r.text, "answer": a}
        for r, a in zip(reqs, lm.generate([r.text for r in reqs], 4))
    ]


def pipeline(lm, args, seed: int, sweep: bool, extra: dict | None = None) -> dict:
    canaries = pv.make_canaries(per_repeat=args.per_repeat, repeats=(1, 4, 16), seed=seed)
    never = pv.make_canaries(per_repeat=args.per_repeat, repeats=(0,), seed=seed + 1000)
    train, heldout = pv.wikibio_passages(args.passages, 100)
    training = pv.CanaryTraining()
    reqs = [depn.secret_request(c.text, c.secret) for c in canaries]
    res: dict = {"seed": seed, "training": training.__dict__, "passages": len(train)}
    res["heldout_passages"] = len(heldout)
    res["repeats"] = [c.repeats for c in canaries]
    res["exposure_base"] = pv.exposures(lm, canaries)
    res["perplexity_base"] = pv.perplexity(lm, heldout, max_length=training.max_tokens)
    res["facts_base"] = facts(lm)
    with pv.inserted_canaries(lm, canaries, train, training, cache=not args.no_cache) as ft:
        res["finetune"] = {"seconds": ft.seconds, "cached": ft.cached, "losses": ft.losses}
        res["finetune"]["params"] = len(ft.params)
        res["exposure_before"] = pv.exposures(lm, canaries)
        res["exposure_never"] = pv.exposures(lm, never)
        res["extracted_before"] = pv.extraction_rate(lm, canaries)
        res["perplexity_before"] = pv.perplexity(lm, heldout, max_length=training.max_tokens)
        res["facts_before"] = facts(lm)
        # a probability-order rank where it is cheap (the well-memorised secrets)
        res["probability_rank"] = [
            pv.probability_rank(lm, c.text, c.secret, max_nodes=args.rank_nodes)
            if c.repeats == 16
            else None  # fmt: skip
            for c in canaries
        ]
        layers = tuple(range(lm.n_layers - training.layers, lm.n_layers))
        hp = depn.DEPNHParams(layers=layers)
        t0 = time.perf_counter()
        scores = depn.attribute(lm, reqs, hp)
        res["detect_seconds"] = time.perf_counter() - t0
        controls = {0: []}
        for k in (c for c in args.contrasts if c):  # the project's contrast variant
            t0 = time.perf_counter()
            controls[k] = depn.attribute(lm, depn.control_requests(reqs, k, hp.seed), hp)
            res[f"detect_seconds_contrast{k}"] = time.perf_counter() - t0
        res["depn_layers"] = list(layers)
        zs = args.z if sweep else args.unseen_z
        res["sweep"] = []
        done: dict = {}  # neuron set -> its measured row (a larger z may add no neuron)
        settings = [(c, t, z) for c in args.contrasts for t in args.thresholds for z in zs]
        if extra and (extra["contrast"], extra["threshold"], extra["z"]) not in settings:
            settings.append((extra["contrast"], extra["threshold"], extra["z"]))
        for contrast, threshold, z in settings:
            hp_z = depn.DEPNHParams(neurons=z, threshold=threshold, contrast=contrast)
            chosen = depn.aggregate(scores, list(layers), hp_z, controls[contrast])
            for kind, neurons in (
                ("depn", chosen),
                ("random", depn.random_neurons(lm, chosen, 42)),
            ):
                key = (kind, tuple(map(tuple, neurons)))
                row = {"z": z, "threshold": threshold, "contrast": contrast, "kind": kind}
                row["neurons"] = [list(n) for n in neurons]
                row["count"] = len(neurons)
                if key in done:
                    row |= {k: v for k, v in done[key].items() if k not in row}
                    row["same_as"] = {k: done[key][k] for k in ("z", "threshold", "contrast")}
                else:
                    row |= erased_measures(lm, neurons, canaries, heldout, training)
                    if (z, threshold, contrast) == (args.default_z, args.default_threshold, 0):
                        with depn.erased(lm, neurons):
                            row["facts"] = facts(lm)
                    done[key] = row
                res["sweep"].append(row)
                print(_summary_row(res, row), flush=True)
    return res


def erased_measures(lm, neurons, canaries, heldout, training) -> dict:
    """Exposure, extraction and held-out perplexity with ``neurons`` deactivated."""
    t0 = time.perf_counter()
    with depn.erased(lm, neurons):
        row = {"erase_seconds": time.perf_counter() - t0}
        row["exposure"] = pv.exposures(lm, canaries)
        row["extracted"] = pv.extraction_rate(lm, canaries)
        row["perplexity"] = pv.perplexity(lm, heldout, max_length=training.max_tokens)
    return row


def _by(res, values, repeats):
    return _mean(v for v, r in zip(values, res["repeats"]) if r == repeats)


def _summary_row(res, row) -> dict:
    return {
        "z": row["z"],
        "threshold": row.get("threshold", 0.1),
        "contrast": row.get("contrast", 0),
        "kind": row["kind"],
        "count": row["count"],
        "exposure16": round(_by(res, row["exposure"], 16), 2),
        "extraction16": _by(res, [float(x) for x in row["extracted"]], 16),
        "perplexity": round(row["perplexity"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prefixes", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--min-match", type=int, default=32)
    p.add_argument("--per-repeat", type=int, default=4)
    p.add_argument("--passages", type=int, default=48)
    p.add_argument("--z", type=int, nargs="+", default=[5, 10, 20, 30, 50, 100])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.05])
    p.add_argument(
        "--contrasts",
        type=int,
        nargs="+",
        default=[0, 1],
        help="control secrets per secret (0 = DEPN as published; k > 0 the contrast variant)",
    )
    p.add_argument("--default-z", type=int, default=depn.DEPNHParams().neurons)
    p.add_argument("--default-threshold", type=float, default=depn.DEPNHParams().threshold)
    p.add_argument("--unseen-seed", type=int, default=1)
    p.add_argument("--rank-nodes", type=int, default=300)
    p.add_argument("--unseen-z", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["memorisation", "extraction", "canaries", "unseen"],
        help="what to run; the other parts are kept from the existing results/privacy.json",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    path = Path(__file__).resolve().parent / "results" / "privacy.json"
    out: dict = json.loads(path.read_text()) if path.exists() else {}
    out.pop("machine", None)
    out["model"], out["args"] = lm.name, vars(args)
    if "memorisation" in args.parts:
        t0 = time.perf_counter()
        out["memorisation"] = memorisation(lm, args)
        out["memorisation_seconds"] = time.perf_counter() - t0
    if "extraction" in args.parts:
        train, heldout = pv.wikibio_passages(args.passages, 100)
        reference = dict(pv.licence_texts()) | {
            f"wikibio {i}": t for i, t in enumerate(train + heldout)
        }
        out["extraction"] = extraction(lm, args, reference)
    for name, seed in (("canaries", 0), ("unseen", args.unseen_seed)):
        if name in args.parts:
            t0 = time.perf_counter()
            extra = out.get("chosen_setting") if name == "unseen" else None
            out[name] = pipeline(lm, args, seed=seed, sweep=name == "canaries", extra=extra)
            out[name]["seconds"] = time.perf_counter() - t0
        if name == "canaries" and name in out:  # chosen here, applied unchanged to "unseen"
            cb = out["canaries"]
            out["chosen_setting"] = pv.choose_setting(
                cb["sweep"], cb["repeats"], cb["perplexity_before"]
            )
            print("operating point chosen on the development canaries:", out["chosen_setting"])
    for name in ("canaries", "unseen"):
        print(f"\n{name}:")
        print_table([_summary_row(out[name], r) for r in out[name]["sweep"]],
                    ["z", "threshold", "contrast", "kind", "count", "exposure16", "extraction16",
                     "perplexity"])  # fmt: skip
    save("privacy", out)


if __name__ == "__main__":
    main()
