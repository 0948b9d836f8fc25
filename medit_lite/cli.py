"""Command line: ``python -m medit_lite {edit,eval,trace,privacy} ...``.

    python -m medit_lite edit --method ft-l --prompt "{} is located in the city of" \\
        --subject "The Eiffel Tower" --target Rome
    python -m medit_lite eval --method ft-l --data counterfact_sample.json --limit 100 \\
        --json out.json
    python -m medit_lite privacy --secrets secrets.json --repeats 16 --method depn --json out.json
    python -m medit_lite trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --kind mlp --png trace.png
    python -m medit_lite train --method mend --steps 400
    python -m medit_lite bias --method dama --split dev --json bias.json
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medit_lite", description=__doc__.split("\n")[0])
    p.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error in the input"
    )
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
    v.add_argument(
        "--ge-protocol", default="greedy", choices=["greedy", "rome"],
        help="GE: greedy continuations (cheap) or ROME's top-5 sampling to --ge-tokens in all",
    )  # fmt: skip
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

    q = sub.add_parser("privacy", help="fine-tune secrets in, measure exposure, erase them")
    q.add_argument("--model", default=None, help="hub id or path (default: offline SmolLM2-135M)")
    q.add_argument("--device", default=None)
    q.add_argument("--secrets", required=True, help='JSON list of {"text": ..., "secret": ...}')
    q.add_argument("--repeats", type=int, default=16, help="copies of each secret fine-tuned in")
    q.add_argument("--method", default=None, choices=["depn"], help="erase the secrets with it")
    q.add_argument("--neurons", type=int, default=None, help="neurons DEPN deactivates (z)")
    q.add_argument(
        "--contrast", type=int, default=0,
        help="control secrets per secret whose neurons are discounted (0 = DEPN as published)",
    )  # fmt: skip
    q.add_argument("--json", default=None, help="write the results to this file")

    r = sub.add_parser("train", help="train what a method needs before editing, and cache it")
    common(r)
    r.add_argument("--data", default=None, help="zsRE training file (default: the shared sample)")
    r.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    r.add_argument("--retrain", action="store_true", help="train even when a cached copy exists")

    b = sub.add_parser("bias", help="debias (DAMA, LSDM) and measure gender bias")
    b.add_argument("--model", default=None, help="hub id or path (default: offline SmolLM2-135M)")
    b.add_argument("--device", default=None)
    b.add_argument("--method", choices=["none", "dama", "lsdm"], default="none")
    b.add_argument("--winobias", default=None, help="folder of {pro,anti}_stereotyped_type{1,2}")
    b.add_argument("--split", choices=["dev", "test"], default="dev", help="WinoBias split")
    b.add_argument("--limit", type=int, default=192, help="training prompts to fit on")
    b.add_argument("--json", default=None, help="write the results to this file")

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

    if args.command == "privacy":
        canaries = _read_secrets(args.secrets, args.repeats, args.neurons, args.contrast)

    from .models import load_model

    if args.command == "bias":
        from .applications.bias import winobias_files

        try:  # missing files: a clear error before the model loads
            winobias_files(args.winobias, args.split)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
    lm = load_model(args.model, device=args.device)
    if args.command == "bias":
        return _bias(lm, args)
    if args.command == "privacy":
        return _privacy(lm, args, canaries)
    if args.command == "trace":
        return _trace(lm, args)
    overrides = _overrides(args.hparam)
    if args.command == "edit":
        return _edit(lm, args, overrides)
    if args.command == "train":
        return _train(lm, args, overrides)
    return _eval(lm, args, overrides)


def _train(lm, args, overrides) -> int:
    """``train --method M``: run the method's registered trainer (it caches under
    $MEDIT_CACHE); ``eval`` needs no such step, as a method trains on first use."""
    import dataclasses

    from .editing import get_method, make_hparams
    from .training import TRAINERS, training_requests

    spec = get_method(args.method)
    if args.method not in TRAINERS:
        known = ", ".join(sorted(TRAINERS))
        raise SystemExit(f"method {args.method!r} trains nothing; methods that train: {known}")
    if args.steps is not None:
        fields = {f.name for f in dataclasses.fields(spec.hparams)}
        name = "train_steps" if "train_steps" in fields else "steps"
        overrides = {**overrides, name: args.steps}
    hp = make_hparams(spec, lm, None, **overrides)
    data = training_requests(args.data) if args.data else None
    log = TRAINERS[args.method](lm, hp, data=data, retrain=args.retrain)
    what = "loaded from the cache" if log.from_cache else f"trained in {log.seconds:.1f} s"
    final = f", final loss {log.losses[-1]:.4f}" if log.losses else ""
    print(f"{args.method}: {what}, {log.steps} steps{final}")
    print(f"weights: {log.path}")
    return 0


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


def _read_secrets(path: str, repeats: int, neurons: int | None, contrast: int = 0) -> list:
    """The secrets file as canaries, or SystemExit naming what is wrong (before loading
    the model)."""
    from .applications.privacy import Canary, check_secret

    if repeats < 1:
        raise SystemExit("privacy: --repeats must be at least 1")
    if neurons is not None and neurons < 1:
        raise SystemExit("privacy: --neurons must be at least 1")
    if contrast < 0:
        raise SystemExit("privacy: --contrast must be 0 or more")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        items = json.loads(raw) if raw.strip() else []
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"privacy: cannot read {path}: {exc}") from None
    if not isinstance(items, list) or not items:
        raise SystemExit(f'privacy: {path} holds no secrets (a JSON list of {{"text", "secret"}})')
    canaries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "text" not in item or "secret" not in item:
            raise SystemExit(f'privacy: entry {i} of {path} needs "text" and "secret"')
        try:
            secret = check_secret(item["text"], item["secret"])
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"privacy: entry {i} of {path}: {exc}") from None
        canaries.append(Canary(item["text"], secret, repeats))
    return canaries


def _privacy(lm, args, canaries) -> int:
    from .applications.privacy import canary_pipeline, wikibio_passages

    train, heldout = wikibio_passages()
    if not heldout:
        raise SystemExit("privacy: needs ../shared/data/hallucination_edit.json (WikiBio)")
    extra = {"contrast": args.contrast} if args.method == "depn" and args.contrast else {}
    out = canary_pipeline(
        lm, canaries, train, heldout, method=args.method, neurons=args.neurons, **extra
    )
    for i, c in enumerate(canaries):
        after = (
            ""
            if out["exposure_after"] is None
            else (
                f" -> {out['exposure_after'][i]:5.1f} bits, extracted {out['extracted_after'][i]}"
            )
        )
        print(f"{c.secret!r}: exposure {out['exposure_before'][i]:5.1f} bits, "
              f"extracted {out['extracted_before'][i]}{after}")  # fmt: skip
    print(f"held-out perplexity {out['perplexity_before']:.3f}", end="")
    if out["perplexity_after"] is not None:
        print(f" -> {out['perplexity_after']:.3f}; {len(out['neurons'])} neurons erased", end="")
    print(f" ({out['seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out | {"model": lm.name, "method": args.method}, f, indent=2)
    return 0


def _bias(lm, args) -> int:
    import time

    from .applications import bias
    from .editing import edit

    t0 = time.perf_counter()
    result = None
    if args.method != "none":
        result = edit(lm, bias.dama_requests("train", limit=args.limit), args.method)
    try:
        report = bias.bias_report(lm, winobias=bias.load_winobias(args.winobias, args.split))
    finally:
        if result is not None:
            result.restore()
    wb = report["winobias"]
    out = {
        "method": args.method,
        "model": lm.name,
        "winobias": wb,
        "a_s": report["a_s"],
        "a_f": report["a_f"],
        "perplexity": report["perplexity"],
        "seconds": time.perf_counter() - t0,
    }
    print(f"{args.method}: a_s {out['a_s']:+.4f}  a_f {out['a_f']:+.4f}  "
          f"perplexity {out['perplexity']:.2f}")  # fmt: skip
    print(f"WinoBias {args.split}: pro {wb['pro']:.3f}  anti {wb['anti']:.3f}  "
          f"gap {wb['gap']:+.3f}")  # fmt: skip
    for kind in ("type1", "type2"):
        if kind in wb:
            w = wb[kind]
            print(f"  {kind}: pro {w['pro']:.3f}  anti {w['anti']:.3f}  gap {w['gap']:+.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
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
        generation_protocol=args.ge_protocol,
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


#: What bad input raises: reported as one ``error: ...`` line with exit status 2.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError)


def run(argv: list[str] | None = None) -> int:
    """The terminal entry point: :func:`main`, with bad input reported as one line
    ``error: ...`` on stderr and exit status 2 instead of a traceback (``--debug``
    shows the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        message = exc.code
    except INPUT_ERRORS as exc:
        if "--debug" in argv:
            raise
        message = str(exc)
    if not message.startswith("error: "):
        message = "error: " + message
    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run())
