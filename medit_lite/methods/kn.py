"""Knowledge neurons (Dai et al., ACL 2022): find the FFN neurons that express a fact, and
edit the fact through their value vectors.

**Attribution** (§3.1, Eq. 3-4): integrated gradients of P(answer) with respect to each
FFN intermediate activation at the position that predicts the answer,
:func:`medit_lite.analysis.attribution.neuron_attributions` (shared with DEPN).

**Refinement** (§3.2): for each of ``n`` prompts of the same fact, keep the neurons whose
attribution is at least ``t`` times that prompt's largest one (``t = 0.2``); then keep the
neurons kept for at least ``max(p · n, 3)`` prompts, with ``p = 0.7`` adjusted by ±0.05 (at
most 6 times) until a fact has 2 to 5 neurons, else the set closest to that range (the
authors' ``src/2_get_kn.py`` in ``Hunter-DDM/knowledge-neurons``: ``threshold_ratio =
0.2``, ``mode_ratio_bag = 0.7``, minimum count 3, the same adjustment, there per relation
on average). Their facts have
8.6 ParaRel prompts on average; here :func:`refine` takes any list.

**Suppress / amplify** (§4.2, their ``src/3_modify_activation.py``): set the neurons'
activations at the answer's position to zero, or double them; :func:`scaled_neurons`.

**Editing** (§5.1, their ``src/6_edit_knowledge_sampled.py``): for every refined neuron
``i`` of layer ``l``, with value vector ``v_i = W_out[:, i]``::

    v_i ← v_i − λ₁ (‖v_i‖ / ‖e_old‖) e_old + λ₂ (‖v_i‖ / ‖e_new‖) e_new

where ``e`` is a token's word embedding (BERT ties input and output embeddings; here the
unembedding row, which is what the residual stream is read against; SmolLM2 ties them
too) and λ₁ = 1, λ₂ = 8 (the values of the paper, per the repository's README). Their
objects are single tokens; here ``e`` is the first token of the answer. The neurons are
those of the *old* fact, refined over the edit prompt and ``n_prompts − 1 = 5`` variants
of it behind neutral context prefixes (with 3 prompts the rule "shared by at least 3"
keeps only neurons common to all three, often none); the request's paraphrases are
evaluation data and are not used unless ``use_paraphrases=True``. Not done here: the
authors drop neurons shared
by more than 10% of the facts of the same relation (``select_kn``), which needs the other
facts of the relation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..analysis.attribution import neuron_attributions
from ..editing import register
from ..hooks import Hooks
from ..metrics import target_text
from ..models import LM
from ..requests import EditRequest

#: Neutral context prefixes that make variants of an edit prompt (written for this project).
PREFIXES = (
    "Here is a fact.",
    "Read the sentence below.",
    "This is well known.",
    "A quick question.",
    "Note.",
)

Neuron = tuple[int, int]  # (layer, index)


@dataclass(frozen=True)
class KNHParams:
    """Hyperparameters of knowledge-neuron attribution, refinement and editing."""

    steps: int = 20  # Riemann steps of integrated gradients (paper: m = 20)
    threshold: float = 0.2  # t: keep neurons with attribution >= t * max, per prompt
    share: float = 0.7  # p: keep neurons kept for >= p of the prompts
    min_shared: int = 3  # ... and for at least this many prompts
    adaptive: bool = True  # adjust p by 0.05 (<= 6 times) towards 2..5 neurons
    n_prompts: int = 6  # prompts per fact for the edit (the edit prompt + 5 variants)
    use_paraphrases: bool = False
    lambda1: float = 1.0  # weight of the old answer's embedding (paper: 1)
    lambda2: float = 8.0  # weight of the new answer's embedding (paper: 8)
    layers: tuple[int, ...] = ()  # (): every layer (for_model fills them in)

    @classmethod
    def for_model(cls, lm: LM) -> KNHParams:
        return cls(layers=tuple(range(lm.n_layers)))

    def validate(self, lm: LM) -> None:
        if self.steps < 1:
            raise ValueError("hyperparameter steps must be at least 1")
        if not 0 < self.threshold <= 1:
            raise ValueError("hyperparameter threshold must be in (0, 1]")
        if not 0 < self.share <= 1:
            raise ValueError("hyperparameter share must be in (0, 1]")
        if self.n_prompts < 1 or self.min_shared < 1:
            raise ValueError("hyperparameters n_prompts and min_shared must be at least 1")
        if self.n_prompts > len(PREFIXES) + 1 and not self.use_paraphrases:
            raise ValueError(f"hyperparameter n_prompts can be at most {len(PREFIXES) + 1}")

    def layer_list(self, lm: LM) -> list[int]:
        return list(self.layers) if self.layers else list(range(lm.n_layers))


# -- refinement -----------------------------------------------------------------------------
def coarse_neurons(scores: torch.Tensor, layers: Sequence[int], threshold: float) -> set[Neuron]:
    """Neurons of one prompt with attribution >= ``threshold`` · the prompt's maximum
    (``scores`` [len(layers), d_mlp]); none when no attribution is positive."""
    top = float(scores.max())
    if top <= 0:
        return set()
    rows, cols = torch.nonzero(scores >= threshold * top, as_tuple=True)
    return {(layers[r], c) for r, c in zip(rows.tolist(), cols.tolist())}


def refine_counts(
    counts: Counter, n: int, share: float, min_shared: int, adaptive: bool
) -> list[Neuron]:
    """Neurons counted for at least ``max(share · n, min_shared)`` prompts. With
    ``adaptive``, ``share`` moves by 0.05 (at most 6 times) towards 2 to 5 neurons, as the
    authors do per relation; per fact a step can jump over the range (6 neurons shared by
    5 prompts, then none), so the set closest to the range is returned (the larger on a tie)."""
    tried = []
    for _ in range(6 if adaptive else 1):
        need = max(share * n, min_shared)
        kept = sorted(k for k, c in counts.items() if c >= need)
        if not adaptive or 2 <= len(kept) <= 5:
            return kept
        tried.append(kept)
        share += -0.05 if len(kept) < 2 else 0.05
    return min(tried, key=lambda k: (max(2 - len(k), len(k) - 5), -len(k)))


def refine(
    lm: LM,
    prompts: Sequence[str],
    answer: str,
    hp: KNHParams | None = None,
    scores: Sequence[torch.Tensor] | None = None,
) -> list[Neuron]:
    """The refined knowledge neurons of a fact given ``prompts`` that all ask for
    ``answer`` (Dai et al., 2022, §3.2). ``scores``: precomputed attributions."""
    hp = hp or KNHParams()
    layers = hp.layer_list(lm)
    if scores is None:
        scores = neuron_attributions(lm, list(prompts), [answer] * len(prompts), layers, hp.steps)
    counts: Counter = Counter()
    for s in scores:
        counts.update(coarse_neurons(s, layers, hp.threshold))
    return refine_counts(counts, len(scores), hp.share, hp.min_shared, hp.adaptive)


# -- suppress / amplify ----------------------------------------------------------------------
@contextmanager
def scaled_neurons(lm: LM, neurons: Sequence[Neuron], factor: float, positions: torch.Tensor):
    """Within the block, the activations of ``neurons`` at ``positions`` (one per batch
    row) are multiplied by ``factor``: 0 suppresses, 2 amplifies (Dai et al., §4.2)."""
    by_layer: dict[int, list[int]] = {}
    for layer, i in neurons:
        by_layer.setdefault(layer, []).append(i)

    def scaler(idx: list[int]):
        cols = torch.tensor(idx, device=lm.device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x.clone()
            pos = positions.to(x.device)
            x[rows[:, None], pos[:, None], cols.to(x.device)[None]] *= factor
            return x

        return fn

    with Hooks() as h:
        for layer, idx in by_layer.items():
            h.edit_input(lm.module("mlp_out", layer), scaler(idx))
        yield


@torch.no_grad()
def answer_probabilities(
    lm: LM,
    prompts: Sequence[str],
    answers: Sequence[str],
    neurons: Sequence[Sequence[Neuron]] | None = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """P(first token of each answer | its prompt), optionally with each prompt's own
    ``neurons`` scaled by ``factor`` at its last position (one pass per prompt when
    neurons are given, else one batch)."""
    ids = [first_token(lm, p, a) for p, a in zip(prompts, answers)]
    if neurons is None:
        batch = lm.tokenize(list(prompts))
        last = batch["attention_mask"].sum(1) - 1
        logits = lm.model(**batch).logits  # on the unembedding's device
        rows = torch.arange(len(prompts), device=logits.device)
        probs = torch.softmax(logits[rows, last.to(logits.device)].float(), -1)
        return probs[rows, torch.tensor(ids, device=logits.device)].cpu()
    out = []
    for prompt, tid, ns in zip(prompts, ids, neurons):
        batch = lm.tokenize([prompt])
        last = batch["attention_mask"].sum(1) - 1
        with scaled_neurons(lm, ns, factor, last):
            logits = lm.model(**batch, logits_to_keep=1).logits[0, -1]
        out.append(float(torch.softmax(logits.float(), -1)[tid]))
    return torch.tensor(out)


def first_token(lm: LM, prompt: str, answer: str) -> int:
    """The id of the answer's first token as it follows ``prompt``."""
    ids = lm.tokenizer(target_text(prompt, answer), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} has no tokens")
    return ids[0]


def first_token_text(lm: LM, prompt: str, answer: str) -> str:
    """The answer's first token as text (attributing it attributes that token only)."""
    return lm.tokenizer.decode([first_token(lm, prompt, answer)])


# -- facts with several prompts ---------------------------------------------------------------
def relation_templates(*record_lists: Sequence[dict]) -> dict[str, list[str]]:
    """Prompt templates (``{}`` for the subject) per relation id, collected from ROME's
    known_1000 records (``prompt``, ``subject``, ``relation_id``) and CounterFact records
    (``requested_rewrite``): ParaRel's templates, which both datasets were built from."""
    out: dict[str, set[str]] = {}
    for records in record_lists:
        for r in records:
            rw = r.get("requested_rewrite", r)
            prompt, subject = rw.get("prompt"), rw.get("subject")
            if not prompt or not subject or not rw.get("relation_id"):
                continue
            if "{}" not in prompt:
                if subject not in prompt:
                    continue
                prompt = prompt.replace(subject, "{}", 1)
            out.setdefault(rw["relation_id"], set()).add(prompt)
    return {k: sorted(v) for k, v in sorted(out.items())}


@torch.no_grad()
def fact_bags(
    lm: LM,
    known: Sequence[dict],
    templates: dict[str, list[str]],
    min_prompts: int = 3,
    max_prompts: int = 5,
    limit: int | None = None,
    chunk: int = 20,
    max_templates: int = 8,
) -> list[dict]:
    """Known facts with several prompts: for each known_1000 record, its relation's
    templates filled with the subject, kept where the model's top next token is the
    answer's first token; facts with at least ``min_prompts`` such prompts (the first
    ``max_prompts`` of them, the record's own prompt first when it qualifies). Records
    are scored ``chunk`` at a time (at most ``max_templates`` templates a relation), all
    their prompts in one batched pass, until ``limit`` facts are found."""
    from ..analysis.tracing import next_token_logits

    records, seen = [], set()
    for r in known:
        key = (r["subject"], r["attribute"])
        if key not in seen and r.get("relation_id") in templates and r["subject"] in r["prompt"]:
            seen.add(key)
            records.append(r)
    bags: list[dict] = []
    for start in range(0, len(records), chunk):
        group = records[start : start + chunk]
        prompts = []
        for r in group:
            rel = templates[r["relation_id"]][:max_templates]
            filled = [t.replace("{}", r["subject"], 1) for t in rel]
            prompts.append(list(dict.fromkeys([r["prompt"], *filled])))
        flat = [p for ps in prompts for p in ps]
        top = next_token_logits(lm, flat).argmax(-1).tolist()
        i = 0
        for r, ps in zip(group, prompts):
            good = [
                p
                for p, t in zip(ps, top[i : i + len(ps)])
                if t == first_token(lm, p, r["attribute"])
            ]
            i += len(ps)
            if len(good) >= min_prompts:
                bags.append({**r, "prompts": good[:max_prompts]})
                if limit is not None and len(bags) >= limit:
                    return bags
    return bags


# -- the edit --------------------------------------------------------------------------------
def edit_prompts(request: EditRequest, hp: KNHParams) -> list[str]:
    """The prompts the neurons of a request's fact are refined over."""
    if hp.use_paraphrases:
        extra = list(request.paraphrases)
    else:
        extra = [f"{prefix} {request.text}" for prefix in PREFIXES]
    return [request.text, *extra][: hp.n_prompts]


@torch.no_grad()
def _old_answer(lm: LM, request: EditRequest) -> str:
    if request.target_true is not None:
        return first_token_text(lm, request.text, request.target_true)
    batch = lm.tokenize([request.text])
    return lm.tokenizer.decode([int(lm.model(**batch).logits[0, -1].argmax())])


def update_value_vectors(
    lm: LM, neurons: Sequence[Neuron], old_id: int, new_id: int, lambda1: float, lambda2: float
) -> None:
    """``v_i ← v_i − λ₁ ‖v_i‖/‖e_old‖ e_old + λ₂ ‖v_i‖/‖e_new‖ e_new`` for every neuron
    (Dai et al., §5.1), computed in float32 and cast once."""
    emb = lm.module("unembed").weight
    e_old, e_new = emb[old_id].float(), emb[new_id].float()
    for layer, i in neurons:
        w = lm.weight_out_in("mlp_out", layer)
        v = w[:, i].float()
        new = (
            v
            - lambda1 * v.norm() / e_old.norm() * e_old
            + lambda2 * v.norm() / e_new.norm() * e_new
        )
        w[:, i] = new.to(w.dtype)


def _weights(lm: LM, hp: KNHParams) -> list[str]:
    return [lm.module_name("mlp_out", layer) + ".weight" for layer in hp.layer_list(lm)]


@register("kn", KNHParams, _weights)
def apply_kn(lm: LM, requests: list[EditRequest], hp: KNHParams) -> dict:
    """KN: refine the old fact's knowledge neurons, then move their value vectors from the
    old answer's embedding to the new one's (Dai et al., 2022, §5.1)."""
    plans = []
    for r in requests:  # everything is computed before any weight changes
        prompts = edit_prompts(r, hp)
        old = _old_answer(lm, r)
        neurons = refine(lm, prompts, old, hp)
        old_id = first_token(lm, r.text, old)
        new_id = first_token(lm, r.text, r.target_new)
        plans.append((neurons, old_id, new_id))
    with torch.no_grad():
        for neurons, old_id, new_id in plans:
            update_value_vectors(lm, neurons, old_id, new_id, hp.lambda1, hp.lambda2)
    counts = [len(n) for n, _, _ in plans]
    return {"neurons": [[list(x) for x in n] for n, _, _ in plans], "n_neurons": counts}


def plot_suppress_amplify(summary: dict):
    """Bars of the mean change of P(answer) when a fact's knowledge neurons are suppressed
    or amplified, against as many random neurons and against another fact's prompts
    (``summary`` of ``benchmarks/results/knowledge_neurons.json``)."""
    import matplotlib.pyplot as plt

    groups = [
        ("the fact's neurons", ""),
        ("random neurons", "random_"),
        ("random, same layers", "random_same_layers_"),
        ("another fact's prompts", "other_fact_"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, op in zip(axes, ("suppress", "amplify")):
        vals = [100 * summary[f"{op}_{g}ratio"] for _, g in groups]
        ax.bar(range(len(groups)), vals, color=["C3", "C7", "C7", "C0"])
        ax.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=20, ha="right")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(
            title=f"{op} (×{0 if op == 'suppress' else 2})", ylabel="mean change of P(answer), %"
        )
    fig.tight_layout()
    return fig
