"""Context routing: answer some inputs with an edit written into the prompt.

SERAC (Mitchell et al., 2022), natural-language patches (Murty et al., 2022) and IKE
(Zheng et al., 2023) never change a weight. They change what the model *reads*: for an
input ``x`` they pick a piece of text ``c`` (a stored edit, a patch's consequence, IKE's
demonstrations and new fact) and a weight ``g`` in [0, 1], and answer with

    P(y | x) = g · P_base(y | c ⊕ x) + (1 − g) · P_base(y | x)                 (routing)

SERAC's hard scope decision is ``g ∈ {0, 1}`` (its paper's test-time rule), NL patches'
soft patching is the gate's probability ``g``, IKE uses ``g = 1`` for every input. This
module is that mechanism, shared by the three methods.

**How it reaches every metric and ``lm.generate``.** :class:`ContextRouter` replaces the
HF model's ``forward`` by a wrapper (an instance attribute over the class method, the
original's signature kept with :func:`functools.wraps`, so ``generate`` prepares the same
inputs). Every forward pass first runs the untouched model; then, per row of the batch,
the installed *policies* decide ``(c, g)`` from the row's **prompt**; rows with ``g > 0``
are run again with ``c``'s tokens in front of their own, and their logits are mixed in at
the row's own positions. Removing the router (:meth:`ContextRouter.uninstall`) deletes the
instance attribute, so the model is exactly what it was.

**Where the prompt ends.** A scope decision made on prompt + target would peek at the
answer being scored. Three cases:

* teacher-forced scoring (:func:`medit_lite.metrics.pair_logits`: right-padded
  prompt + target rows) announces each row's prompt length with :func:`prompt_lengths`
  (a context variable), and only those tokens are shown to the policies;
* ``generate`` (left-padded prompts, then one token at a time with a KV cache): the first
  call holds exactly the prompts, so the decision is made there and stored on the cache
  object; the later, incremental calls reuse it and append the new tokens to each row's
  history, and routed rows are recomputed in full with the context in front
  (O(n²) in the generated length, fine for short answers);
* any other forward call (``lm.model(**lm.tokenize(texts))``): the whole row is the prompt.

Decisions of the last full forward are kept in :attr:`ContextRouter.last_routes` so that
tests and the book can see which rows were routed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from .hooks import Hooks
from .models import LM
from .replay import cache_keyword, final_hidden, record_kv

_PROMPT_LENGTHS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "medit_prompt_lengths", default=None
)


@contextlib.contextmanager
def prompt_lengths(lengths: Sequence[int]):
    """Tell routed forward passes in this block how many tokens of each row are prompt."""
    token = _PROMPT_LENGTHS.set([int(n) for n in lengths])
    try:
        yield
    finally:
        _PROMPT_LENGTHS.reset(token)


@dataclass(frozen=True)
class Route:
    """One row's routing: the context tokens to put in front, and the weight ``g``."""

    context: tuple[int, ...]
    weight: float = 1.0
    source: str = ""  # which policy decided (for inspection)
    index: int = -1  # which stored item (edit, patch) was retrieved
    score: float = float("nan")  # the policy's score for it (similarity, gate)


class Policy(Protocol):
    """What a method installs: ``layer`` whose hidden states it needs (or None) and
    ``route(prompts, states) -> [Route | None]``, one entry per row; ``prompts`` are the
    rows' prompt token ids, ``states`` their hidden states after ``layer`` (see
    :func:`prompt_states`)."""

    name: str
    layer: int | None

    def route(self, prompts: list[list[int]], states: list[torch.Tensor] | None) -> list: ...


# -- hidden states of the untouched model ---------------------------------------------
def base_forward(lm: LM):
    """The model's own forward, bypassing an installed router."""
    router = _ROUTERS.get(lm.model)
    return router.base_forward if router is not None else lm.model.forward


def prompt_states(hidden: torch.Tensor, positions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per row, float32 ``hidden[i, positions[i]]`` without the row's first token.

    The first position of a causal LM is an attention sink with outsized activations;
    a one-token prompt keeps it (there is nothing else).
    """
    rows = []
    for i, pos in enumerate(positions):
        pos = pos[1:] if len(pos) > 1 else pos
        rows.append(hidden[i, pos.to(hidden.device)].float())
    return rows


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


@torch.no_grad()
def token_states(
    lm: LM, texts: Sequence[str], layer: int, batch_size: int = 64
) -> list[torch.Tensor]:
    """Residual stream after ``layer`` of the *unedited* model at each token of each text
    (first token left out), float32 ``[n_tokens, d]`` per text.

    The forward pass stops after ``layer`` (the layers above it are not needed).
    """
    out: list[torch.Tensor] = []
    forward = base_forward(lm)
    block = lm.module("layer", layer)
    for start in range(0, len(texts), batch_size):
        batch = lm.tokenize(list(texts[start : start + batch_size]))
        seen: list[torch.Tensor] = []

        def stop(module, inputs, output, seen=seen):
            seen.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = block.register_forward_hook(stop)
        try:
            forward(**batch, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        positions = [torch.nonzero(m).flatten() for m in batch["attention_mask"]]
        out += [t.cpu() for t in prompt_states(seen[0], positions)]
    return out


# -- the router --------------------------------------------------------------------------
@dataclass
class _RowState:
    routes: list
    history: list[torch.Tensor]


@dataclass
class ContextRouter:
    """The wrapper around one model's forward that applies the policies' routes."""

    lm: LM
    policies: list = field(default_factory=list)
    last_routes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        model = self.lm.model
        self._had_own_forward = "forward" in model.__dict__
        self._own_forward = model.__dict__.get("forward")
        self.base_forward = model.forward

        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        self.forward = functools.wraps(self.base_forward)(forward)

    # -- install / remove --------------------------------------------------------------
    def install(self) -> None:
        object.__setattr__(self.lm.model, "forward", self.forward)
        _ROUTERS[self.lm.model] = self

    def uninstall(self) -> None:
        model = self.lm.model
        if self._had_own_forward:
            object.__setattr__(model, "forward", self._own_forward)
        else:
            object.__delattr__(model, "forward")
        _ROUTERS.pop(model, None)

    # -- deciding ----------------------------------------------------------------------
    def _layers(self) -> list[int]:
        return sorted({p.layer for p in self.policies if p.layer is not None})

    def decide(self, prompts: list[list[int]], states: dict[int, list[torch.Tensor]]) -> list:
        """Per row, the route with the largest weight over the policies (None = base)."""
        best: list = [None] * len(prompts)
        for policy in self.policies:
            routes = policy.route(prompts, states.get(policy.layer))
            for i, r in enumerate(routes):
                if (
                    r is not None
                    and r.weight > 0
                    and (best[i] is None or r.weight >= best[i].weight)
                ):
                    best[i] = r
        return best

    # -- the wrapped forward -------------------------------------------------------------
    def _forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self.policies or input_ids is None or args:
            return self.base_forward(input_ids, attention_mask, *args, **kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = mask[:, -input_ids.shape[1] :]
        if past == 0:
            with Hooks() as h:
                boxes = {k: h.capture_output(self.lm.module("layer", k)) for k in self._layers()}
                out = self.base_forward(input_ids, attention_mask, **kwargs)
            state = self._first_call(input_ids, mask, boxes)
            if cache is not None:
                cache._medit_routes = state
        else:
            out = self.base_forward(input_ids, attention_mask, **kwargs)
            state = getattr(cache, "_medit_routes", None)
            if state is None:
                return out
            for i in range(input_ids.shape[0]):
                state.history[i] = torch.cat([state.history[i], input_ids[i][mask[i].bool()]])
        if any(r is not None for r in state.routes):
            out.logits = self._mix(out.logits, input_ids, mask, state, past == 0)
        return out

    def _first_call(self, input_ids, mask, boxes) -> _RowState:
        positions = [torch.nonzero(m).flatten() for m in mask]
        rows = [input_ids[i, p] for i, p in enumerate(positions)]
        lengths = _PROMPT_LENGTHS.get()
        if lengths is None or len(lengths) != len(rows):
            lengths = [len(r) for r in rows]
        lengths = [max(1, min(n, len(r))) for n, r in zip(lengths, rows)]
        states = {
            k: prompt_states(box.value, [p[:n] for p, n in zip(positions, lengths)])
            for k, box in boxes.items()
        }
        prompts = [r[:n].tolist() for r, n in zip(rows, lengths)]
        routes = self.decide(prompts, states)
        self.last_routes = routes
        return _RowState(routes, rows)

    def _mix(self, logits, input_ids, mask, state: _RowState, first: bool):
        """Replace / mix the logits of routed rows with the in-context run's."""
        routed = [i for i, r in enumerate(state.routes) if r is not None]
        seqs = [list(state.routes[i].context) + state.history[i].tolist() for i in routed]
        # only the positions after the context are mixed in: the logits start there
        ctx_logits = _run(self, seqs, [len(state.routes[i].context) for i in routed])
        logits = logits.clone()
        width = logits.shape[1]
        for j, i in enumerate(routed):
            route, hist_len = state.routes[i], len(state.history[i])
            if first:  # every kept logit position that holds a real token
                cols = torch.arange(input_ids.shape[1] - width, input_ids.shape[1])
                real = mask[i, cols].bool().cpu()
                cols = cols[real]
                ranks = torch.cumsum(mask[i].cpu(), 0)[cols] - 1
            else:  # the newest tokens of the history
                n = int(mask[i].sum())
                cols = torch.arange(input_ids.shape[1] - n, input_ids.shape[1])
                cols = cols[cols >= input_ids.shape[1] - width]
                ranks = hist_len - (input_ids.shape[1] - cols)
            dest = cols - (input_ids.shape[1] - width)
            new = ctx_logits[j][ranks.to(ctx_logits[j].device)]
            logits[i, dest.to(logits.device)] = _blend(
                logits[i, dest.to(logits.device)], new, route.weight
            )
        return logits


def _blend(base: torch.Tensor, new: torch.Tensor, g: float) -> torch.Tensor:
    """``log(g·softmax(new) + (1−g)·softmax(base))``; exactly ``new`` when g = 1."""
    if g >= 1.0:
        return new.to(base.dtype)
    mixed = torch.logaddexp(
        torch.log_softmax(new.float(), -1) + math.log(g),
        torch.log_softmax(base.float(), -1) + math.log(1.0 - g),
    )
    return mixed.to(base.dtype)


def _run(
    router: ContextRouter, seqs: list[list[int]], starts: list[int], batch_size: int = 16
) -> list[torch.Tensor]:
    """Logits of the untouched model on each token sequence, from position ``starts[i]``
    of sequence ``i`` on (its context is ``seqs[i][:starts[i]]``).

    Sequences that share a context share its computation: the context runs once, and
    its keys and values serve every sequence's own tokens (right-padded batches), so a
    probe pays for its own few tokens, not for IKE's hundreds of demonstration tokens
    again; the vocabulary projection runs only at the positions returned."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (s, b) in enumerate(zip(seqs, starts)):
        groups.setdefault(tuple(s[:b]), []).append(i)
    for context, members in groups.items():
        prefix = _context_kv(router, list(context))
        for first in range(0, len(members), batch_size):
            chunk = members[first : first + batch_size]
            tails = [seqs[i][len(context) :] for i in chunk]
            for i, logits in zip(chunk, _run_after(router, prefix, len(context), tails)):
                out[i] = logits
    return out


def _context_kv(router: ContextRouter, context: list[int]):
    """Per layer, the keys and values of ``context`` ([1, heads, len, head_dim]), or None
    for an empty context."""
    if not context:
        return None
    lm = router.lm
    with record_kv(lm) as kv:
        final_hidden(
            lm,
            forward=router.base_forward,
            input_ids=torch.tensor([context], device=lm.device),
            use_cache=False,
        )
    return [(rec.keys, rec.values) for rec in kv]


def _run_after(router: ContextRouter, prefix, n_prefix: int, tails: list[list[int]]):
    """Logits of each token list in ``tails`` read after the cached ``prefix``."""
    lm = router.lm
    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(tails), n_prefix + width), dtype=torch.long)
    mask[:, :n_prefix] = 1
    for row, t in enumerate(tails):
        ids[row, : len(t)] = torch.tensor(t)
        mask[row, n_prefix : n_prefix + len(t)] = 1
    inputs = {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
    if prefix is None:
        inputs["attention_mask"] = inputs["attention_mask"][:, n_prefix:]
        normed = final_hidden(lm, forward=router.base_forward, use_cache=False, **inputs)
    else:
        cache = DynamicCache(config=lm.model.config)
        for j, (keys, values) in enumerate(prefix):
            shape = (len(tails), *keys.shape[1:])
            cache.update(keys.expand(shape), values.expand(shape), j)
        positions = torch.arange(n_prefix, n_prefix + width, device=lm.device)[None]
        normed = final_hidden(
            lm,
            forward=router.base_forward,
            position_ids=positions.expand(len(tails), -1),
            use_cache=True,
            **{cache_keyword(lm): cache},
            **inputs,
        )
    rows = torch.cat([torch.full((len(t),), r) for r, t in enumerate(tails)])
    cols = torch.cat([torch.arange(len(t)) for t in tails])
    flat = lm.module("unembed")(normed[rows.to(normed.device), cols.to(normed.device)])
    return flat.split([len(t) for t in tails])


_ROUTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def router_of(lm: LM) -> ContextRouter | None:
    """The router installed on ``lm``, if any."""
    return _ROUTERS.get(lm.model)


def add_policy(lm: LM, policy) -> callable:
    """Install ``policy`` (and the router when it is the first); returns its undo."""
    router = _ROUTERS.get(lm.model)
    if router is None:
        router = ContextRouter(lm)
        router.install()
    router.policies.append(policy)

    def undo() -> None:
        if policy in router.policies:
            router.policies.remove(policy)
        if not router.policies and _ROUTERS.get(lm.model) is router:
            router.uninstall()

    return undo


#: The in-context form of an edited fact used by SERAC's counterfactual model and the NL
#: patches' interpreter: EasyEdit's IKE / PROMPT format ("New Fact: ...\nPrompt: ..."),
#: with one copy demonstration of the fact itself first. On 50 records (10 built-in
#: facts, 40 CounterFact) the default model then prefers the new object on 98% of edit
#: prompts and 90% of paraphrases (plain "{text} {target}.\n": 66% / 70%).
FACT_TEMPLATE = (
    "New Fact: {text} {target}.\nPrompt: {text} {target}.\n\nNew Fact: {text} {target}.\nPrompt: "
)


def fact_context(text: str, target: str, template: str = FACT_TEMPLATE) -> str:
    """The context text that states ``text target`` as a new fact."""
    return template.replace("{text}", text).replace("{target}", target)


def context_ids(lm: LM, text: str) -> tuple[int, ...]:
    """Token ids of a context text, to be put in front of a row (no special tokens)."""
    return tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
