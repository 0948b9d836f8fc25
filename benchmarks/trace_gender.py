"""Where the default model carries gender bias: causal tracing of P(he) − P(she) (chapter 5.2).

LSDM's first half (Cai et al., 2024): for profession prompts "The {profession} said that"
(the 101 test professions of DAMA plus training professions up to ``--professions``), the
profession's tokens are corrupted with noise and single states are restored; the
indirect effect is measured on the gender signal P(he) − P(she), sign-aligned per prompt
(a female-leaning profession counts with its sign flipped, so the effects add up). The
average over professions at the profession's last token and the prompt's last token,
per layer, for MLP and attention outputs (window 10) and the residual stream, goes to
``results/bias_trace.json``; the page plots it.

    MEDIT_QUIET=1 .venv/bin/python benchmarks/trace_gender.py [--professions 100]
"""

from __future__ import annotations

import argparse
import time

from common import save

from medit_lite import load_model
from medit_lite.analysis import average_trace
from medit_lite.applications import bias


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--professions", type=int, default=100)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--layer-step", type=int, default=2)
    parser.add_argument("--template", default="said that")
    args = parser.parse_args()
    lm = load_model()
    records = bias.load_dama_prompts("test") + bias.load_dama_prompts("train")
    chosen, seen = [], set()
    for r in records:
        if r["prompt"].endswith(args.template) and r["profession"] not in seen:
            seen.add(r["profession"])
            chosen.append(
                {"prompt": r["prompt"], "subject": r["subject"], "profession": r["profession"]}
            )
    chosen = chosen[: args.professions]
    t0 = time.perf_counter()
    avg = average_trace(
        lm,
        chosen,
        kinds=("layer", "mlp", "attn"),
        samples=args.samples,
        window=args.window,
        layers=range(0, lm.n_layers, args.layer_step),
        contrast=("he", "she"),
        align_sign=True,
    )
    seconds = time.perf_counter() - t0
    payload = avg.to_dict() | {
        "model": lm.name,
        "quantity": "sign-aligned P(he) - P(she)",
        "template": args.template,
        "professions": [c["profession"] for c in chosen],
        "seconds": seconds,
        "per_profession": {k: avg.effects[k].tolist() for k in avg.effects},
    }
    for kind in avg.effects:
        mean = avg.mean(kind)
        for i, pos in enumerate(avg.positions):
            layer = avg.layers[int(mean[i].argmax())]
            print(f"{kind:5s} {pos:12s} peak AIE {float(mean[i].max()):.4f} at layer {layer}")
    print(f"{seconds:.0f} s for {len(chosen)} professions")
    save("bias_trace", payload)


if __name__ == "__main__":
    main()
