"""Natural-language patches (Murty et al., EMNLP 2022), for factual edits of a causal LM.

A patch is a sentence "if *condition*, then *consequence*". A **gate** ``g(x, c)``
estimates whether the condition ``c`` holds for the input ``x``; an **interpreter** reads
the consequence ``q`` together with ``x``; the two are combined by *soft patching*
(paper, §2, Eq. 1):

    P(y | x, (c, q)) = g(x, c) · P(y | x, q) + (1 − g(x, c)) · P(y | x)          (soft patching)

and with several patches the most applicable one is used (paper, §2: the patch with the
largest ``g(x, c)``).

**Patches from edit requests.** For an :class:`~medit_lite.requests.EditRequest` the
condition is ``"the text is about {subject}"`` and the consequence is the edited fact,
``"{prompt with subject} {target_new}."``. So ``g`` decides *whether the input concerns the
edited subject* (a property of the input, as in the paper's patches "if the food is
described as bomb, ..."), and the interpreter decides what the consequence means for this
input: asked another question about the same subject, the model with the consequence in
context can still answer it.

**Gate.** The paper fine-tunes T5 to read ``x`` and ``c`` together (a cross-encoder).
A first version here did the same with the frozen base model (input and condition in one
prompt, a logistic head on the last-token state) and did not separate a paraphrase from an
unrelated prompt after training on 80 records. The gate is therefore a *token-matching*
classifier, the class of :mod:`medit_lite.methods.serac` trained on its own data: the
condition's token states (after layer ``gate_layer`` of the frozen model) are matched
against the input's, ``g = σ(α (sim(c, x) − β))``; the learned token weights let the
subject's tokens decide, as the condition is "the text is about <subject>". It reads the
hidden states of the model's own forward pass, so a gate costs no extra pass. It is trained
(:mod:`medit_lite.training`, seeded, cached, SERAC's balanced BCE) on pairs generated from
zsRE training records and their relation templates (each record's question with ``{}``
for the subject):

* condition true: the record's question, its rephrase, and *another record's question
  template filled with this subject* (same subject, other relation);
* condition false: the unrelated NQ question, *this record's template filled with another
  record's subject* (same relation, other subject), and another record's rephrase.

**Interpreter.** The paper fine-tunes the interpreter on synthetic patches; here it is
the untouched base model with the consequence in context (``"{q}\\n"`` in front of the
input), as for SERAC's counterfactual model (:mod:`medit_lite.context_routing` applies the
mixture inside the forward pass, so every metric and ``lm.generate`` see it). Inputs with
``g`` below ``min_gate`` skip the second pass (their mixture differs from the base
distribution by less than ``min_gate``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..context_routing import (
    Route,
    add_policy,
    context_ids,
    fact_context,
    router_of,
    token_states,
)
from ..editing import register
from ..models import LM
from ..requests import EditRequest
from ..training import (
    TrainLog,
    cache_key,
    load_or_train,
    train,
    trained_path,
    training_requests,
)
from .serac import ScopeClassifier, balanced_bce


def condition(request: EditRequest) -> str:
    return f"the text is about {request.subject}"


def consequence(request: EditRequest) -> str:
    return f"{request.text} {request.target_new}."


def patch_text(request: EditRequest) -> str:
    """The patch as a sentence, "If c, then q"."""
    return f"If {condition(request)}, then {consequence(request)}"


@dataclass(frozen=True)
class NlPatchHParams:
    """Hyperparameters of natural-language patches (gate training on zsRE train)."""

    gate_layer: int | None = None  # layer whose token states the gate reads; None = 8/30
    proj_dim: int = 256
    train_records: int = 200
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    min_gate: float = 1e-3  # below it the input is answered by the base model alone

    @classmethod
    def for_model(cls, lm: LM) -> NlPatchHParams:
        return cls()

    def layer_of(self, lm: LM) -> int:
        return round(lm.n_layers * 8 / 30) if self.gate_layer is None else self.gate_layer

    def validate(self, lm: LM) -> None:
        if self.gate_layer is not None and not (
            isinstance(self.gate_layer, int) and 0 <= self.gate_layer < lm.n_layers
        ):
            raise ValueError(
                f"gate_layer {self.gate_layer} is outside the model's {lm.n_layers} layers"
            )
        for name in ("train_records", "steps", "batch_size", "proj_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hyperparameter {name} must be a positive integer")
        if self.lr <= 0:
            raise ValueError("hyperparameter lr must be positive")
        if not 0.0 <= self.min_gate < 1.0:
            raise ValueError("hyperparameter min_gate must be in [0, 1)")

    def training_part(self) -> dict:
        keep = ("train_records", "steps", "batch_size", "lr", "seed", "proj_dim")
        return {k: getattr(self, k) for k in keep}


class Gate(ScopeClassifier):
    """The gate ``g(x, c) = σ(α (sim(c, x) − β))``: token matching of the condition against
    the input (the classifier class of :mod:`medit_lite.methods.serac`, trained apart)."""


def gate_pairs(requests: list[EditRequest], seed: int) -> tuple[list[str], list[str], list[float]]:
    """Per record, (input, label) pairs for its condition, from the records' templates."""
    rng = random.Random(seed)
    n, inputs, labels = len(requests), [], []
    for i, r in enumerate(requests):
        other = requests[(i + rng.randrange(1, n)) % n]
        true = [r.text, r.paraphrases[0], other.prompt.replace("{}", r.subject)]
        false = [r.neighborhood[0].prompt, r.prompt.replace("{}", other.subject)]
        false.append(other.paraphrases[0])
        inputs += true + false
        labels += [1.0] * len(true) + [0.0] * len(false)
    return [condition(r) for r in requests], inputs, labels


PAIRS_PER_RECORD = 6


def fit_gate(lm: LM, gate: Gate, data: list[EditRequest], hp: NlPatchHParams) -> TrainLog:
    """Token states once, then the balanced BCE on each record's own pairs (the other
    records' inputs, about other subjects, are negatives too)."""
    conditions, inputs, labels = gate_pairs(data, hp.seed)
    cond_states = token_states(lm, conditions, gate.layer)
    input_states = token_states(lm, inputs, gate.layer)
    every = torch.cat(cond_states + input_states)
    gate.mean.copy_(every.mean(0))
    gate.std.copy_(every.std(0).clamp(min=1e-6))
    y = torch.tensor(labels)
    index = {id(r): i for i, r in enumerate(data)}
    per = PAIRS_PER_RECORD

    def loss_fn(batch):
        idx = [index[id(r)] for r in batch]
        rows = [i * per + k for i in idx for k in range(per)]
        logits = gate.logits(
            gate.encode([cond_states[i] for i in idx]), gate.encode([input_states[j] for j in rows])
        )  # [B, B * per]
        own = torch.zeros_like(logits, dtype=torch.bool)
        for b in range(len(idx)):
            own[b, b * per : (b + 1) * per] = True
        target = torch.zeros_like(logits)
        target[own] = y[rows].to(logits.device)
        acc = float(((logits[own] > 0).float() == target[own]).float().mean())
        return balanced_bce(logits.flatten(), target.flatten()), {"acc": acc}

    return train(
        gate,
        loss_fn,
        data,
        steps=hp.steps,
        batch_size=min(hp.batch_size, len(data)),
        lr=hp.lr,
        seed=hp.seed,
        desc="NL-patch gate",
    )


def is_trained(lm: LM, hp: NlPatchHParams | None = None) -> bool:
    """Whether the gate for ``lm`` and ``hp`` is already in the cache (no training)."""
    hp = hp or NlPatchHParams.for_model(lm)
    data = [
        r for r in training_requests(limit=hp.train_records) if r.paraphrases and r.neighborhood
    ]
    key = cache_key(lm, data, {**hp.training_part(), "layer": hp.layer_of(lm), "gate": "match"})
    return trained_path("nl-patch", key).exists()


_TRAINED: dict[tuple, tuple[Gate, TrainLog]] = {}


def trained_gate(lm: LM, hp: NlPatchHParams | None = None, *, retrain: bool = False):
    """The trained gate for ``lm`` (cached on disk and in memory): ``(gate, train_log)``."""
    hp = hp or NlPatchHParams.for_model(lm)
    layer = hp.layer_of(lm)
    memo = (id(lm.model), str(lm.device), layer, tuple(sorted(hp.training_part().items())))
    if memo in _TRAINED and not retrain:
        return _TRAINED[memo]
    data = [
        r for r in training_requests(limit=hp.train_records) if r.paraphrases and r.neighborhood
    ]
    if len(data) < 2:
        raise ValueError("the NL-patch gate needs at least 2 training records")
    torch.manual_seed(hp.seed)
    gate = Gate(lm.d_model, hp.proj_dim, layer).to(lm.device)
    key = cache_key(lm, data, {**hp.training_part(), "layer": layer, "gate": "match"})
    log = load_or_train(
        gate, "nl-patch", key, lambda: fit_gate(lm, gate, data, hp), retrain=retrain
    )
    gate.requires_grad_(False)
    _TRAINED[memo] = (gate, log)
    return gate, log


def gate_scores(lm: LM, texts: list[str], requests: list[EditRequest], hp=None) -> torch.Tensor:
    """``g(x, c)`` for every text (rows) and every request's patch (columns)."""
    gate, _ = trained_gate(lm, hp)
    with torch.no_grad():
        conds = gate.encode(token_states(lm, [condition(r) for r in requests], gate.layer))
        xs = gate.encode(token_states(lm, texts, gate.layer))
        return torch.sigmoid(gate.logits(conds, xs)).T.cpu()


@dataclass(eq=False)
class _Patch:
    request: EditRequest
    context: tuple[int, ...]
    condition: torch.Tensor  # token states of the condition sentence


class PatchSet:
    """The installed patches and the soft-patching rule (a routing policy)."""

    name = "nl-patch"

    def __init__(self, lm: LM, gate: Gate, hp: NlPatchHParams):
        self.lm, self.gate, self.hp = lm, gate, hp
        self.layer = gate.layer
        self.patches: list[_Patch] = []

    def route(self, prompts, states) -> list:
        if not self.patches:
            return [None] * len(prompts)
        with torch.no_grad():
            conds = self.gate.encode([p.condition for p in self.patches])
            g = torch.sigmoid(self.gate.logits(conds, self.gate.encode(states))).T
        best, index = g.max(-1)
        return [
            Route(self.patches[k].context, v, self.name, k, v) if v >= self.hp.min_gate else None
            for v, k in zip(best.tolist(), index.tolist())
        ]


def _patchset(lm: LM) -> PatchSet | None:
    router = router_of(lm)
    return next((p for p in (router.policies if router else ()) if isinstance(p, PatchSet)), None)


@register("nl-patch", NlPatchHParams, lambda lm, hp: [])
def apply_nl_patch(lm: LM, requests: list[EditRequest], hp: NlPatchHParams) -> dict:
    """Natural-language patches (Murty et al., 2022): "if the text is about S, then
    <edited fact>", gated by a trained g(x, c), applied by soft patching."""
    gate, log = trained_gate(lm, hp)
    states = token_states(lm, [condition(r) for r in requests], gate.layer)
    patches = [
        _Patch(r, context_ids(lm, fact_context(r.text, r.target_new)), h)
        for r, h in zip(requests, states)
    ]
    patchset = _patchset(lm)
    if patchset is not None and patchset.hp != hp:
        raise ValueError("NL patches with other hyperparameters are installed; restore them first")
    if patchset is None:
        patchset = PatchSet(lm, gate, hp)
        patchset.uninstall = add_policy(lm, patchset)
    patchset.patches += patches

    def undo() -> None:
        patchset.patches = [p for p in patchset.patches if p not in patches]
        if not patchset.patches:
            patchset.uninstall()

    return {
        "undo": undo,
        "patches": [patch_text(r) for r in requests],
        "bytes_added": sum(len(p.context) * 8 for p in patches),
        "gate_bytes": gate.n_bytes,
        "train_seconds": log.seconds,
        "from_cache": log.from_cache,
    }
