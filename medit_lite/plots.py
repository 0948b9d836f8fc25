"""The book's figures (matplotlib). Each function returns the Figure it draws."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt

#: The taxonomy of editing methods used by the textbook (and Yao et al., 2023; Wang
#: et al., 2023): leaf -> representative methods. Labels are English only so that the
#: figure renders with matplotlib's bundled font; the chapter gives the Chinese terms.
TAXONOMY = {
    "External extension": {
        "Knowledge cache": ["SERAC", "IKE", "NL-Patch", "GRACE"],
        "Additional parameters": ["CaliNet", "T-Patcher"],
    },
    "Internal modification": {
        "Meta-learning": ["ENN", "KE", "MEND"],
        "Locate-then-edit": ["KN", "ROME", "MEMIT"],
    },
}
#: The name each method of :data:`TAXONOMY` is registered under in ``medit_lite``
#: (``edit(lm, request, method=...)``), where it is not the lowercase label.
REGISTRY_NAMES = {"NL-Patch": "nl-patch", "T-Patcher": "tpatcher"}


def _box(ax, x, y, text, color, size=9):
    ax.text(
        x,
        y,
        text,
        ha="center",
        va="center",
        fontsize=size,
        bbox=dict(boxstyle="round,pad=0.4", fc=color, ec="0.3"),
    )


def taxonomy_figure(taxonomy: Mapping = TAXONOMY):
    """A tree: model editing → two families → four kinds → example methods."""
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    root = (0.5, 0.92)
    _box(ax, *root, "Model editing", "#f4d35e", 11)
    leaves = [
        (fam, kind, methods) for fam, kinds in taxonomy.items() for kind, methods in kinds.items()
    ]
    n = len(leaves)
    families = list(taxonomy)
    for fi, fam in enumerate(families):
        fx = (2 * fi + 1) / (2 * len(families))
        ax.plot([root[0], fx], [root[1] - 0.04, 0.70], color="0.4", lw=1)
        _box(ax, fx, 0.66, fam, "#9ad1d4", 10)
        for li, (f, kind, methods) in enumerate(leaves):
            if f != fam:
                continue
            kx = (2 * li + 1) / (2 * n)
            ax.plot([fx, kx], [0.61, 0.46], color="0.4", lw=1)
            _box(ax, kx, 0.41, kind, "#e0e0e0", 9)
            ax.plot([kx, kx], [0.36, 0.26], color="0.4", lw=1)
            _box(ax, kx, 0.16, "\n".join(methods), "white", 9)
    fig.tight_layout()
    return fig


def probability_bars(
    labels: Sequence[str],
    before: Mapping[str, Sequence[float]],
    after: Mapping[str, Sequence[float]],
    title: str = "",
):
    """Grouped bars of target probabilities before and after an edit.

    ``before``/``after`` map a series name (e.g. "P(Paris)") to one value per label.
    """
    import numpy as np

    series = list(before)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2 + 0.25 * len(labels)), sharey=True)
    y = np.arange(len(labels))
    height = 0.8 / len(series)
    for ax, (name, data) in zip(axes, [("before the edit", before), ("after the edit", after)]):
        for si, s in enumerate(series):
            ax.barh(y + si * height, data[s], height=height, label=s)
        ax.set_title(name)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability (token-averaged)")
    axes[0].set_yticks(y + height * (len(series) - 1) / 2, labels)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def metric_bars(results: Sequence[Mapping], keys: Sequence[str], title: str = ""):
    """One group of bars per metric, one bar per method (``evaluate`` results)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(len(keys))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        values = [r["metrics"].get(k, float("nan")) for k in keys]
        ax.bar(x + i * width, values, width=width, label=r["method"])
    ax.set_xticks(x + width * (len(results) - 1) / 2, keys)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("score")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# -- chapter 4: causal tracing and locate-then-edit ------------------------------------------
_TRACE_COLORS = {"layer": "Purples", "mlp": "Greens", "attn": "Reds"}
_TRACE_TITLES = {
    "layer": "single restored layer (residual stream)",
    "mlp": "restored MLP, window",
    "attn": "restored attention, window",
}


def trace_heatmaps(results: Sequence, title: str | None = None):
    """Heatmaps of P(answer) after restoring each (token, layer), one panel per kind,
    in the style of Meng et al. (2022), Figure 1; subject tokens are marked with ``*``."""
    size = (4.2 * len(results), 0.32 * len(results[0].positions) + 1.6)
    fig, axes = plt.subplots(1, len(results), figsize=size, squeeze=False)
    for ax, res in zip(axes[0], results):
        start, end = res.subject_range
        labels = [res.tokens[t] + ("*" if start <= t < end else "") for t in res.positions]
        layers = res.extra.get("layers", list(range(res.scores.shape[1])))
        im = ax.imshow(
            res.scores.numpy(),
            cmap=_TRACE_COLORS.get(res.kind, "Blues"),
            vmin=min(res.corrupted, float(res.scores.min())),
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_yticks(range(len(labels)), [repr(s)[1:-1] for s in labels], fontsize=8)
        step = max(1, len(layers) // 6)
        ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
        ax.set_xlabel("layer")
        window = f" ({res.window})" if res.kind != "layer" else ""
        ax.set_title(_TRACE_TITLES.get(res.kind, res.kind) + window, fontsize=9)
        fig.colorbar(im, ax=ax, label=f"p({res.answer.strip()})", shrink=0.8)
    fig.suptitle(title or f"{results[0].prompt!r} → {results[0].answer.strip()!r}", fontsize=10)
    fig.tight_layout()
    return fig


def average_effect_lines(
    average: Mapping[str, Sequence[Sequence[float]]],
    positions: Sequence[str],
    title: str = "",
):
    """Average indirect effect per layer at each named position, one panel per kind
    (Meng et al., 2022, Figure 2). ``average[kind]`` is [positions][layers]."""
    kinds = list(average)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, row in zip(positions, average[kind]):
            ax.plot(range(len(row)), row, marker=".", label=name.replace("_", " "))
        ax.set_title(_TRACE_TITLES.get(kind, kind), fontsize=9)
        ax.set_xlabel("layer")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("average indirect effect")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def metric_curves(
    curves: Mapping[str, Mapping[int, Mapping[str, float]]],
    keys: Sequence[str] = ("ES", "PS", "NS"),
    title: str = "",
):
    """One panel per metric: its value against the number of edits for each method
    (``curves[method][n_edits][metric]``)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for method, points in curves.items():
            ns = sorted(points, key=int)
            ax.plot([int(n) for n in ns], [points[n][key] for n in ns], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("number of edits")
        ax.set_title(key)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def distance_histograms(
    distances: Mapping[str, Sequence[float]], eps: float, title: str = "", bins: int = 40
):
    """Overlaid histograms of key distances (``distances[label] = [d, ...]``) with GRACE's
    deferral radius ``eps`` marked: inputs left of the line are answered by the codebook."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    top = max(max(v) for v in distances.values() if len(v))
    edges = [top * i / bins for i in range(bins + 1)]
    for label, values in distances.items():
        ax.hist(values, bins=edges, alpha=0.5, density=True, label=f"{label} ({len(values)})")
    ax.axvline(eps, color="black", linestyle="--", label=f"ε = {eps:g}")
    ax.set(xlabel="Euclidean distance to the edit's key", ylabel="density", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cka_histograms(scores: Mapping[str, Sequence[float]], title: str = ""):
    """Histograms of CKA scores (log10), one panel per data set; a score > 1 (right of the
    line) means the model prefers the true relation: it "knows" the fact."""
    import math

    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.0), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items()):
        logs = [math.log10(v) for v in values if v > 0]
        known = sum(v > 1 for v in values) / max(1, len(values))
        ax.hist(logs, bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="black", linestyle="--")
        ax.set(xlabel="log10 CKA score", ylabel="facts", title=f"{name}: {known:.0%} known")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def lifelong_panels(
    runs: Mapping[str, Sequence[Mapping]], keys: Sequence[str] = ("SR", "GR", "ER", "locality")
):
    """One panel per lifelong metric against the number of edits, one line per method
    (``runs[method]`` is a lifelong ``curve``: dicts with ``n_edits`` and the keys)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.0), sharey=True)
    for method, curve in runs.items():
        xs = [c["n_edits"] for c in curve]
        for ax, key in zip(axes, keys):
            ax.plot(xs, [c[key] for c in curve], marker="o", ms=3, label=method)
    for ax, key in zip(axes, keys):
        ax.set(title=key, xlabel="edits so far", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def scope_histograms(scores: Mapping[str, Sequence[float]], threshold: float = 0.5, title=""):
    """Histograms of a scope classifier's scores ``s(z, x)`` in [0, 1], one colour per kind
    of input (``scores[label] = [s, ...]``), with the routing threshold marked: inputs right
    of the line are answered with the edit in context (SERAC's rule)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    edges = [i / 40 for i in range(41)]
    for label, values in scores.items():
        above = sum(v > threshold for v in values) / max(1, len(values))
        ax.hist(values, bins=edges, alpha=0.55, label=f"{label} ({len(values)}, {above:.0%} in)")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set(xlabel="scope score s(z, x)", ylabel="inputs", yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_curves(log: dict, panels, title: str = "training", smooth: int = 10):
    """One panel per logged series of a training run: ``panels`` is a list of ``(key,
    panel title)`` into ``log`` (a :class:`~medit_lite.training.TrainLog`'s ``losses`` and
    ``logs``, flattened as in the benchmark JSON); raw values in grey, a ``smooth``-step
    moving average in colour."""
    import torch

    def average(xs):
        t = torch.tensor(xs, dtype=torch.float32)
        if len(t) < smooth:
            return t
        return torch.nn.functional.avg_pool1d(t[None, None], smooth, 1)[0, 0]

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        ys = log.get(key) or []
        ax.plot(ys, color="0.8", lw=0.8)
        ax.plot(range(len(average(ys))), average(ys), color="C0")
        ax.set(title=name, xlabel="step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
