"""CounterFact evaluation of the unedited model and each method (edit, measure, restore).

.venv/bin/python benchmarks/eval_counterfact.py --methods none ft ft-l --limit 100
"""

from __future__ import annotations

import argparse

from common import counterfact_sample, save

from medit_lite import load_model
from medit_lite.evaluate import evaluate, format_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["none", "ft", "ft-l"])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--ge-tokens", type=int, default=40)
    parser.add_argument("--name", default="eval_counterfact")
    args = parser.parse_args()
    requests = counterfact_sample(args.limit)
    lm = load_model()
    results = []
    for method in args.methods:
        results.append(
            evaluate(lm, requests, method, generation_tokens=args.ge_tokens, check_restore=True)
        )
        print(format_table(results[-1:]), flush=True)
    print()
    print(format_table(results))
    save(
        args.name,
        {
            "limit": args.limit,
            "model": lm.name,
            "results": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        },
    )


if __name__ == "__main__":
    main()
