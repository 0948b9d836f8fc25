"""Model load times (cold: GGUF conversion; warm: cached safetensors) and seconds per
FT / FT-L edit on the built-in facts, with the peak memory of each edit.

    .venv/bin/python benchmarks/bench_foundation.py [--edits 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import print_table, save, summary

LOAD = (
    "import time; t = time.perf_counter(); from medit_lite import load_model; "
    "load_model(); print(time.perf_counter() - t)"
)


def load_seconds(cache: str | None) -> float:
    env = {**os.environ, "MEDIT_QUIET": "1"}
    if cache:
        env["MEDIT_CACHE"] = cache
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True)
    out.check_returncode()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as fresh:
        cold = load_seconds(fresh)  # converts the GGUF file into this empty cache
        warm = [load_seconds(fresh) for _ in range(3)]

    from medit_lite import builtin_requests, edit, load_model, weights_fingerprint

    lm = load_model()
    facts = builtin_requests()[: args.edits]
    before = weights_fingerprint(lm)
    rows, payload = [], {"load_cold_s": cold, "load_warm_s": summary(warm)}
    for method in ("ft", "ft-l"):
        seconds = []
        for request in facts:
            start = time.perf_counter()
            with edit(lm, request, method, measure_memory=False):
                pass
            seconds.append(time.perf_counter() - start)
        # the memory of one more edit, measured apart (on the CPU under the profiler)
        with edit(lm, facts[0], method, measure_memory=True) as result:
            peak = result.peak_memory_bytes
        assert weights_fingerprint(lm) == before
        payload[method] = {"seconds_per_edit": summary(seconds), "peak_memory_bytes": peak}
        s = summary(seconds)
        rows.append(
            {
                "what": f"{method} edit (incl. restore)",
                "median s": f"{s['median']:.2f}",
                "min s": f"{s['min']:.2f}",
                "max s": f"{s['max']:.2f}",
                "n": s["n"],
                "peak MiB": f"{peak / 2**20:.0f}",
            }
        )
    rows.insert(0, {"what": "load, cold (GGUF -> safetensors)", "median s": f"{cold:.2f}", "n": 1})
    w = summary(warm)
    rows.insert(
        1,
        {
            "what": "load, warm (cached)",
            "median s": f"{w['median']:.2f}",
            "min s": f"{w['min']:.2f}",
            "max s": f"{w['max']:.2f}",
            "n": w["n"],
        },
    )
    print_table(rows, ["what", "median s", "min s", "max s", "n", "peak MiB"])
    save("foundation", payload)


if __name__ == "__main__":
    main()
