"""Speed and memory of chapter 4's tools on the default model.

Seconds per ROME edit with the key statistics cached and uncached, the statistics of one
layer, a causal trace of one fact (all tokens × layers, three kinds), MEMIT on a batch of
edits, and the peak memory of each.

    .venv/bin/python benchmarks/bench_rome.py [--edits 5] [--memit 100] [--n-stats 20000]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from common import print_table, save, summary

from medit_lite import (
    builtin_requests,
    edit,
    load_counterfact,
    load_model,
    shared_data,
    weights_fingerprint,
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mib(n_bytes: int | None) -> float | None:
    """Mebibytes, or None where the edit did not measure memory (the CPU, unprofiled)."""
    return None if n_bytes is None else n_bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=5, help="ROME edits timed (cached stats)")
    parser.add_argument("--memit", type=int, default=100, help="MEMIT batch size")
    parser.add_argument("--n-stats", type=int, default=20_000, help="key vectors in C")
    parser.add_argument("--trace-samples", type=int, default=10)
    args = parser.parse_args()

    from medit_lite.analysis import trace
    from medit_lite.methods.rome import ROMEHParams
    from medit_lite.stats import second_moment

    lm = load_model()
    facts = builtin_requests()
    before = weights_fingerprint(lm)
    layer = ROMEHParams.for_model(lm).layers[0]
    rows, payload = [], {"model": lm.name, "layer": layer, "n_stats": args.n_stats,
                         "load_average_start": os.getloadavg()}  # fmt: skip

    def row(what, seconds, n=1, memory=None):
        s = summary(seconds if isinstance(seconds, list) else [seconds])
        rows.append({"what": what, "median s": f"{s['median']:.2f}", "min s": f"{s['min']:.2f}",
                     "max s": f"{s['max']:.2f}", "n": n,
                     "peak growth MiB": "" if memory is None else f"{memory:.0f}"})  # fmt: skip
        return s

    # statistics of one layer and an edit that has to compute them, in an empty cache
    old_cache = os.environ.get("MEDIT_CACHE")
    with tempfile.TemporaryDirectory() as fresh:
        # keep the model's sampled-text cache out of the measurement: only C is fresh
        os.environ["MEDIT_CACHE"] = fresh
        t0 = time.perf_counter()
        stats = second_moment(lm, layer, n_tokens=args.n_stats)
        payload["stats_one_layer_s"] = row(f"C of layer {layer} ({args.n_stats} keys)",
                                           time.perf_counter() - t0)  # fmt: skip
        payload["stats_seconds_reported"] = stats.seconds
        os.environ["MEDIT_CACHE"] = os.path.join(fresh, "second")
        t0 = time.perf_counter()
        with edit(lm, facts[0], "rome", mom2_n_samples=args.n_stats) as res:
            mem = _mib(res.peak_memory_bytes)
        payload["rome_uncached_s"] = row("ROME edit, C not cached", time.perf_counter() - t0,
                                         memory=mem)  # fmt: skip
    if old_cache is None:
        os.environ.pop("MEDIT_CACHE", None)
    else:
        os.environ["MEDIT_CACHE"] = old_cache

    # ROME with cached statistics
    second_moment(lm, layer, n_tokens=args.n_stats)  # make sure the cache holds it
    seconds, memory, steps = [], [], []
    for request in facts[1 : 1 + args.edits]:
        t0 = time.perf_counter()
        with edit(lm, request, "rome", mom2_n_samples=args.n_stats) as res:
            memory.append(_mib(res.peak_memory_bytes))
            steps.append(res.info[0]["steps"])
        seconds.append(time.perf_counter() - t0)
    peak = max((m for m in memory if m is not None), default=None)
    payload["rome_cached_s"] = row("ROME edit, C cached (incl. restore)", seconds,
                                   len(seconds), peak)  # fmt: skip
    payload["rome_steps"] = steps

    # causal trace of one fact, three kinds
    t0 = time.perf_counter()
    res = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                samples=args.trace_samples, show_progress=False)  # fmt: skip
    payload["trace_3_kinds_s"] = row(
        f"causal trace, 3 kinds × {len(res['layer'].positions)} tokens × {lm.n_layers} "
        f"layers × {args.trace_samples} samples",
        time.perf_counter() - t0,
        memory=peak_rss_mib(),
    )

    # MEMIT on a batch
    if args.memit:
        path = shared_data("counterfact_sample.json")
        reqs = load_counterfact(path, limit=args.memit) if path else facts[: args.memit]
        t0 = time.perf_counter()
        with edit(lm, reqs, "memit", mom2_n_samples=args.n_stats) as res:
            mem = _mib(res.peak_memory_bytes)
            payload["memit_info"] = {
                k: v for k, v in res.info[0].items() if k not in ("p_target", "targets")
            }
        payload["memit_batch_s"] = row(f"MEMIT, {len(reqs)} edits in one batch",
                                       time.perf_counter() - t0, memory=mem)  # fmt: skip
        payload["memit_batch_n"] = len(reqs)
    assert weights_fingerprint(lm) == before
    payload["peak_rss_mib"] = peak_rss_mib()
    payload["load_average_end"] = os.getloadavg()  # other processes sharing the CPU
    print_table(rows, ["what", "median s", "min s", "max s", "n", "peak growth MiB"])
    print(f"peak resident memory of the process: {payload['peak_rss_mib']:.0f} MiB")
    print("peak growth: how far a step raised the process's peak (0: it fit in memory in use)")
    save("rome", payload)


if __name__ == "__main__":
    main()
