"""Benchmark results as the book's pages read them.

The scripts in ``benchmarks/`` write JSON files into ``medit_lite/data/results/`` (package
data, so that a ``pip install`` on Colab brings the results the pages read;
``benchmarks/results`` is a link to that folder); pages never type a number, they read it
from there. :func:`load_results` finds one file;
:func:`evaluation_rows` walks every file and collects each :func:`medit_lite.evaluate.evaluate`
result in it (a dict with ``method``, ``n`` and ``metrics``), so that a comparison table
grows by itself as benchmarks for more methods are run.

The folder is ``$MEDIT_RESULTS`` when set, else the package's ``data/results``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .metrics import METRIC_KEYS


def results_dir() -> Path:
    """Where benchmark results are read from."""
    env = os.environ.get("MEDIT_RESULTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "results"


def load_results(name: str) -> dict | None:
    """The JSON result ``name`` (without ``.json``), or None where it has not been run."""
    path = results_dir() / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _data_label(value) -> str | None:
    """'counterfact' or 'zsre' where a string names one of those datasets."""
    if not isinstance(value, str):
        return None
    text = value.lower()
    if "zsre" in text:
        return "zsre"
    if "counterfact" in text or text in {"cf", "mcf"}:
        return "counterfact"
    return None


def _walk(node, path: tuple[str, ...], data: str | None) -> Iterable[tuple[tuple, str, dict]]:
    if isinstance(node, dict):
        for key in ("data", "dataset"):
            data = _data_label(node.get(key)) or data
        if {"method", "n", "metrics"} <= set(node) and isinstance(node["metrics"], dict):
            yield path, data, node
            return
        for key, value in node.items():
            yield from _walk(value, path + (str(key),), _data_label(key) or data)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + (str(i),), data)


def evaluation_rows(names: Sequence[str] | None = None) -> list[dict]:
    """One flat row per evaluation result found in the result files.

    Each row has ``file``, ``where`` (its path inside the file), ``label`` (the method,
    marked when the result is one batch of many edits), ``data`` (``counterfact``,
    ``zsre`` or None where the file does not say), ``method``, ``n``, ``sequential``,
    ``seconds_per_edit`` and every metric the result holds. ``names`` limits the files
    read (default: all).
    """
    root = results_dir()
    files = (
        [root / f"{n}.json" for n in names] if names is not None else sorted(root.glob("*.json"))
    )
    rows = []
    for path in files:
        if not path.is_file():
            continue
        payload = json.loads(path.read_text(encoding="utf-8"))
        for where, data, result in _walk(payload, (), None):
            where_text = "/".join(where).lower()
            row = {
                "file": path.stem,
                "where": "/".join(where),
                "data": data,
                "method": result["method"],
                "label": result["method"] + (" (one batch)" if "batch" in where_text else ""),
                "n": result["n"],
                "sequential": bool(result.get("sequential", False)),
                "seconds_per_edit": result.get("seconds_per_edit"),
            }
            row.update({k: result["metrics"][k] for k in METRIC_KEYS if k in result["metrics"]})
            rows.append(row)
    return rows


def comparison(
    rows: Sequence[dict],
    data: str,
    keys: Sequence[str],
    *,
    sequential: bool = False,
    largest_n: bool = True,
) -> list[dict]:
    """The rows of one dataset and mode, one per label (the run with the most records, or
    the first found), sorted with the unedited model first, then by label."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["data"] != data or r["sequential"] != sequential:
            continue
        kept = best.get(r["label"])
        if kept is None or (largest_n and r["n"] > kept["n"]):
            best[r["label"]] = r
    order = sorted(best, key=lambda m: (m != "none", m))
    cols = ["label", "method", "n", *keys, "seconds_per_edit", "file"]
    return [{c: best[m].get(c) for c in cols} for m in order]


def comparison_frame(rows: Sequence[dict], data: str, keys: Sequence[str], *, sequential=False):
    """:func:`comparison` as a styled pandas table for a page: one line per method with its
    metrics, the unedited model's last metric on the same number of records, seconds per
    edit and the results file it came from."""
    import pandas as pd

    found = comparison(rows, data, keys, sequential=sequential)
    unedited = {r["n"]: r for r in rows if r["data"] == data and r["method"] == "none"}
    out = []
    for r in found:
        base = unedited.get(r["n"], {})
        line = {"method": r["label"], "records": r["n"]}
        line |= {k: r.get(k) for k in keys}
        if not sequential:
            line |= {f"unedited {k}": base.get(k) for k in keys[-1:]}
        line |= {"s / edit": r["seconds_per_edit"], "results file": r["file"]}
        out.append(line)
    frame = pd.DataFrame(out)
    return frame.style.hide(axis="index").format(precision=3, na_rep="–")


def lifelong_runs(data: str | None = None, names: Sequence[str] | None = None) -> dict:
    """Every lifelong curve in the result files (a dict with ``method`` and a ``curve`` of
    checkpoints with ``n_edits`` and ``SR``), as ``{"method (file)": curve}``; ``data``
    keeps the curves of one dataset (``counterfact`` or ``zsre``)."""
    root = results_dir()
    files = (
        [root / f"{n}.json" for n in names] if names is not None else sorted(root.glob("*.json"))
    )
    runs: dict[str, list] = {}

    def walk(node, label_data):
        if isinstance(node, dict):
            for key in ("data", "dataset"):
                label_data = _data_label(node.get(key)) or label_data
            curve = node.get("curve")
            if "method" in node and isinstance(curve, list) and curve and "SR" in curve[0]:
                if data is None or label_data == data:
                    runs[f"{node['method']} ({path.stem})"] = curve
                return
            for key, value in node.items():
                walk(value, _data_label(key) or label_data)
        elif isinstance(node, list):
            for value in node:
                walk(value, label_data)

    for path in files:
        if path.is_file():
            walk(json.loads(path.read_text(encoding="utf-8")), None)
    return runs


#: Numbers the papers and EasyEdit report, for the pages to show *beside* ours, marked as
#: theirs (other models, other data, other protocols). Each entry: the source to cite, the
#: model, the dataset, the metric names and the rows (in %).
PUBLISHED = {
    "meng2022rome": {
        "source": "Meng et al. (2022), Table 4",
        "model": "GPT-2 XL",
        "data": "counterfact",
        "keys": ["ES", "PS", "NS"],
        "rows": {
            "none": {"ES": 22.2, "PS": 24.7, "NS": 78.1},
            "ft": {"ES": 100.0, "PS": 87.9, "NS": 40.4},
            "ft-l": {"ES": 99.1, "PS": 48.7, "NS": 70.3},
            "rome": {"ES": 100.0, "PS": 96.4, "NS": 75.4},
        },
    },
    "wang2023easyedit": {
        "source": "EasyEdit (Wang et al., 2023), zsRE tables",
        "model": "LLaMA-2-7B (MEND); GPT-J (KE)",
        "data": "zsre",
        "keys": ["reliability", "generalization", "locality"],
        "rows": {
            "mend": {"reliability": 94.2, "generalization": 90.3, "locality": 97.0},
            "ke": {"reliability": 6.6, "generalization": 7.8, "locality": 94.2},
        },
    },
}


def published_frame(key: str):
    """One :data:`PUBLISHED` table as a pandas table (their numbers, in %)."""
    import pandas as pd

    entry = PUBLISHED[key]
    rows = [{"method": m, **vals} for m, vals in entry["rows"].items()]
    return pd.DataFrame(rows).style.hide(axis="index").format(precision=1, na_rep="–")


def training_seconds() -> dict[str, float]:
    """One-off training time (seconds, data preparation included) of the methods that
    train an editor before their first edit, from ``external.json`` (SERAC's scope
    classifier, the NL-patch gate) and ``internal.json`` (MEND, KE, ENN)."""
    out: dict[str, float] = {}
    for method, cost in ((load_results("external") or {}).get("training") or {}).items():
        if isinstance(cost, dict) and cost.get("seconds") is not None:
            out[method] = float(cost["seconds"])
    for key, part in (load_results("internal") or {}).items():
        if key.endswith("_training") and isinstance(part, dict) and part.get("train_seconds"):
            prep = part.get("prep_seconds") or 0
            out[key.removesuffix("_training")] = part["train_seconds"] + prep
    return out


def efficiency_frame():
    """``efficiency.json`` (``benchmarks/bench_efficiency.py``) as a pandas table: per
    method the seconds of one edit, the peak memory it allocates, what stays allocated after
    it (the state it attaches to the model, and any cache kept for later edits), the
    weights it changes, and the one-off training time where there is one; None
    where the benchmark has not been run."""
    import pandas as pd

    data = load_results("efficiency")
    if not data:
        return None
    training = training_seconds()
    rows = [
        {
            "method": method,
            "s / edit": cost["seconds"],
            "peak MiB": cost["peak_bytes"] / 2**20,
            "left allocated KiB": cost["added_bytes"] / 1024,
            "weights changed": cost["params_changed"],
            "% of weights": 100 * cost["params_changed"] / cost["params_total"],
            "training s (once)": training.get(method),
        }
        for method, cost in data["methods"].items()
    ]
    formats = {
        "s / edit": "{:.2f}",
        "peak MiB": "{:.1f}",
        "left allocated KiB": "{:.1f}",
        "weights changed": "{:,}",
        "% of weights": "{:.3f}",
        "training s (once)": "{:.0f}",
    }
    return pd.DataFrame(rows).style.hide(axis="index").format(formats, na_rep="–")
