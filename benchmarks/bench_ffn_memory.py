"""FFN layers as key-value memories (Geva et al., 2021) on the default model: trigger
prefixes, value projections, key-value agreement and the shallow-to-semantic pattern, per
layer (:func:`medit_lite.analysis.ffn_memory.ffn_memory`), written for chapter 2.2.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/bench_ffn_memory.py --texts 300
"""

from __future__ import annotations

import argparse
import time

from common import print_table, save

from medit_lite import load_model
from medit_lite.analysis.ffn_memory import corpus, ffn_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--keys", type=int, default=256, help="keys per layer for agreement")
    parser.add_argument("--removal-keys", type=int, default=8)
    args = parser.parse_args()
    lm = load_model()
    texts, source = corpus(args.texts)
    t0 = time.perf_counter()
    report = ffn_memory(lm, texts, keys_per_layer=args.keys, removal_keys=args.removal_keys)
    seconds = time.perf_counter() - t0
    report.corpus = source
    rows = [
        {
            "layer": layer,
            "agree": f"{report.agreement[layer]:.3f}",
            "agree@10": f"{report.agreement_top10[layer]:.3f}",
            "chance": f"{report.agreement_random[layer]:.3f}",
            "left -last": f"{report.keep_without_last[layer]:.2f}",
            "left -first": f"{report.keep_without_first[layer]:.2f}",
        }
        for layer in report.layers
    ]
    print_table(rows, list(rows[0]))
    save("ffn_memory", {"seconds": seconds, "report": report.to_dict()})


if __name__ == "__main__":
    main()
