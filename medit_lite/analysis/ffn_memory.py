"""Feed-forward layers as key-value memories (Geva et al., EMNLP 2021).

An FFN computes ``FF(x) = Σ_i m_i v_i``: a *memory coefficient* ``m_i`` for each of its
``d_mlp`` keys, times the key's *value* ``v_i`` (column ``i`` of the output matrix). In
Geva et al. ``m_i = ReLU(x · k_i)``; for Llama's gated MLP (SmolLM2) it is the input of the
output matrix, ``m = SiLU(W_gate x) ⊙ (W_up x)`` (``lm.module("mlp_out", l)``'s input), so
a coefficient can be negative: we rank by the signed coefficient, as the paper ranks by the
positive part. This module measures, layer by layer:

* **trigger examples** (§3.1): for every key, the corpus prefixes (a text up to and
  including one token) where its coefficient is largest;
* **what the values predict** (§4): ``p_i = softmax(E v_i)``, the value projected onto
  the vocabulary. Geva et al. apply the output embedding ``E`` directly (GPT-style models
  add no gain before it); Llama's residual stream is read through the final RMSNorm, whose
  gain ``γ`` reweights the dimensions, so here the projection is ``E (γ ⊙ v_i)`` (the
  norm's ``1/rms`` scalar changes no ranking; :func:`medit_lite.analysis.logit_lens`);
* **the agreement rate** (§4, Fig. 5): the share of keys whose value's top token is the
  token that follows the key's top trigger prefix in the corpus, against the same rate
  with values paired to random keys (chance);
* **shallow to semantic** (§3.2, Fig. 3): for sampled keys, the coefficient left when
  the last or the first token of the top trigger prefix is removed, relative to the full
  prefix, and the share of a key's top triggers that end in the same token. Geva et al.
  find lower layers keyed to the last token (shallow patterns) and upper layers less so
  (semantic patterns); their human annotation of patterns is replaced by these two
  automatic measures.

The corpus (:func:`corpus`) is offline: the WikiBio passages of
``hallucination_edit.json`` (GRACE's WikiBio set, split into sentences), then the
CounterFact edit prompts filled with their subjects, where those files are present; else
the package's built-in facts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..hooks import Hooks
from ..models import LM
from ..progress import progress
from ..requests import builtin_requests, shared_data


def corpus(max_sentences: int = 400, seed: int = 0) -> tuple[list[str], str]:
    """Sentences for the trigger search and a description of where they come from."""
    texts: list[str] = []
    sources = []
    wiki = shared_data("hallucination_edit.json")
    if wiki is not None:
        for rec in json.loads(wiki.read_text()):
            passage = re.sub(r"^This is a Wikipedia passage about [^.]*\.\s*", "", rec["prompt"])
            texts += [s for s in re.split(r"(?<=[.!?])\s+", passage) if len(s.split()) >= 5]
        sources.append("WikiBio passages (hallucination_edit.json)")
    cf = shared_data("counterfact_sample.json")
    if cf is not None:
        for rec in json.loads(cf.read_text()):
            rw = rec["requested_rewrite"]
            texts.append(rw["prompt"].replace("{}", rw["subject"]) + " " + rw["target_true"]["str"])
        sources.append("CounterFact prompts with their true answers")
    if not texts:
        texts = [f"{r.text} {r.target_true or r.target_new}" for r in builtin_requests()]
        sources.append("the built-in facts (no ../shared/data)")
    rng = random.Random(seed)
    texts = list(dict.fromkeys(texts))
    rng.shuffle(texts)
    return texts[:max_sentences], " + ".join(sources)


@dataclass
class Triggers:
    """The top-``k`` trigger prefixes of every key of every layer."""

    ids: list[list[int]]  # token ids of each corpus text
    values: torch.Tensor  # [layers, k, d_mlp] coefficients, descending
    text: torch.Tensor  # [layers, k, d_mlp] index of the text
    pos: torch.Tensor  # [layers, k, d_mlp] position of the prefix's last token

    def prefix(self, layer: int, key: int, rank: int = 0) -> list[int]:
        t, p = int(self.text[layer, rank, key]), int(self.pos[layer, rank, key])
        return self.ids[t][: p + 1]

    def next_token(self, layer: int, key: int, rank: int = 0) -> int | None:
        t, p = int(self.text[layer, rank, key]), int(self.pos[layer, rank, key])
        return self.ids[t][p + 1] if p + 1 < len(self.ids[t]) else None


@torch.no_grad()
def trigger_examples(lm: LM, texts: Sequence[str], k: int = 5, batch_size: int = 16) -> Triggers:
    """For every layer and key, the ``k`` (text, position) prefixes with the largest
    coefficient (one pass over the corpus, a running top-k per key)."""
    tok = lm.tokenizer
    ids = [tok(t)["input_ids"][:48] for t in texts]
    n_layers, d = lm.n_layers, lm.d_mlp
    best_v = torch.full((n_layers, k, d), -torch.inf)
    best_t = torch.zeros((n_layers, k, d), dtype=torch.long)
    best_p = torch.zeros((n_layers, k, d), dtype=torch.long)
    for start in progress(range(0, len(ids), batch_size), desc="trigger search"):
        chunk = ids[start : start + batch_size]
        width = max(map(len, chunk))
        batch = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):
            batch[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        with Hooks() as h:
            boxes = [h.capture_input(lm.module("mlp_out", j)) for j in range(n_layers)]
            lm.model(input_ids=batch.to(lm.device), attention_mask=mask.to(lm.device))
        rows, cols = torch.nonzero(mask, as_tuple=True)
        for j, box in enumerate(boxes):
            acts = box.value[rows.to(lm.device), cols.to(lm.device)].float().cpu()  # [N, d]
            v = torch.cat([best_v[j], acts])
            t = torch.cat([best_t[j], (rows + start)[:, None].expand(-1, d)])
            p = torch.cat([best_p[j], cols[:, None].expand(-1, d)])
            top = v.topk(k, dim=0)
            best_v[j], best_t[j] = top.values, t.gather(0, top.indices)
            best_p[j] = p.gather(0, top.indices)
    return Triggers(ids, best_v, best_t, best_p)


@torch.no_grad()
def value_top_tokens(lm: LM, layer: int, keys: Sequence[int], k: int = 10) -> torch.Tensor:
    """Token ids ``[len(keys), k]`` that the values of ``keys`` promote most,
    ``topk(E (γ ⊙ v_i))`` (γ: the final norm's gain, when it has one)."""
    w = lm.weight_out_in("mlp_out", layer)[:, list(keys)].T.float()  # [n, d_model]
    gain = getattr(lm.module("final_norm"), "weight", None)
    if gain is not None:
        w = w * gain.float()
    emb = lm.module("unembed").weight.float()
    out = []
    for chunk in w.split(128):
        out.append((chunk @ emb.T).topk(k, dim=-1).indices.cpu())
    return torch.cat(out)


@dataclass
class FFNMemoryReport:
    """Per-layer results of :func:`ffn_memory`."""

    layers: list[int]
    corpus: str
    n_texts: int
    agreement: list[float]  # top-1 value token == next token of the top trigger
    agreement_top10: list[float]  # next token among the value's top 10
    agreement_random: list[float]  # the same with values of random keys (chance)
    keep_without_last: list[float]  # coefficient left after removing the last token
    keep_without_first: list[float]  # ... the first token
    same_last_token: list[float]  # share of top triggers ending in the top one's token
    examples: dict[int, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _coefficients(lm: LM, seqs: list[list[int]], layers: list[int], keys: list[int]):
    """Coefficient of key ``keys[i]`` of layer ``layers[i]`` at the last token of
    ``seqs[i]``: batched, sorted by layer, each batch stopped after the highest layer it
    needs."""
    out = torch.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: layers[i])
    tok = lm.tokenizer
    for start in range(0, len(order), 32):
        idx = order[start : start + 32]
        chunk = [seqs[i] for i in idx]
        width = max(map(len, chunk))
        batch = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):
            batch[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        needed = sorted({layers[i] for i in idx})
        with Hooks() as h:
            boxes = {j: h.capture_input(lm.module("mlp_out", j)) for j in needed}
            h.edit_output(lm.module("mlp_out", needed[-1]), _stop)
            try:
                lm.model(input_ids=batch.to(lm.device), attention_mask=mask.to(lm.device))
            except _Stop:
                pass
        for r, i in enumerate(idx):
            out[i] = float(boxes[layers[i]].value[r, len(seqs[i]) - 1, keys[i]])
    return out


class _Stop(Exception):
    pass


def _stop(x):
    raise _Stop


@torch.no_grad()
def ffn_memory(
    lm: LM,
    texts: Sequence[str] | None = None,
    keys_per_layer: int = 256,
    removal_keys: int = 8,
    k: int = 5,
    examples_per_layer: int = 3,
    seed: int = 0,
    triggers: Triggers | None = None,
) -> FFNMemoryReport:
    """The key-value measurements of Geva et al. (2021) on every layer of ``lm``.

    ``keys_per_layer`` keys per layer (a seeded sample) are scored for agreement and
    ``removal_keys`` of them for the token-removal test; ``texts`` defaults to
    :func:`corpus`.
    """
    source = "given texts"
    if texts is None:
        texts, source = corpus()
    texts = list(texts)
    if not texts:
        raise ValueError("the corpus is empty")
    trig = triggers or trigger_examples(lm, texts, k)
    rng = random.Random(seed)
    layers = list(range(lm.n_layers))
    rep = FFNMemoryReport(layers, source, len(texts), [], [], [], [], [], [])
    removal: list[tuple[int, int, list[int]]] = []
    for layer in progress(layers, desc="value projections"):
        keys = sorted(rng.sample(range(lm.d_mlp), min(keys_per_layer, lm.d_mlp)))
        keys = [
            i
            for i in keys
            if trig.next_token(layer, i) is not None and len(trig.prefix(layer, i)) > 2
        ]
        top = value_top_tokens(lm, layer, keys, 10)
        nxt = torch.tensor([trig.next_token(layer, i) for i in keys])
        rep.agreement.append(float((top[:, 0] == nxt).float().mean()))
        rep.agreement_top10.append(float((top == nxt[:, None]).any(1).float().mean()))
        shuffled = nxt[torch.randperm(len(nxt), generator=torch.Generator().manual_seed(seed))]
        rep.agreement_random.append(float((top[:, 0] == shuffled).float().mean()))
        last = trig.pos.new_tensor(
            [
                trig.ids[int(trig.text[layer, r, i])][int(trig.pos[layer, r, i])]
                for r in range(k)
                for i in keys
            ]
        )
        last = last.reshape(k, len(keys))
        rep.same_last_token.append(float((last[1:] == last[:1]).float().mean()))
        for i in keys[:removal_keys]:
            removal.append((layer, i, trig.prefix(layer, i)))
        ex = []
        for i in sorted(keys, key=lambda i: -float(trig.values[layer, 0, i]))[:examples_per_layer]:
            ex.append(
                {
                    "key": i,
                    "coefficient": float(trig.values[layer, 0, i]),
                    "triggers": [
                        lm.tokenizer.decode(trig.prefix(layer, i, r)[-8:]) for r in range(min(3, k))
                    ],
                    "next_token": lm.tokenizer.decode([trig.next_token(layer, i)]),
                    "value_tokens": [lm.tokenizer.decode([t]) for t in top[keys.index(i)].tolist()],
                }
            )
        rep.examples[layer] = ex
    lays = [r[0] for r in removal]
    ks = [r[1] for r in removal]
    full = _coefficients(lm, [r[2] for r in removal], lays, ks)
    no_last = _coefficients(lm, [r[2][:-1] for r in removal], lays, ks)
    no_first = _coefficients(lm, [r[2][1:] for r in removal], lays, ks)
    for layer in layers:
        sel = torch.tensor([j for j, x in enumerate(lays) if x == layer])
        denom = full[sel].clamp(min=1e-6)
        rep.keep_without_last.append(float((no_last[sel] / denom).clamp(-1, 2).mean()))
        rep.keep_without_first.append(float((no_first[sel] / denom).clamp(-1, 2).mean()))
    return rep


def plot_ffn_memory(report: FFNMemoryReport):
    """Two panels: agreement per layer against chance; the coefficient left after removing
    the last or the first token of the top trigger, and the same-last-token share."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = report.layers
    a.plot(x, report.agreement, "o-", label="top-1 value token = next token")
    a.plot(x, report.agreement_top10, "s-", label="next token in value's top 10")
    a.plot(x, report.agreement_random, "x--", color="gray", label="top-1, random pairing")
    a.set(xlabel="layer", ylabel="share of keys", title="key-value agreement")
    a.legend(fontsize=8)
    b.plot(x, report.keep_without_last, "o-", label="coefficient left, last token removed")
    b.plot(x, report.keep_without_first, "s-", label="coefficient left, first token removed")
    b.plot(x, report.same_last_token, "^-", label="top triggers ending in the same token")
    b.set(xlabel="layer", title="shallow (last token) to semantic patterns")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig
