"""Command line: ``python -m medit_lite {edit,eval,trace} ...``.

    python -m medit_lite edit --method ft-l --prompt "{} is located in the city of" \\
        --subject "The Eiffel Tower" --target Rome
    python -m medit_lite eval --method ft-l --data counterfact_sample.json --limit 100 \\
        --json out.json
    python -m medit_lite trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --kind mlp --png trace.png
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medit_lite", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument(
            "--model", default=None, help="hub id or path (default: offline SmolLM2-135M)"
        )
        sp.add_argument("--device", default=None)
        sp.add_argument("--method", default="ft-l", help="editing method (see `methods`)")
        sp.add_argument(
            "--hparam",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="override one hyperparameter, e.g. --hparam lr=1e-3 (repeatable)",
        )

    e = sub.add_parser("edit", help="edit one fact and print completions before and after")
    common(e)
    e.add_argument("--prompt", required=True, help='template with "{}" for the subject')
    e.add_argument("--subject", required=True)
    e.add_argument("--target", required=True, help="the new object")
    e.add_argument("--max-new-tokens", type=int, default=12)
    e.add_argument("--also", action="append", default=[], help="extra prompt to show before/after")

    v = sub.add_parser("eval", help="edit, measure and restore each request of a dataset")
    common(v)
    v.add_argument("--data", default=None, help="JSON file or dataset id (default: built-in facts)")
    v.add_argument("--format", choices=["counterfact", "zsre", "easyedit"], default=None)
    v.add_argument("--limit", type=int, default=None)
    v.add_argument(
        "--sequential",
        action="store_true",
        help="lifelong stream: apply the edits in order, measuring SR/GR/ER/locality as it goes",
    )
    v.add_argument("--every", type=int, default=10, help="--sequential: checkpoint every N edits")
    v.add_argument("--ge-tokens", type=int, default=0, help="tokens generated for GE (0: skip)")
    v.add_argument("--json", default=None, help="write the results to this file")

    t = sub.add_parser("trace", help="causal trace of one fact: where is it recalled?")
    t.add_argument("--model", default=None, help="hub id or path (default: offline SmolLM2-135M)")
    t.add_argument("--device", default=None)
    t.add_argument("--prompt", required=True, help='the prompt (or a template with "{}")')
    t.add_argument("--subject", required=True, help="the subject, whose tokens are corrupted")
    t.add_argument("--kind", action="append", choices=["layer", "mlp", "attn"], default=None)
    t.add_argument("--samples", type=int, default=10, help="noise samples per cell")
    t.add_argument("--window", type=int, default=10, help="layers restored together (mlp/attn)")
    t.add_argument("--png", default=None, help="save the heatmap(s) to this file")

    sub.add_parser("methods", help="list the editing methods")
    return p


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--hparam expects NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        try:
            out[name] = json.loads(value.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            try:  # "nan", "inf", "1e-3" with a sign json rejects: a number, checked later
                out[name] = float(value)
            except ValueError:
                out[name] = value
        if isinstance(out[name], list):
            out[name] = tuple(out[name])
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .editing import METHODS, get_method

    if args.command == "methods":
        get_method("ft")
        for name, m in sorted(METHODS.items()):
            print(f"{name:10s} {m.doc.splitlines()[0] if m.doc else ''}")
        return 0

    from .models import load_model

    lm = load_model(args.model, device=args.device)
    if args.command == "trace":
        return _trace(lm, args)
    overrides = _overrides(args.hparam)
    if args.command == "edit":
        return _edit(lm, args, overrides)
    return _eval(lm, args, overrides)


def _edit(lm, args, overrides) -> int:
    from .editing import edit
    from .requests import EditRequest

    request = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target)
    prompts = [request.text, *args.also]
    before = lm.generate(prompts, args.max_new_tokens)
    result = edit(lm, request, args.method, **overrides)
    after = lm.generate(prompts, args.max_new_tokens)
    for prompt, b, a in zip(prompts, before, after):
        print(prompt)
        print(f"  before: {b!r}")
        print(f"  after:  {a!r}")
    print(
        f"{args.method}: {result.seconds:.2f} s, changed {', '.join(result.changed) or 'nothing'}"
    )
    return 0


def _trace(lm, args) -> int:
    from .analysis import trace

    kinds = tuple(args.kind or ["layer", "mlp", "attn"])
    results = trace(
        lm, args.prompt, args.subject, kinds=kinds, samples=args.samples, window=args.window
    )
    first = results[kinds[0]]
    print(f"{first.prompt!r} -> {first.answer!r}: p clean {first.clean:.3f}, "
          f"corrupted {first.corrupted:.3f}")  # fmt: skip
    for kind, res in results.items():
        token, layer = res.argmax()
        print(
            f"{kind:5s} largest indirect effect {float(res.indirect_effect.max()):+.3f} "
            f"at token {token} {res.tokens[token]!r}, layer {layer}"
        )
    if args.png:
        from .plots import trace_heatmaps

        trace_heatmaps(list(results.values())).savefig(args.png, dpi=120, bbox_inches="tight")
        print(f"wrote {args.png}")
    return 0


def _eval(lm, args, overrides) -> int:
    from .evaluate import evaluate, format_table
    from .requests import builtin_requests, load_requests

    if args.data is None:
        requests = builtin_requests()[: args.limit]
    else:
        requests = load_requests(args.data, args.format, args.limit)
    result = evaluate(
        lm,
        requests,
        args.method,
        sequential=args.sequential,
        generation_tokens=args.ge_tokens,
        every=args.every,
        **overrides,
    )
    print(format_table([result]))
    if "lifelong" in result:
        from .lifelong import format_curve

        print(format_curve(result["lifelong"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {k: v for k, v in result.items() if k != "rows"} | {"model": lm.name}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
