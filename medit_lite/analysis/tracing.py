"""Causal tracing: where in the network a fact is recalled (Meng et al., 2022, §2).

Three runs of the model on a factual prompt such as "The Eiffel Tower is located in the
city of" whose answer is o = "Paris":

* **clean**: the plain prompt; every hidden state h_i^(l) (token i, layer l) is kept;
* **corrupted**: the embeddings of the subject's tokens get Gaussian noise,
  h_i^(0) ← h_i^(0) + ε with ε ~ N(0, ν²) and ν = 3σ, σ the standard deviation of
  the embeddings (the paper's choice); P(o) usually collapses;
* **corrupted-with-restoration**: the corrupted run, except that one state is put back
  to its clean value: the residual stream after a layer ("layer"), or the output of the
  MLP or attention sublayer ("mlp", "attn"), these two over a *window* of ``window``
  consecutive layers around l, as in the paper's Figure 1.

The *indirect effect* of a state is IE = P_restored(o) − P_corrupted(o), averaged over
``samples`` noise draws. States with a large IE mediate the recall of the fact.

Batching: every (kind, token, layer, noise sample) restoration is one row of a batch, so
a whole heatmap costs a few hundred forward passes instead of one per row. Rows are built
from the same prompt, so no padding is needed; only the last position's logits are
computed. Attention is causal, which saves work twice:

* tokens before the subject are never touched by the noise, so restoring them is a no-op:
  their cells take the corrupted value without a forward pass;
* a restoration at token t changes nothing at the tokens before t. A row therefore runs
  only tokens t, t+1, ... and reads the keys and values of the tokens before t from the
  corrupted run (``prefix_cache``).

And a restoration changes nothing below the first layer it touches: there a row replays
the corrupted residual stream. Rows that start at the same token share a forward pass
even when they start at different layers (:func:`~medit_lite.replay.staggered_layers`:
each block runs only on the rows that have started), so the batches stay large.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..hooks import Hooks
from ..metrics import target_text
from ..models import LM
from ..positions import subject_span
from ..progress import progress
from ..replay import PrefixKV, cache_keyword, final_hidden, record_kv, staggered_layers

KINDS = ("layer", "mlp", "attn")
#: Named token positions accepted by ``positions=`` (the categories of the paper's Fig. 2).
POSITION_NAMES = ("subject_first", "subject_last", "first_after", "last")


@dataclass
class TraceResult:
    """The outcome of tracing one kind of state on one prompt."""

    prompt: str
    subject: str
    kind: str
    tokens: list[str]  # every token of the prompt
    positions: list[int]  # the token indices that were restored (rows of ``scores``)
    subject_range: tuple[int, int]  # [start, end) of the subject's tokens
    answer: str  # the answer token whose probability is measured
    answer_id: int
    scores: torch.Tensor  # [len(positions), n_layers]: P(answer) with that state restored
    clean: float  # P(answer) on the clean prompt
    corrupted: float  # P(answer) with the subject corrupted and nothing restored
    noise: float  # standard deviation of the noise added to the subject embeddings
    samples: int
    window: int
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def indirect_effect(self) -> torch.Tensor:
        """P_restored − P_corrupted for each (position, layer)."""
        return self.scores - self.corrupted

    def argmax(self) -> tuple[int, int]:
        """(token index, layer) of the largest effect."""
        flat = int(self.scores.argmax())
        row, col = divmod(flat, self.scores.shape[1])
        layers = self.extra.get("layers")
        return self.positions[row], (layers[col] if layers else col)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        d["scores"] = self.scores.tolist()
        d["subject_range"] = list(self.subject_range)
        return d


def embedding_std(lm: LM, subjects: Sequence[str] | None = None) -> float:
    """Standard deviation σ of token embeddings.

    With ``subjects``: over the embeddings of every token of every subject, repeated tokens
    counted each time (the authors' ``collect_embedding_std``, which concatenates the
    embedding-layer outputs of the subjects); otherwise over the whole embedding matrix.
    """
    weight = lm.module("embed").weight.detach()
    if not subjects:
        return float(weight.float().std())
    ids = [i for s in subjects for i in lm.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("the subjects have no tokens")
    return float(weight[torch.tensor(ids, device=weight.device)].float().std())


_NOISE: dict[tuple, float] = {}


def known_subjects() -> tuple[list[str], str]:
    """The subjects the paper measures its noise over (``known_1000.json``, the facts
    GPT-2 XL knows), or the built-in facts' subjects where ../shared/data is absent; and
    which of the two."""
    from ..requests import builtin_requests, shared_data

    path = shared_data("known_1000.json")
    if path is not None:
        import json

        with open(path, encoding="utf-8") as f:
            return [r["subject"] for r in json.load(f)], "known_1000.json"
    return [r.subject for r in builtin_requests()], "the built-in facts"


def default_noise(lm: LM, factor: float = 3.0) -> float:
    """The paper's noise level: ``factor`` (3) × σ of the subject-token embeddings of the
    known facts (ROME's ``noise_level = 3 * collect_embedding_std(mt, knowns)``),
    computed once per model and kept."""
    key = (id(lm.model), factor)
    if key not in _NOISE:
        subjects, _ = known_subjects()
        _NOISE[key] = factor * embedding_std(lm, subjects)
    return _NOISE[key]


def resolve_positions(
    positions: Iterable[int | str] | None, span: tuple[int, int], n_tokens: int
) -> list[int]:
    """Token indices from ints (negative allowed) and names in :data:`POSITION_NAMES`."""
    if positions is None:
        return list(range(n_tokens))
    named = {
        "subject_first": span[0],
        "subject_last": span[1] - 1,
        "first_after": min(span[1], n_tokens - 1),
        "last": n_tokens - 1,
    }
    out = []
    for p in positions:
        if isinstance(p, str):
            if p not in named:
                raise ValueError(f"unknown position {p!r}; known: {', '.join(POSITION_NAMES)}")
            out.append(named[p])
        elif isinstance(p, int) and not isinstance(p, bool):
            if not -n_tokens <= p < n_tokens:
                raise ValueError(f"position {p} is outside the prompt's {n_tokens} tokens")
            out.append(p % n_tokens)
        else:
            raise TypeError(f"positions must be ints or names, got {p!r}")
    if not out:
        raise ValueError("positions must not be empty")
    return out


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The ``window`` layers restored together around ``layer``: [l − w/2, l + w/2)."""
    half = window // 2
    return range(max(0, layer - half), min(n_layers, layer - half + max(window, 1)))


def _forward_last_logits(lm: LM, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits at the last position only, for a [B, T] batch."""
    kwargs.setdefault("use_cache", False)
    normed = final_hidden(lm, input_ids=ids, **kwargs)
    return lm.module("unembed")(normed[:, -1].contiguous())


def _check_inputs(lm, prompt, subject, kinds, samples, noise, window, batch_size):
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("subject must be a non-empty string")
    if "{}" not in prompt and subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown kind(s) {bad}; choose from {KINDS}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if noise is not None and not (isinstance(noise, (int, float)) and noise >= 0 and noise < 1e6):
        raise ValueError(f"noise must be a finite non-negative number, got {noise!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def trace(
    lm: LM,
    prompt: str,
    subject: str,
    *,
    kinds: Sequence[str] | str = KINDS,
    answer: str | None = None,
    samples: int = 10,
    noise: float | None = None,
    noise_factor: float = 3.0,
    window: int = 10,
    positions: Iterable[int | str] | None = None,
    layers: Iterable[int] | None = None,
    seed: int = 1,
    batch_size: int = 384,
    show_progress: bool = True,
    prefix_cache: bool = True,
    contrast: tuple[str, str] | None = None,
) -> dict[str, TraceResult]:
    """Causal traces of one fact: one :class:`TraceResult` per kind in ``kinds``.

    ``prompt`` is the full prompt (containing ``subject``) or a template with ``{}``.
    ``answer`` defaults to the clean model's top next token; else the first token of
    ``answer`` is measured. ``noise`` is the noise standard deviation ν; by default the
    paper's, ``noise_factor`` × σ of the known facts' subject-token embeddings
    (:func:`default_noise`). ``positions``
    and ``layers`` restrict the grid (e.g. ``positions=["subject_last", "last"]``).
    ``prefix_cache=False`` runs every row over the whole prompt (same scores up to
    rounding, slower). ``contrast=(a, b)`` measures P(a) − P(b) instead of P(answer)
    (e.g. ``("he", "she")``, the gender signal LSDM and DAMA trace); ``answer`` is then
    ignored and the scores and effects are differences of probabilities.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    _check_inputs(lm, prompt, subject, kinds, samples, noise, window, batch_size)
    template = prompt if "{}" in prompt else prompt.replace(subject, "{}", 1)
    text = template.replace("{}", subject, 1)
    span = subject_span(lm, template, subject)
    ids = lm.tokenize([text])["input_ids"]
    n_tokens, n_layers = ids.shape[1], lm.n_layers
    pos = resolve_positions(positions, span, n_tokens)
    layer_list = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    for layer in layer_list:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is outside the model's {n_layers} layers")
    if noise is None:
        noise = default_noise(lm, noise_factor)

    # clean run: keep every state a restoration may need
    needed = {(k, j) for k in kinds for l in layer_list for j in _restored(k, l, window, n_layers)}
    needed |= {("layer", l) for l in layer_list} if "layer" in kinds else set()
    with Hooks() as h:
        boxes = {kj: h.capture_output(lm.module(*kj)) for kj in needed}
        clean_logits = _forward_last_logits(lm, ids)
    clean = {kj: box.value[0] for kj, box in boxes.items()}
    clean_probs = torch.softmax(clean_logits[0].float(), -1)
    if contrast is not None:
        pair = [_first_token(lm, text, word) for word in contrast]
        readout = (torch.tensor(pair), torch.tensor([1.0, -1.0]))
        answer_id = pair[0]
    elif answer is None:
        answer_id = int(clean_probs.argmax())
        readout = (torch.tensor([answer_id]), torch.tensor([1.0]))
    else:
        answer_id = _first_token(lm, text, answer)
        readout = (torch.tensor([answer_id]), torch.tensor([1.0]))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(samples, span[1] - span[0], lm.d_model, generator=gen) * noise
    eps = eps.to(device=lm.device_of("embed"), dtype=lm.module("embed").weight.dtype)

    # corrupted run (one row per noise sample): the residual stream after every layer
    # and the keys and values of every layer, from which the rows read their prefix
    with Hooks() as h:
        h.edit_output(lm.module("embed"), _corrupter(eps, span, torch.arange(samples)))
        outs = [h.capture_output(lm.module("layer", l)) for l in range(n_layers)]
        with record_kv(lm) as kv:
            base_logits = _forward_last_logits(lm, ids.expand(samples, -1))
    stream = torch.stack([box.value.to(lm.device) for box in outs])  # layers may differ
    corrupted = _Corrupted(ids, eps, span, stream, kv)
    base_probs = _read(torch.softmax(base_logits.float(), -1), readout)

    # one row per (cell, sample), with the first layer its restoration changes; rows that
    # start at the same token run together, sorted by that layer
    cells = [(k, t, l) for k in kinds for t in pos for l in layer_list if t >= span[0]]
    groups: dict[int, list] = {}
    for cell in cells:
        first_token = cell[1] if prefix_cache else 0
        layer = _first_computed(cell, window, n_layers)
        groups.setdefault(first_token, []).extend((layer, cell, s) for s in range(samples))
    jobs = []
    for first_token, rows in sorted(groups.items()):
        rows.sort(key=lambda row: row[0])
        jobs += [(first_token, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    cell_probs: dict[tuple, list[float]] = {}
    bar = progress(jobs, desc="causal trace", disable=(not show_progress) or len(jobs) < 3 or None)
    for first_token, chunk in bar:
        p = _run_chunk(lm, corrupted, chunk, first_token, clean, window, readout)
        for (_, cell, _), value in zip(chunk, p.tolist()):
            cell_probs.setdefault(cell, []).append(value)
    cell_score = {c: sum(v) / len(v) for c, v in cell_probs.items()}

    p_corrupted = float(base_probs.mean())
    tokens = [lm.tokenizer.decode([i]) for i in ids[0].tolist()]
    answer_str = lm.tokenizer.decode([answer_id])
    if contrast is not None:
        answer_str = " − ".join(lm.tokenizer.decode([i]) for i in readout[0].tolist())
    results = {}
    for k in kinds:
        scores = torch.full((len(pos), len(layer_list)), p_corrupted)
        for r, t in enumerate(pos):
            for c, l in enumerate(layer_list):
                if (k, t, l) in cell_score:
                    scores[r, c] = cell_score[(k, t, l)]
        results[k] = TraceResult(
            prompt=text,
            subject=subject,
            kind=k,
            tokens=tokens,
            positions=pos,
            subject_range=span,
            answer=answer_str,
            answer_id=answer_id,
            scores=scores,
            clean=float(_read(clean_probs[None], readout)[0]),
            corrupted=p_corrupted,
            noise=float(noise),
            samples=samples,
            window=1 if k == "layer" else window,
            extra={"layers": layer_list} | ({"contrast": tuple(contrast)} if contrast else {}),
        )
    return results


def _first_token(lm: LM, text: str, word: str) -> int:
    ids = lm.tokenizer(target_text(text, word), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {word!r} has no tokens")
    return ids[0]


def _read(probs: torch.Tensor, readout) -> torch.Tensor:
    """Σ_j c_j P(token_j) per row (CPU): the measured quantity, P(answer) or a contrast."""
    ids, coef = readout
    picked = probs[:, ids.to(probs.device)].cpu()
    return (picked * coef).sum(-1)


def _restored(kind: str, layer: int, window: int, n_layers: int) -> range:
    """Layers whose ``kind`` output is restored for the cell at ``layer``."""
    return range(layer, layer + 1) if kind == "layer" else window_layers(layer, window, n_layers)


def _first_computed(cell: tuple[str, int, int], window: int, n_layers: int) -> int:
    """The lowest layer whose computation a restoration changes: below it, the rows of
    this cell equal the corrupted run and are replayed, not recomputed."""
    kind, _, layer = cell
    return layer + 1 if kind == "layer" else _restored(kind, layer, window, n_layers).start


def _corrupter(eps: torch.Tensor, span: tuple[int, int], sample_idx: torch.Tensor, offset=0):
    """Embedding hook adding each row's noise sample to the subject's tokens, for a
    sequence that starts at token ``offset`` of the prompt."""
    lo, hi = max(span[0], offset), span[1]

    def fn(out):
        seq = out.shape[1]
        if hi <= lo or lo >= offset + seq:
            return out
        end = min(hi, offset + seq)
        out = out.clone()
        noise = eps[sample_idx.to(eps.device)][:, lo - span[0] : end - span[0]]
        out[:, lo - offset : end - offset] += noise
        return out

    return fn


def _restorer(state: torch.Tensor, row_idx: torch.Tensor, tok_idx: torch.Tensor, offset=0):
    """Output hook putting the clean ``state`` back at (row, token) pairs (``tok_idx`` are
    tokens of the prompt; the batch holds the prompt from token ``offset`` on)."""

    def fn(out):
        out = out.clone()
        rows, toks = row_idx.to(out.device), tok_idx.to(out.device)
        out[rows, toks - offset] = state[tok_idx.to(state.device)].to(out.device)
        return out

    return fn


@dataclass
class _Corrupted:
    """The corrupted run the restorations start from: the prompt, the noise, the residual
    stream after every layer ([layers, samples, tokens, d_model]) and every layer's keys
    and values (:class:`~medit_lite.replay.RecordKV`, [samples, heads, tokens, head_dim])."""

    ids: torch.Tensor
    eps: torch.Tensor
    span: tuple[int, int]
    stream: torch.Tensor
    kv: list

    def prefix(self, lm: LM, first_token: int, sample_idx: torch.Tensor, counts: list[int]):
        """Per layer, the keys and values of tokens [0, first_token) for the rows that run
        there (the first ``counts[j]`` of ``sample_idx``), and a cache of that length for
        the model's attention mask."""
        mask_cache = DynamicCache(config=lm.model.config)
        per_layer = []
        for j, rec in enumerate(self.kv):
            keys, values = rec.keys[:, :, :first_token], rec.values[:, :, :first_token]
            mask_cache.update(keys[:1], values[:1], j)
            rows = sample_idx[: counts[j]].to(keys.device)  # each layer's own device
            per_layer.append(PrefixKV(keys[rows], values[rows]))
        return per_layer, mask_cache


def _run_chunk(lm, corrupted: _Corrupted, chunk, first_token, clean, window, readout):
    """The measured quantity (:func:`_read`: P(answer) or a contrast) for each row of
    one chunk: rows (start layer, cell, sample), sorted by the layer they start computing
    at, all from token ``first_token`` on (the keys and values of the tokens before it come
    from the corrupted run)."""
    n_layers, t0 = lm.n_layers, first_token
    starts = [layer for layer, _, _ in chunk]
    sample_idx = torch.tensor([s for _, _, s in chunk], device=lm.device)
    # each row's input of its start layer: the corrupted stream below it, where a "layer"
    # restoration puts back the clean state after `layer` at its token
    below = torch.tensor(starts, device=lm.device).sub(1).clamp(min=0)
    entry = corrupted.stream[below, sample_idx, t0:].clone()
    plan: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for row, (_, (kind, t, layer), _) in enumerate(chunk):
        if kind == "layer":
            entry[row, t - t0] = clean[("layer", layer)][t].to(entry.device)
            continue
        for j in _restored(kind, layer, window, n_layers):
            r, tok = plan.setdefault((kind, j), ([], []))
            r.append(row)
            tok.append(t)
    counts = [bisect.bisect_right(starts, j) for j in range(n_layers)]
    kv, extra = None, {}
    if t0 > 0:
        kv, mask_cache = corrupted.prefix(lm, t0, sample_idx, counts)
        positions = torch.arange(t0, corrupted.ids.shape[1], device=lm.device)[None]
        extra = {"position_ids": positions, "use_cache": True, cache_keyword(lm): mask_cache}
    with Hooks() as h:  # hooks first: the swapped stack hides the blocks' module paths
        if starts[0] == 0:
            fn = _corrupter(corrupted.eps, corrupted.span, sample_idx, t0)
            h.edit_output(lm.module("embed"), fn)
        for (kind, j), (r, tok) in plan.items():
            row_idx = torch.tensor(r, device=lm.device)
            tok_idx = torch.tensor(tok, device=lm.device)
            h.edit_output(lm.module(kind, j), _restorer(clean[(kind, j)], row_idx, tok_idx, t0))
        with staggered_layers(lm, starts, entry, kv):
            logits = _forward_last_logits(lm, corrupted.ids[:, t0:].expand(len(chunk), -1), **extra)
    return _read(torch.softmax(logits.float(), -1), readout)


# -- many facts -------------------------------------------------------------------------
def load_known_facts(path: str | os.PathLike) -> list[dict]:
    """Records of ROME's ``known_1000.json`` (``subject``, ``prompt``, ``attribute``...)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def next_token_logits(lm: LM, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Logits of the token after each text, [len(texts), vocab] (the unembedding is
    applied at the last real position of each row only)."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = lm.tokenize(list(texts[start : start + batch_size]))
        last = batch["attention_mask"].sum(1) - 1
        normed = final_hidden(lm, **batch, use_cache=False)
        rows = torch.arange(len(last), device=lm.device)
        out.append(lm.module("unembed")(normed[rows, last]).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def known_facts(lm: LM, records: Sequence[dict], batch_size: int = 64) -> list[dict]:
    """The records whose attribute's first token is the model's top next-token prediction.

    Each record needs ``prompt`` (containing ``subject``) and ``attribute``, as in ROME's
    known_1000 (which was made for GPT-2 XL: a smaller model knows fewer of them).
    """
    records = [r for r in records if r["subject"] in r["prompt"]]
    top = next_token_logits(lm, [r["prompt"] for r in records], batch_size).argmax(-1).tolist()
    keep = []
    for r, t in zip(records, top):
        ids = lm.tokenizer(target_text(r["prompt"], r["attribute"]), add_special_tokens=False)
        if ids["input_ids"] and ids["input_ids"][0] == t:
            keep.append(r)
    return keep


@dataclass
class AverageTrace:
    """Indirect effects averaged over facts: ``effects[kind]`` is [facts, positions, layers]."""

    positions: list[str]
    effects: dict[str, torch.Tensor]
    clean: torch.Tensor  # P(answer) clean, per fact
    corrupted: torch.Tensor  # P(answer) corrupted, per fact
    facts: list[dict]
    samples: int
    window: int
    layers: list[int] = field(default_factory=list)

    def mean(self, kind: str) -> torch.Tensor:
        """Average indirect effect [positions, layers] of one kind."""
        return self.effects[kind].mean(0)

    def to_dict(self) -> dict:
        return {
            "positions": self.positions,
            "samples": self.samples,
            "window": self.window,
            "layers": self.layers,
            "n_facts": len(self.facts),
            "mean_clean": float(self.clean.mean()),
            "mean_corrupted": float(self.corrupted.mean()),
            "average_indirect_effect": {k: self.mean(k).tolist() for k in self.effects},
            "facts": [f.get("known_id", f.get("subject")) for f in self.facts],
        }


def average_trace(
    lm: LM,
    facts: Sequence[dict],
    *,
    positions: Sequence[str] = ("subject_last", "last"),
    kinds: Sequence[str] = KINDS,
    samples: int = 3,
    noise: float | None = None,
    window: int = 10,
    layers: Iterable[int] | None = None,
    batch_size: int = 384,
    contrast: tuple[str, str] | None = None,
    align_sign: bool = False,
) -> AverageTrace:
    """Average indirect effect over ``facts`` (records with ``prompt``, ``subject``, and
    optionally ``attribute``) at named positions, like the paper's Figure 2.

    ``contrast`` traces P(a) − P(b) (see :func:`trace`); with ``align_sign`` each fact's
    effects are multiplied by the sign of its clean score, so that facts leaning to a and
    to b add up instead of cancelling (the gender signal of male- and female-stereotyped
    professions)."""
    if not facts:
        raise ValueError("facts must not be empty")
    if noise is None:
        noise = 3.0 * embedding_std(lm, [f["subject"] for f in facts])
    effects = {k: [] for k in kinds}
    clean, corrupted = [], []
    for fact in progress(facts, desc="tracing facts"):
        res = trace(
            lm,
            fact["prompt"],
            fact["subject"],
            kinds=kinds,
            answer=fact.get("attribute"),
            samples=samples,
            noise=noise,
            window=window,
            positions=list(positions),
            layers=layers,
            batch_size=batch_size,
            show_progress=False,
            contrast=contrast,
        )
        sign = 1.0
        if align_sign and res[kinds[0]].clean < 0:
            sign = -1.0
        for k in kinds:
            effects[k].append(res[k].indirect_effect * sign)
        first = res[kinds[0]]
        clean.append(first.clean * sign)
        corrupted.append(first.corrupted * sign)
    return AverageTrace(
        positions=list(positions),
        effects={k: torch.stack(v) for k, v in effects.items()},
        clean=torch.tensor(clean),
        corrupted=torch.tensor(corrupted),
        facts=list(facts),
        samples=samples,
        window=window,
        layers=list(range(lm.n_layers)) if layers is None else [int(x) for x in layers],
    )
