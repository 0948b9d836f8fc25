"""IKE: in-context knowledge editing (Zheng et al., 2023, "Can We Edit Factual Knowledge
by In-Context Learning?"), as EasyEdit runs it.

IKE changes no weight and trains nothing. Every input ``x`` is answered with a prompt that
holds ``k`` *demonstrations* retrieved from a training pool, then the new fact, then ``x``:

    C = d_1 … d_k ⊕ "New Fact: {prompt} {target_new}\\nPrompt: " ⊕ x                (IKE)

Each training record gives three demonstrations (paper §3.2; EasyEdit
``models/ike/util.py``, ``encode_ike_facts``), all of the form
``"New Fact: {f}\\nPrompt: {p} {a}\\n\\n"`` with ``f`` the record's edit and its new answer:

* **copy**: ``p`` is the edit prompt, ``a`` its new answer (repeat the fact);
* **update**: ``p`` is a paraphrase, ``a`` the new answer (use the fact);
* **retain**: ``p`` is an unrelated prompt, ``a`` its own answer (ignore the fact).

The demonstrations are the ``k`` nearest to ``"New Fact: {f}\\nPrompt: {prompt}\\n\\n"``
by cosine similarity of sentence embeddings (EasyEdit: all-MiniLM-L6-v2 and
``util.semantic_search``; ``k = 16`` in its GPT-2 XL / GPT-J configurations, 32 in the
paper). Here no sentence encoder is downloaded: the embedding is the untouched base
model's residual stream after ``layer``, mean-pooled over the tokens (first one left out),
and the pool is zsRE training records (:func:`medit_lite.training.training_requests`).
The pool's embeddings are computed once and cached under ``$MEDIT_CACHE``.

IKE has no scope classifier: *every* input gets the demonstrations and the fact (the
retain demonstrations teach the model to leave unrelated prompts alone), so locality
depends on the model's in-context skill. With several facts stored (``sequential=True``
or a batch), each input gets the stored fact whose prompt is nearest to it by the same
embedding (EasyEdit edits one fact per prompt; this choice is this package's).
The prompt is applied inside the model's forward pass by
:mod:`medit_lite.context_routing`, so every metric and ``lm.generate`` see it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..context_routing import Route, add_policy, context_ids, router_of, token_states
from ..editing import register
from ..models import LM
from ..requests import EditRequest
from ..training import cache_key, trained_path, training_requests


@dataclass(frozen=True)
class IkeHParams:
    """Hyperparameters of IKE (EasyEdit's defaults where they carry over)."""

    k: int = 16  # demonstrations per edit (EasyEdit gpt2-xl.yaml / gpt-j-6B.yaml)
    pool_records: int = 1000  # zsRE training records in the demonstration pool (x3 demos)
    layer: int | None = (
        None  # layer of the retrieval embedding; None = 8/30 of the depth (as SERAC)
    )
    seed: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> IkeHParams:
        return cls()

    def layer_of(self, lm: LM) -> int:
        return round(lm.n_layers * 8 / 30) if self.layer is None else self.layer

    def validate(self, lm: LM) -> None:
        for name in ("k", "pool_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hyperparameter {name} must be a positive integer")
        if self.layer is not None and not (
            isinstance(self.layer, int) and 0 <= self.layer < lm.n_layers
        ):
            raise ValueError(f"layer {self.layer} is outside the model's {lm.n_layers} layers")


def new_fact(request: EditRequest) -> str:
    return f"{request.text} {request.target_new}"


def demonstrations(request: EditRequest) -> list[str]:
    """The copy, update and retain demonstrations of one training record."""
    fact = new_fact(request)
    out = [f"New Fact: {fact}\nPrompt: {fact}\n\n"]
    if request.paraphrases:
        out.append(f"New Fact: {fact}\nPrompt: {request.paraphrases[0]} {request.target_new}\n\n")
    for probe in request.neighborhood[:1]:
        out.append(f"New Fact: {fact}\nPrompt: {probe.prompt} {probe.answer}\n\n")
    return out


def embed(lm: LM, texts: list[str], layer: int) -> torch.Tensor:
    """Unit-norm mean-pooled base-model states (the stand-in for a sentence encoder)."""
    pooled = torch.stack([h.mean(0) for h in token_states(lm, texts, layer)])
    return torch.nn.functional.normalize(pooled, dim=-1)


_POOLS: dict[tuple, tuple[list[str], torch.Tensor]] = {}


def demo_pool(lm: LM, hp: IkeHParams) -> tuple[list[str], torch.Tensor]:
    """The demonstration sentences and their embeddings (cached on disk and in memory)."""
    from safetensors.torch import load_file, save_file

    layer = hp.layer_of(lm)
    memo = (id(lm.model), hp.pool_records, layer)
    if memo in _POOLS:
        return _POOLS[memo]
    data = training_requests(limit=hp.pool_records)
    sentences = [d for r in data for d in demonstrations(r)]
    path = trained_path("ike", cache_key(lm, data, {"layer": layer, "pool": "v1"}))
    if path.exists():
        emb = load_file(str(path))["embeddings"]
    else:
        emb = embed(lm, sentences, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"embeddings": emb.contiguous()}, str(tmp))
        tmp.replace(path)
    _POOLS[memo] = (sentences, emb)
    return sentences, emb


def ike_context(lm: LM, request: EditRequest, hp: IkeHParams) -> str:
    """The demonstrations and the new fact that IKE puts in front of every input."""
    sentences, emb = demo_pool(lm, hp)
    query = f"New Fact: {new_fact(request)}\nPrompt: {request.text}\n\n"
    q = embed(lm, [query], hp.layer_of(lm))
    top = (emb @ q[0]).topk(min(hp.k, len(sentences))).indices.tolist()
    # EasyEdit joins the hits best first, then the new fact and the prompt
    return "".join(sentences[i] for i in top) + f"New Fact: {new_fact(request)}\nPrompt: "


@dataclass(eq=False)
class _Fact:
    key: torch.Tensor  # embedding of the edit prompt
    context: tuple[int, ...]
    text: str


class IkeMemory:
    """The stored facts and their contexts; routes every input (``g = 1``)."""

    name = "ike"

    def __init__(self, lm: LM, hp: IkeHParams):
        self.lm, self.hp = lm, hp
        self.layer = hp.layer_of(lm)
        self.facts: list[_Fact] = []

    def add(self, requests: list[EditRequest]) -> list[_Fact]:
        keys = embed(self.lm, [r.text for r in requests], self.layer)
        new = [
            _Fact(k, context_ids(self.lm, ike_context(self.lm, r, self.hp)), r.text)
            for k, r in zip(keys, requests)
        ]
        self.facts += new
        return new

    def route(self, prompts, states) -> list:
        if not self.facts:
            return [None] * len(prompts)
        keys = torch.stack([f.key for f in self.facts])
        queries = torch.nn.functional.normalize(torch.stack([h.mean(0) for h in states]), dim=-1)
        best, index = (queries @ keys.to(queries.device).T).max(-1)
        return [
            Route(self.facts[k].context, 1.0, self.name, k, v)
            for v, k in zip(best.tolist(), index.tolist())
        ]


def _memory(lm: LM) -> IkeMemory | None:
    router = router_of(lm)
    return next((p for p in (router.policies if router else ()) if isinstance(p, IkeMemory)), None)


@register("ike", IkeHParams, lambda lm, hp: [])
def apply_ike(lm: LM, requests: list[EditRequest], hp: IkeHParams) -> dict:
    """IKE (Zheng et al., 2023): retrieved copy/update/retain demonstrations and the new
    fact in front of every input; no weight changes, no training."""
    memory = _memory(lm)
    if memory is not None and memory.hp != hp:
        raise ValueError("an IKE memory with other hyperparameters is installed; restore it first")
    if memory is None:
        memory = IkeMemory(lm, hp)
        facts = memory.add(requests)
        memory.uninstall = add_policy(lm, memory)
    else:
        facts = memory.add(requests)

    def undo() -> None:
        memory.facts = [f for f in memory.facts if f not in facts]
        if not memory.facts:
            memory.uninstall()

    return {
        "undo": undo,
        "context_tokens": [len(f.context) for f in facts],
        "bytes_added": sum(f.key.numel() * 4 + len(f.context) * 8 for f in facts),
    }
