"""Knowledge neurons (Dai et al., 2022, §4.2): suppress and amplify a fact's refined
neurons, against as many random neurons, over known facts.

Facts: ROME's known_1000 records, each asked with its relation's ParaRel templates (from
known_1000 and CounterFact, :func:`medit_lite.methods.kn.relation_templates`); a fact
counts when the model's top next token is the answer's first token for at least 3 of its
prompts (:func:`~medit_lite.methods.kn.fact_bags`, at most 5 prompts a fact). For each fact:
integrated gradients on every prompt (all layers, 20 steps), refinement (t = 0.2, p = 0.7
adaptive, at least 3 prompts), then P(answer's first token) on every prompt of the fact
with the neurons zeroed or doubled at the last position, against (a) as many neurons drawn
uniformly from all layers and (b) as many drawn from the same layers (3 draws each), and
(c) the fact's neurons applied to another fact's prompts (the paper's "other" control).

    MEDIT_QUIET=1 .venv/bin/python benchmarks/bench_kn.py --facts 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

from common import print_table, save

from medit_lite import load_model, shared_data
from medit_lite.analysis.attribution import neuron_attributions
from medit_lite.methods.kn import (
    KNHParams,
    answer_probabilities,
    fact_bags,
    first_token_text,
    refine,
    relation_templates,
)


def _load(name: str):
    path = shared_data(name)
    if path is None:
        raise SystemExit(f"needs ../shared/data/{name} beside the repository")
    return json.loads(path.read_text())


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def run_fact(lm, bag: dict, other: dict, hp: KNHParams, rng: random.Random) -> dict:
    prompts, answer = bag["prompts"], bag["attribute"]
    token = first_token_text(lm, prompts[0], answer)
    t0 = time.perf_counter()
    scores = neuron_attributions(lm, prompts, [token] * len(prompts), steps=hp.steps)
    seconds = time.perf_counter() - t0
    neurons = refine(lm, prompts, token, hp, scores=scores)
    row = {
        "subject": bag["subject"],
        "answer": answer,
        "relation": bag["relation_id"],
        "n_prompts": len(prompts),
        "neurons": [list(n) for n in neurons],
        "attribution_seconds": seconds,
    }
    if not neurons:
        return row
    answers = [answer] * len(prompts)
    base = answer_probabilities(lm, prompts, answers)
    k = len(neurons)
    controls = {
        "random": lambda: [(rng.randrange(lm.n_layers), rng.randrange(lm.d_mlp)) for _ in range(k)],
        "random_same_layers": lambda: [(layer, rng.randrange(lm.d_mlp)) for layer, _ in neurons],
    }
    row["p"] = float(base.mean())
    for name, factor in (("suppress", 0.0), ("amplify", 2.0)):
        own = answer_probabilities(lm, prompts, answers, [neurons] * len(prompts), factor)
        row[f"{name}_delta"] = float((own - base).mean())
        row[f"{name}_ratio"] = float(((own - base) / base).mean())
        for cname, draw in controls.items():
            deltas, ratios = [], []
            for _ in range(3):
                ns = draw()
                p = answer_probabilities(lm, prompts, answers, [ns] * len(prompts), factor)
                deltas.append(float((p - base).mean()))
                ratios.append(float(((p - base) / base).mean()))
            row[f"{name}_{cname}_delta"] = statistics.fmean(deltas)
            row[f"{name}_{cname}_ratio"] = statistics.fmean(ratios)
        o_prompts, o_answers = other["prompts"], [other["attribute"]] * len(other["prompts"])
        o_base = answer_probabilities(lm, o_prompts, o_answers)
        o = answer_probabilities(lm, o_prompts, o_answers, [neurons] * len(o_prompts), factor)
        row[f"{name}_other_fact_delta"] = float((o - o_base).mean())
        row[f"{name}_other_fact_ratio"] = float(((o - o_base) / o_base).mean())
    return row


KEYS = [
    f"{op}_{what}_{kind}"
    for op in ("suppress", "amplify")
    for what in ("", "random_", "random_same_layers_", "other_fact_")
    for kind in ("delta", "ratio")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=60, help="facts with neurons to use")
    parser.add_argument("--max-prompts", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lm = load_model()
    hp = KNHParams()
    known, cf = _load("known_1000.json"), _load("counterfact_sample.json")
    templates = relation_templates(known, cf)
    t0 = time.perf_counter()
    # stop the scan once there are enough candidates (some facts refine to no neuron)
    limit = int(args.facts * 1.3) + 2
    bags = fact_bags(lm, known, templates, max_prompts=args.max_prompts, limit=limit)
    print(f"{len(bags)} known facts with >= 3 prompts ({time.perf_counter() - t0:.0f} s)")
    rng = random.Random(args.seed)
    rows, with_neurons = [], 0
    for i, bag in enumerate(bags):
        if with_neurons >= args.facts:
            break
        other = bags[(i + len(bags) // 2) % len(bags)]
        row = run_fact(lm, bag, other, hp, rng)
        rows.append(row)
        with_neurons += bool(row["neurons"])
        print(f"{i:3d} {bag['subject'][:30]:30s} {len(row['neurons'])} neurons", flush=True)
        if len(rows) % 5 == 0:  # partial results survive an interrupted run
            _save(lm, hp, rows, bags, partial=True)
    _save(lm, hp, rows, bags, partial=False)


def _save(lm, hp, rows, bags, partial: bool) -> None:
    used = [r for r in rows if r["neurons"]]
    keys = [k.replace("__", "_") for k in KEYS]
    summary = {k: _mean([r[k] for r in used]) for k in keys}
    summary["p"] = _mean([r["p"] for r in used])
    drop, rand_drop = summary["suppress_delta"], summary["suppress_random_delta"]
    ok = drop is not None and rand_drop is not None and rand_drop < 0
    summary["suppress_vs_random"] = drop / rand_drop if ok else None
    payload = {
        "partial": partial,
        "n_facts": len(used),
        "n_facts_without_neurons": len(rows) - len(used),
        "n_candidate_facts": len(bags),
        "mean_neurons": _mean([len(r["neurons"]) for r in used]),
        "layer_histogram": _histogram(used, lm.n_layers),
        "hparams": dataclasses.asdict(hp),
        "summary": summary,
        "rows": rows,
    }
    if not partial and used:
        table = [
            {
                "op": op,
                "own": f"{summary[f'{op}_delta']:+.4f} ({summary[f'{op}_ratio']:+.1%})",
                "random": f"{summary[f'{op}_random_delta']:+.4f}",
                "random same layers": f"{summary[f'{op}_random_same_layers_delta']:+.4f}",
                "other fact": f"{summary[f'{op}_other_fact_delta']:+.4f}",
            }
            for op in ("suppress", "amplify")
        ]
        print_table(table, ["op", "own", "random", "random same layers", "other fact"])
        print(f"suppression drop / random drop: {summary['suppress_vs_random']}")
    save("knowledge_neurons", payload)


def _histogram(rows, n_layers):
    counts = [0] * n_layers
    for r in rows:
        for layer, _ in r["neurons"]:
            counts[layer] += 1
    return counts


if __name__ == "__main__":
    main()
