"""Privacy benchmark: memorisation and extraction on real text, and the canary pipeline
(fine-tune, detect, erase) with DEPN, its z sweep and the random-neuron control.

    MEDIT_QUIET=1 python benchmarks/bench_privacy.py            # -> results/privacy.json
    python benchmarks/bench_privacy.py --model gpt2-xl           # any model, on a GPU

Timings are wall-clock seconds on the machine that ran it (see ``machine`` in the JSON).
"""

from __future__ import annotations

import argparse
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


def pipeline(lm, args, seed: int, sweep: bool) -> dict:
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
        res["depn_layers"] = list(layers)
        zs = args.z if sweep else args.unseen_z
        res["sweep"] = []
        for z in zs:
            chosen = depn.aggregate(scores, list(layers), depn.DEPNHParams(neurons=z))
            for kind, neurons in (
                ("depn", chosen),
                ("random", depn.random_neurons(lm, chosen, 42)),
            ):
                t0 = time.perf_counter()
                with depn.erased(lm, neurons):
                    row = {"z": z, "kind": kind, "neurons": [list(n) for n in neurons]}
                    row["count"] = len(neurons)
                    row["erase_seconds"] = time.perf_counter() - t0
                    row["exposure"] = pv.exposures(lm, canaries)
                    row["extracted"] = pv.extraction_rate(lm, canaries)
                    row["perplexity"] = pv.perplexity(lm, heldout, max_length=training.max_tokens)
                    if z == args.default_z:
                        row["facts"] = facts(lm)
                res["sweep"].append(row)
                print(_summary_row(res, row))
    return res


def _by(res, values, repeats):
    return _mean(v for v, r in zip(values, res["repeats"]) if r == repeats)


def _summary_row(res, row) -> dict:
    return {
        "z": row["z"],
        "kind": row["kind"],
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
    p.add_argument("--z", type=int, nargs="+", default=[5, 20, 50, 100])
    p.add_argument("--default-z", type=int, default=depn.DEPNHParams().neurons)
    p.add_argument("--unseen-seed", type=int, default=1)
    p.add_argument("--rank-nodes", type=int, default=300)
    p.add_argument("--unseen-z", type=int, nargs="+", default=[20, 50])
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    out: dict = {"model": lm.name, "args": vars(args)}
    t0 = time.perf_counter()
    out["memorisation"] = memorisation(lm, args)
    out["memorisation_seconds"] = time.perf_counter() - t0
    train, heldout = pv.wikibio_passages(args.passages, 100)
    reference = dict(pv.licence_texts()) | {
        f"wikibio {i}": t for i, t in enumerate(train + heldout)
    }
    out["extraction"] = extraction(lm, args, reference)
    t0 = time.perf_counter()
    out["canaries"] = pipeline(lm, args, seed=0, sweep=True)
    out["canaries"]["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["unseen"] = pipeline(lm, args, seed=args.unseen_seed, sweep=False)
    out["unseen"]["seconds"] = time.perf_counter() - t0
    for name in ("canaries", "unseen"):
        print(f"\n{name}:")
        print_table([_summary_row(out[name], r) for r in out[name]["sweep"]],
                    ["z", "kind", "exposure16", "extraction16", "perplexity"])  # fmt: skip
    save("privacy", out)


if __name__ == "__main__":
    main()
