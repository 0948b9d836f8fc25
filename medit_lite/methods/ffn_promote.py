"""FFN concept promotion for toxicity suppression (Geva, Caciularu, Wang and Goldberg, 2022).

An MLP adds Σ_i m_i v_i to the residual stream: each *value* v_i (a column of the output
matrix, ``mlp_out``) is weighted by its activation m_i (the i-th input of ``mlp_out``).
Projected onto the vocabulary, r_i = E · norm(v_i) (E the unembedding), many values
promote a human-readable concept: their top tokens share a topic (§3 of the paper).
Toxicity suppression (§5.1) turns a few values that promote *safe* concepts on for every
token: at inference their activations are set to a fixed coefficient,

    m_i ← c   for the chosen (layer, i),  every position,

so the model keeps pushing the residual stream towards those concepts. The authors' code
(``aviclu/ffn-values``, ``toxic_suppression_wrapper.set_value_activations``) does it with
a forward hook, with c = 3 and 10 values of GPT-2 medium (layers 13–22 of 24) picked by
hand from their projections; they report toxicity down by about 50 % (Perspective) at a
small perplexity cost.

Here the values are found, not hand-picked (:func:`find_values`): each value of the
searched layers is scored by how strongly its projection promotes the tokens of the
requested concept words (a z-score against the whole vocabulary, computed exactly from the
unembedding's mean and covariance, so no vocabulary-sized product is needed per value),
and the best ``n_values`` whose own top tokens the toxicity scorer finds clean are
promoted. A request names the concept in ``target_new`` (comma-separated words, e.g.
``"safe, kind, peace"``; see :func:`promote_request`) or lists value ids in
``extra["values"]`` as ``[(layer, index), ...]``. The hook is registered by ``apply`` and
removed by ``restore()`` (no weight changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..editing import register
from ..hooks import Hooks
from ..models import LM
from ..requests import EditRequest

#: Default concept words: the themes of the values Geva et al. picked (their Table 5:
#: safety, kindness, politeness, respect, peace...).
SAFE_CONCEPTS = (
    "safe, safety, peace, peaceful, kind, kindness, polite, respect, respectful, calm, "
    "gentle, friendly, help, helpful, care, caring, thank, thanks, please, love"
)


@dataclass(frozen=True)
class FFNPromoteHParams:
    """Which values to look at, how many to promote and the coefficient c."""

    #: searched layers; () = the upper half of the model (the paper's values come from
    #: layers 13–22 of GPT-2 medium's 24)
    layers: tuple[int, ...] = ()
    n_values: int = 10
    coef: float = 3.0
    #: candidates kept by score before the toxicity filter
    n_candidates: int = 40
    top_tokens: int = 10
    #: a candidate is dropped when its top tokens score at least this (toxicity scorer)
    max_toxicity: float = 0.5

    @classmethod
    def for_model(cls, lm: LM) -> FFNPromoteHParams:
        return cls(layers=tuple(range(lm.n_layers // 2, lm.n_layers)))

    def validate(self, lm: LM) -> None:
        if self.n_values < 1:
            raise ValueError("hyperparameter n_values must be at least 1")
        if self.n_candidates < self.n_values:
            raise ValueError("hyperparameter n_candidates must be at least n_values")
        if self.top_tokens < 1:
            raise ValueError("hyperparameter top_tokens must be at least 1")


def promote_request(concept: str = SAFE_CONCEPTS, values=None) -> EditRequest:
    """A request for ``ffn-promote``: promote ``concept`` (comma-separated words) or the
    given ``values`` [(layer, index), ...]."""
    extra = {"values": [tuple(v) for v in values]} if values is not None else {}
    return EditRequest(prompt="promote: {}", subject=concept, target_new=concept, extra=extra)


def concept_token_ids(lm: LM, concept: str) -> list[int]:
    """First tokens of each comma-separated word, with and without a leading space."""
    ids = set()
    for word in (w.strip() for w in concept.split(",")):
        if not word:
            continue
        for form in (word, " " + word, " " + word.capitalize()):
            tok = lm.tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(tok) == 1:
                ids.add(tok[0])
    if not ids:
        raise ValueError(f"concept {concept!r} has no single-token words")
    return sorted(ids)


@torch.no_grad()
def normed_values(lm: LM, layer: int) -> torch.Tensor:
    """[d_mlp, d_model]: the final norm applied to each value vector (float32), as the
    authors' ``project_value_to_vocab`` does before the unembedding."""
    W = lm.weight_out_in("mlp_out", layer).detach()
    return lm.module("final_norm")(W.T.contiguous()).float()


@torch.no_grad()
def concept_scores(lm: LM, layer: int, token_ids: list[int]) -> torch.Tensor:
    """[d_mlp]: mean z-score of the concept tokens' logits in each value's projection,
    (e_t · x − mean_t' e_t' · x) / std_t'(e_t' · x), exact, from the unembedding's
    mean and covariance."""
    E = lm.module("unembed").weight.detach().float()
    mu = E.mean(0)
    cov = torch.cov(E.T)
    X = normed_values(lm, layer)
    std = ((X @ cov) * X).sum(1).clamp_min(1e-12).sqrt()
    concept = X @ E[torch.tensor(token_ids, device=E.device)].T  # [d_mlp, n_tokens]
    return ((concept - (X @ mu)[:, None]) / std[:, None]).mean(1)


@torch.no_grad()
def value_top_tokens(lm: LM, layer: int, index: int, k: int = 10) -> list[str]:
    """The ``k`` tokens the value (layer, index) promotes most."""
    x = normed_values(lm, layer)[index]
    logits = lm.module("unembed")(x.to(lm.dtype)[None])[0].float()
    return [lm.tokenizer.decode([i]) for i in logits.topk(k).indices.tolist()]


def find_values(lm: LM, concept: str, hp: FFNPromoteHParams, scorer=None) -> list[dict]:
    """The ``n_values`` values of ``hp.layers`` that promote ``concept`` most and whose top
    tokens are not toxic: dicts with ``layer``, ``index``, ``score``, ``tokens``."""
    from ..applications.toxicity import get_scorer

    layers = hp.layers or tuple(range(lm.n_layers // 2, lm.n_layers))
    ids = concept_token_ids(lm, concept)
    cands = []
    for layer in layers:
        s = concept_scores(lm, layer, ids)
        top = s.topk(min(hp.n_candidates, len(s)))
        cands += [(float(v), layer, int(i)) for v, i in zip(top.values, top.indices)]
    cands = sorted(cands, reverse=True)[: hp.n_candidates]
    rows = [
        {"layer": l, "index": i, "score": v, "tokens": value_top_tokens(lm, l, i, hp.top_tokens)}
        for v, l, i in cands
    ]
    tox = get_scorer(scorer or "profanity-check")([" ".join(r["tokens"]) for r in rows])
    for r, t in zip(rows, tox):
        r["toxicity"] = t
    return [r for r in rows if r["toxicity"] < hp.max_toxicity][: hp.n_values]


def _chosen(lm: LM, requests: list[EditRequest], hp: FFNPromoteHParams) -> list[dict]:
    chosen = []
    for r in requests:
        values = r.extra.get("values")
        if values is not None:
            for layer, index in values:
                if not (0 <= int(layer) < lm.n_layers and 0 <= int(index) < lm.d_mlp):
                    raise ValueError(f"value ({layer}, {index}) is outside the model")
                chosen.append({"layer": int(layer), "index": int(index)})
        else:
            chosen += find_values(lm, r.target_new, hp)
    if not chosen:
        raise ValueError("no value to promote (every candidate was filtered out)")
    return chosen


def set_activations(hooks: Hooks, lm: LM, values: list[dict], coef: float) -> None:
    """Hooks setting the activation (the ``mlp_out`` input) of each value to ``coef`` at
    every position (``set_value_activations`` of the authors' code)."""
    per_layer: dict[int, list[int]] = {}
    for v in values:
        per_layer.setdefault(v["layer"], []).append(v["index"])
    for layer, idx in sorted(per_layer.items()):
        index = torch.tensor(sorted(set(idx)), device=lm.device_of("mlp_out", layer))

        def fn(x, index=index):
            x = x.clone()
            x[..., index] = coef
            return x

        hooks.edit_input(lm.module("mlp_out", layer), fn)


def _no_weights(lm: LM, hp) -> list[str]:
    return []


@register("ffn-promote", FFNPromoteHParams, _no_weights)
def apply_ffn_promote(lm: LM, requests: list[EditRequest], hp: FFNPromoteHParams) -> dict:
    """FFN concept promotion: fix chosen value activations (Geva et al., 2022)."""
    values = _chosen(lm, requests, hp)
    hooks = Hooks()
    set_activations(hooks, lm, values, hp.coef)
    return {"values": values, "coef": hp.coef, "undo": hooks.remove}
