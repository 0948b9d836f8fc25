"""CaliNet: find the facts a model gets wrong, then calibrate many at once (Dong et al., 2022).

Two parts, as in the paper (Findings of EMNLP 2022) and its code (``dqxiu/CaliNet``).

**1. Contrastive knowledge assessment (CKA, paper §2).** A model knows a fact ``(s, r, o)``
when it prefers the true object under the true relation to the same object under *wrong*
relations:

    CKA(s, r, o) = (P(o | s, r) + δ) / (E_{r' ∈ N(r)} P(o | s, r') + δ)                  (Eq. 1)

``P(o | s, r)`` is the probability of the object's first token after the prompt (the code's
``probe_t5`` reads the first target token), ``N(r)`` holds three negative relations (the code
averages over three "wrong" templates per relation, ``P_false /= 3``), and ``δ = 0.001``
smooths the ratio (``cka/assessing_reader.py``: ``(P_true+0.001)/(P_false+0.001)``). A fact
scores above 1 when the model knows it, at most 1 when it does not. The paper writes three
wrong templates by hand for each LAMA relation; here the negatives are the templates of
*other relations found in the same data* (CounterFact or ``known_1000``, which use the same
Wikidata relation ids), namely the three whose objects overlap most with this relation's
(Jaccard overlap of the object sets, ties by relation id; a relation whose usual template
the true relation also uses counts as a synonym and is skipped): for "was born in" that
picks "died in"-style relations with city objects, the paper's kind of negative (its P19
list starts with "[X] was died in [Y]"). Each relation's template is its most frequent one
in the data. A relation whose objects overlap no other's (continents) gets unrelated
negatives, and its facts score high easily: read its CKA with that in mind.

**2. Calibration memory slots (paper §3).** CaliNet adds a small FFN beside the FFN of one
layer, reading the same input ``x`` (after the pre-FFN norm) and adding to its output:

    FFN'(x) = FFN(x) + W_o^c σ(W_i^c x)                                                   (Eq. 2)

with ``d_c`` slots (``ex_size``), the model's own activation ``σ``; for a gated FFN like
Llama's (and T5 v1.1, the code's ``T5DenseGatedGeluDenseEx``) the slot FFN is gated too:
``W_o^c (σ(W_g^c x) ⊙ W_u^c x)``. The original weights stay frozen (the code's optimizer
gives every non-``ex`` parameter ``lr 0``). It is trained on **many facts at once**, each
stated with several templates of its relation (ParaRel paraphrases in the paper), with the
plain NLL of the object. Code defaults (``train_calinet/bash/t5_train_kb_f.sh``): 64 slots
for 100 facts, in the last decoder layer (``kb_layer 11`` of T5-base's 12), learning rate
1e-2 with Adafactor (constant schedule). Here: Adam (the project's training loop,
:mod:`medit_lite.training`) with lr 1e-2, 64 slots, the last layer. Two choices of this
implementation: the slots' output matrix starts at zero, so the model is unchanged before
training (the code keeps ``nn.Linear``'s random initialisation); and the paraphrases are the
*other templates of the same relation among the requests of the batch* (as ParaRel's are),
so that CounterFact's own paraphrase prompts stay held out for PS.

**As an editing method** (``calinet``): ``edit(lm, requests, "calinet")`` trains one slot set
on the whole batch; with ``sequential=True`` each edit adds its own slot set, trained on that
request alone (earlier sets stay frozen and active). The trained slots are cached under
``$MEDIT_CACHE`` (:func:`medit_lite.training.load_or_train`). Restoring removes the edit's
slot set, and with the last one the module and its hooks.

**Where it fails here.** Nothing in the objective tells the slots to stay silent on other
inputs (the paper checks afterwards that language modelling is preserved; it has no
locality term), and in the last layer they act at every position. Trained on one request
(sequential mode, or ``python -m medit_lite eval --method calinet``), a slot set learns to
push its target after *any* prompt: on two zsRE records its NS was 0.0 (20 steps). Trained
on many facts at once it must tell them apart, which keeps other inputs closer to the
original model, but the top-1 answers of other prompts still change
(``benchmarks/results/calinet.json``).

**A locality variant (this project's, not the paper's):** ``locality_weight = λ > 0`` adds

    L = NLL(calibration statements) + λ · KL(P_unedited(· | m) ‖ P_calibrated(· | m))

averaged over positions ``m`` of ordinary texts (``memory_texts``; by default the built-in
texts T-Patcher's memory uses, :func:`~medit_lite.methods.tpatcher.builtin_memory_texts`),
``locality_positions`` of them sampled per step. It is the KL locality term of MEND and
SERAC applied to the slots. With ``λ = 0`` (the default) the method is CaliNet as published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..editing import register
from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import LM
from ..positions import after_first_token
from ..requests import EditRequest

BANK_NAME = "calinet"  # child-module name of the slot bank inside the calibrated FFN
SMOOTH = 0.001  # δ of Eq. 1 (cka/assessing_reader.py)
GATED_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}  # families whose FFN is gated


# -- 1. contrastive knowledge assessment ---------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """A fact ``(subject, relation, object)`` with the prompt template that states it."""

    subject: str
    relation: str
    template: str  # with one "{}" for the subject; the object follows
    object: str

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)


def facts_from_known(records: Sequence[dict]) -> list[Fact]:
    """Facts of ROME's ``known_1000.json`` (its ``prompt`` contains the subject)."""
    out = []
    for r in records:
        if r["subject"] in r["prompt"]:
            template = r["prompt"].replace(r["subject"], "{}", 1)
            out.append(Fact(r["subject"], r["relation_id"], template, r["attribute"].strip()))
    return out


def facts_from_requests(requests: Sequence[EditRequest]) -> list[Fact]:
    """The *true* facts behind edit requests (``target_true``; requests without it skipped)."""
    return [
        Fact(r.subject, r.relation or "?", r.prompt, r.target_true)
        for r in requests
        if r.target_true is not None
    ]


def relation_templates(facts: Sequence[Fact]) -> dict[str, str]:
    """Each relation's most frequent template (ties: the first seen)."""
    counts: dict[str, Counter] = {}
    for f in facts:
        counts.setdefault(f.relation, Counter())[f.template] += 1
    return {rel: c.most_common(1)[0][0] for rel, c in counts.items()}


def negative_relations(facts: Sequence[Fact], k: int = 3) -> dict[str, list[str]]:
    """For each relation, the ``k`` other relations whose objects overlap most with its own
    (Jaccard overlap of object sets; ties broken by relation id). A relation whose usual
    template is also one of this relation's templates is a synonym, not a negative, and is
    left out."""
    objects: dict[str, set[str]] = {}
    own: dict[str, set[str]] = {}
    for f in facts:
        objects.setdefault(f.relation, set()).add(f.object.lower())
        own.setdefault(f.relation, set()).add(f.template)
    usual = relation_templates(facts)
    out = {}
    for rel, objs in objects.items():
        others = [r for r in objects if r != rel and usual[r] not in own[rel]]
        overlap = {r: len(objs & objects[r]) / len(objs | objects[r]) for r in others}
        out[rel] = sorted(others, key=lambda r: (-overlap[r], r))[:k]
    return out


@torch.no_grad()
def first_token_probs(
    lm: LM, prompts: Sequence[str], objects: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``P(first token of object | prompt)`` for each pair (next-token softmax at the
    prompt's last position)."""
    firsts = [encode_pair(lm, p, o)[1][0] for p, o in zip(prompts, objects)]
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = lm.tokenize(list(prompts[start : start + batch_size]))
        last = batch["attention_mask"].sum(1) - 1
        logits = lm.model(**batch).logits[torch.arange(len(last)), last].float()
        probs = torch.softmax(logits, -1)
        ids = torch.tensor(firsts[start : start + batch_size], device=probs.device)
        out.append(probs[torch.arange(len(ids)), ids].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def assess(
    lm: LM,
    facts: Sequence[Fact],
    templates: dict[str, str] | None = None,
    negatives: dict[str, list[str]] | None = None,
    k: int = 3,
) -> list[dict]:
    """CKA (Eq. 1) of each fact: one dict per fact with ``p_true``, ``p_false`` (mean over
    the negative relations' templates), ``score`` and ``known`` (``score > 1``).

    ``templates`` / ``negatives`` default to :func:`relation_templates` /
    :func:`negative_relations` of ``facts`` themselves.
    """
    facts = list(facts)
    if not facts:
        raise ValueError("assess needs at least one fact")
    templates = templates if templates is not None else relation_templates(facts)
    negatives = negatives if negatives is not None else negative_relations(facts, k)
    prompts, objects, owner = [], [], []
    for i, f in enumerate(facts):
        if not f.object.strip() or "{}" not in f.template:
            raise ValueError(f"fact {i}: needs an object and a template with '{{}}'")
        negs = negatives.get(f.relation, [])
        if not negs:
            raise ValueError(f"fact {i}: no negative relation for {f.relation!r}")
        for t in [f.template] + [templates[r] for r in negs]:
            prompts.append(t.replace("{}", f.subject))
            objects.append(f.object)
            owner.append(i)
    probs = first_token_probs(lm, prompts, objects)
    rows, pos = [], 0
    for f in facts:
        n = 1 + len(negatives[f.relation])
        p_true, p_false = float(probs[pos]), float(probs[pos + 1 : pos + n].mean())
        pos += n
        score = (p_true + SMOOTH) / (p_false + SMOOTH)
        rows.append(
            {
                "subject": f.subject,
                "relation": f.relation,
                "object": f.object,
                "prompt": f.prompt,
                "negatives": negatives[f.relation],
                "p_true": p_true,
                "p_false": p_false,
                "score": score,
                "known": score > 1,
            }
        )
    return rows


# -- 2. calibration memory slots ------------------------------------------------------------
@dataclass(frozen=True)
class CaliNetHParams:
    """Hyperparameters of CaliNet's calibration (defaults: the paper's code, see above)."""

    layer: int | None = None  # FFN to calibrate; None = the last (code: kb_layer 11 of 12)
    n_slots: int = 64  # d_c, calibration memory slots (code: ex_size 64)
    lr: float = 1e-2  # code: 1e-2 (Adafactor); here Adam
    steps: int = 300  # optimisation steps (code: up to 5000 at batch 512 × 4, on a GPU)
    batch_size: int = 32  # training prompts per step
    max_templates: int = 6  # training statements per fact: its prompt + other templates
    use_paraphrases: bool = False  # also train on the requests' own paraphrases
    init_std: float = 0.02  # std of the slots' input weights (output weights start at 0)
    seed: int = 0
    # This project's locality variant (0 = CaliNet as published, which has no such term):
    # weight of KL(unedited ‖ calibrated) over every position of ordinary texts.
    locality_weight: float = 0.0
    locality_positions: int = 64  # memory positions sampled per step (last layer)
    memory_texts: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # () = built-in
    # read trained slots from $MEDIT_CACHE when the same batch was calibrated before
    # (False: train every time, as the efficiency benchmark times an edit); not in the key
    use_cache: bool = True

    @classmethod
    def for_model(cls, lm: LM) -> CaliNetHParams:
        return cls()

    def validate(self, lm: LM) -> None:
        if self.layer is not None and not (
            isinstance(self.layer, int) and 0 <= self.layer < lm.n_layers
        ):
            raise ValueError(f"layer {self.layer} is outside the model's {lm.n_layers} layers")
        for name in ("n_slots", "steps", "batch_size", "max_templates"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hyperparameter {name} must be a positive integer")
        if not self.lr > 0:
            raise ValueError("hyperparameter lr must be positive")
        if not (isinstance(self.locality_weight, (int, float)) and self.locality_weight >= 0):
            raise ValueError("hyperparameter locality_weight must be a number >= 0")
        if not isinstance(self.locality_positions, int) or self.locality_positions < 1:
            raise ValueError("hyperparameter locality_positions must be a positive integer")
        if isinstance(self.memory_texts, str) or not all(
            isinstance(t, str) and t.strip() for t in self.memory_texts
        ):
            raise TypeError("hyperparameter memory_texts must be a tuple of non-empty strings")

    def texts_for_memory(self) -> list[str]:
        """The locality variant's ordinary texts: ``memory_texts``, or the project's built-in
        ones (those T-Patcher's memory uses)."""
        if self.memory_texts:
            return list(self.memory_texts)
        from .tpatcher import builtin_memory_texts

        return builtin_memory_texts()

    def layer_of(self, lm: LM) -> int:
        return lm.n_layers - 1 if self.layer is None else self.layer


def _activation(lm: LM):
    from transformers.activations import ACT2FN

    cfg = lm.model.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "gelu")
    return ACT2FN[name]


class Slots(nn.Module):
    """``n`` calibration slots: ``x -> W_o σ(W_g x) ⊙ (W_u x)`` (gated) or ``W_o σ(W_i x)``."""

    def __init__(self, d_model: int, n: int, gated: bool, act, init_std: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Parameter(torch.randn(n, d_model, generator=g) * init_std)
        self.gate = nn.Parameter(torch.randn(n, d_model, generator=g) * init_std) if gated else None
        self.out = nn.Parameter(torch.zeros(d_model, n))
        self.act = act
        self.muted = False  # while True the bank skips this set (the locality KL's reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.inp.dtype)
        if self.gate is not None:
            h = self.act(x @ self.gate.T) * (x @ self.inp.T)
        else:
            h = self.act(x @ self.inp.T)
        return h @ self.out.T

    @property
    def n_slots(self) -> int:
        return self.inp.shape[0]


class SlotBank(nn.Module):
    """Every slot set of one FFN; while attached it adds ``Σ slots(x)`` to ``FFN(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = nn.ModuleList()
        self._hooks = Hooks()
        self._x: torch.Tensor | None = None
        self._mlp = lambda: None

    @classmethod
    def of(cls, lm: LM, layer: int, create: bool = False) -> SlotBank | None:
        mlp = lm.module("mlp", layer)
        bank = mlp._modules.get(BANK_NAME)
        if bank is None and create:
            bank = cls()
            bank._mlp = weakref.ref(mlp)
            mlp.add_module(BANK_NAME, bank)
            bank._hooks.edit_input(mlp, bank._remember)
            bank._hooks.edit_output(mlp, bank._add)
        return bank

    def detach(self) -> None:
        self._hooks.remove()
        mlp = self._mlp()
        if mlp is not None and mlp._modules.get(BANK_NAME) is self:
            del mlp._modules[BANK_NAME]

    def remove(self, slots: Slots) -> None:
        for i, s in enumerate(self.sets):
            if s is slots:
                del self.sets[i]
                break
        if not len(self.sets):
            self.detach()

    def _remember(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return x

    def _add(self, out: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None or not len(self.sets):
            return out
        return out + self(x).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [s for s in self.sets if not s.muted]
        return sum(s(x) for s in active) if active else torch.zeros_like(x)


def training_statements(requests: Sequence[EditRequest], hp: CaliNetHParams) -> list[EditRequest]:
    """What the slots are trained on: each request's prompt, then the other templates of
    its relation among ``requests`` filled with its subject (ParaRel-style paraphrases), up
    to ``max_templates`` statements per fact, plus its own paraphrases if
    ``use_paraphrases`` (those that name the subject). Each statement is an EditRequest
    with the request's target."""
    by_relation: dict[str, list[str]] = {}
    for r in requests:
        if r.relation is not None and r.prompt not in by_relation.setdefault(r.relation, []):
            by_relation[r.relation].append(r.prompt)
    out = []
    for r in requests:
        templates = [r.prompt] + [t for t in by_relation.get(r.relation, []) if t != r.prompt]
        for t in templates[: hp.max_templates]:
            out.append(EditRequest(t, r.subject, r.target_new, relation=r.relation))
        if hp.use_paraphrases:
            for p in r.paraphrases:
                if r.subject in p:
                    out.append(EditRequest.from_text(p, r.subject, r.target_new))
    return out


@torch.no_grad()
def _states(lm: LM, layer: int, statements: Sequence[EditRequest], batch_size: int = 32):
    """Per statement: FFN inputs ``x`` and layer outputs ``h`` at the positions predicting
    the target tokens, and those tokens (the model as it is now, earlier slots included)."""
    mlp, block = lm.module("mlp", layer), lm.module("layer", layer)
    pad = lm.tokenizer.pad_token_id
    out = []
    for start in range(0, len(statements), batch_size):
        chunk = statements[start : start + batch_size]
        pairs = [encode_pair(lm, s.text, s.target_new) for s in chunk]
        width = max(len(p) + len(t) for p, t in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, t) in enumerate(pairs):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            mask[i, : len(p) + len(t)] = 1
        with Hooks() as h:
            xs = h.capture_input(mlp)
            hs = h.capture_output(block)
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
        for i, (p, t) in enumerate(pairs):
            rows = torch.arange(len(p) - 1, len(p) + len(t) - 1)
            out.append(
                (
                    xs.value[i, rows].float(),
                    hs.value[i, rows].float(),
                    torch.tensor(t, device=lm.device),
                )
            )
    return out


@torch.no_grad()
def _memory_states(lm: LM, layer: int, texts: Sequence[str], batch_size: int = 32):
    """FFN inputs ``x`` and layer outputs ``h`` of ``layer`` at every position of ``texts``
    but each text's first (the attention sink, never scored): two ``[positions, d]``."""
    mlp, block = lm.module("mlp", layer), lm.module("layer", layer)
    xs_all, hs_all = [], []
    for start in range(0, len(texts), batch_size):
        batch = lm.tokenize(list(texts[start : start + batch_size]))
        with Hooks() as h:
            xs = h.capture_input(mlp)
            hs = h.capture_output(block)
            lm.model(**batch)
        keep = after_first_token(batch["attention_mask"])
        xs_all.append(xs.value[keep].float())
        hs_all.append(hs.value[keep].float())
    return torch.cat(xs_all), torch.cat(hs_all)


def kl_to_reference(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(P_ref ‖ P)`` of next-token distributions (rows of
    logits; :func:`medit_lite.methods.meta_edit.kl` on their log-softmax)."""
    from .meta_edit import kl

    return kl(
        torch.log_softmax(reference_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    )


def _tail_logits(lm: LM, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last layer's output: final norm, then unembedding."""
    normed = lm.module("final_norm")(hidden.to(lm.dtype))
    return lm.module("unembed")(normed).float()


def _bank_digest(bank: SlotBank | None) -> str:
    h = hashlib.sha256()
    if bank is not None:
        for p in bank.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def calibrate(lm: LM, requests: Sequence[EditRequest], hp: CaliNetHParams) -> tuple[Slots, dict]:
    """Train one slot set on every request at once (Eq. 2, NLL of each target) and attach it.

    In the last layer each step recomputes only slots, final norm and unembedding from
    states captured once; in another layer the whole model runs each step.
    """
    from ..training import cache_key, load_or_train, train

    layer = hp.layer_of(lm)
    gated = lm.adapter.family in GATED_FAMILIES
    slots = Slots(lm.d_model, hp.n_slots, gated, _activation(lm), hp.init_std, hp.seed)
    slots = slots.to(lm.device)
    statements = training_statements(requests, hp)
    bank = SlotBank.of(lm, layer)
    last = layer == lm.n_layers - 1
    index = {id(s): i for i, s in enumerate(statements)}
    states = _states(lm, layer, statements) if last else None
    local = hp.locality_weight > 0
    memory = hp.texts_for_memory() if local else []
    memory_states = _memory_states(lm, layer, memory) if local and last else None
    picker = torch.Generator().manual_seed(hp.seed)

    def edit_loss(batch: list[EditRequest]) -> torch.Tensor:
        if last:
            picked = [states[index[id(s)]] for s in batch]
            x = torch.cat([p[0] for p in picked])
            h = torch.cat([p[1] for p in picked])
            y = torch.cat([p[2] for p in picked])
            return torch.nn.functional.cross_entropy(_tail_logits(lm, h + slots(x)), y)
        from ..metrics import pair_logits

        pairs = [encode_pair(lm, s.text, s.target_new) for s in batch]
        logits = torch.cat(pair_logits(lm, pairs)).float()
        y = torch.cat([torch.tensor(t, device=lm.device) for _, t in pairs])
        return torch.nn.functional.cross_entropy(logits, y)

    def locality_loss() -> torch.Tensor:
        """KL(unedited ‖ calibrated) on sampled memory positions (last layer) or texts."""
        if last:
            mx, mh = memory_states
            pick = torch.randperm(len(mx), generator=picker)[: hp.locality_positions]
            x, h = mx[pick].to(lm.device), mh[pick].to(lm.device)
            with torch.no_grad():
                reference = _tail_logits(lm, h)
            return kl_to_reference(reference, _tail_logits(lm, h + slots(x)))
        n_texts = max(1, hp.locality_positions // 32)
        pick = torch.randperm(len(memory), generator=picker)[:n_texts].tolist()
        batch = lm.tokenize([memory[i] for i in pick])
        keep = after_first_token(batch["attention_mask"])
        slots.muted = True
        try:
            with torch.no_grad():
                reference = lm.model(**batch).logits[keep]
        finally:
            slots.muted = False
        return kl_to_reference(reference, lm.model(**batch).logits[keep])

    def loss_fn(batch: list[EditRequest]):
        loss = edit_loss(batch)
        if not local:
            return loss
        kl = locality_loss()
        return loss + hp.locality_weight * kl, {
            "edit": float(loss.detach()),
            "locality_kl": float(kl.detach()),
        }

    def fit():
        attached = None
        if not last:  # the slots must be in the forward pass while training
            attached = SlotBank.of(lm, layer, create=True)
            attached.sets.append(slots)
        try:
            return train(
                slots,
                loss_fn,
                statements,
                steps=hp.steps,
                batch_size=min(hp.batch_size, len(statements)),
                lr=hp.lr,
                seed=hp.seed,
                desc="calinet slots",
            )
        finally:
            if attached is not None:
                attached.remove(slots)

    key = cache_key(
        lm,
        statements,
        dict(
            {k: v for k, v in dataclasses.asdict(hp).items() if k != "use_cache"},
            layer=layer,
            bank=_bank_digest(bank),
            gated=gated,
            memory=hashlib.sha256("\n".join(memory).encode()).hexdigest()[:16],
        ),
    )
    log = load_or_train(slots, "calinet", key, fit, retrain=not hp.use_cache)
    for p in slots.parameters():
        p.requires_grad_(False)
    if not all(torch.isfinite(p).all() for p in slots.parameters()):
        raise FloatingPointError("CaliNet produced non-finite slots")
    SlotBank.of(lm, layer, create=True).sets.append(slots)
    info = {
        "layer": layer,
        "slots": slots.n_slots,
        "statements": len(statements),
        "facts": len(requests),
        "added_params": sum(p.numel() for p in slots.parameters()),
        "added_bytes": sum(p.numel() * p.element_size() for p in slots.parameters()),
        "train_seconds": log.seconds,
        "from_cache": log.from_cache,
        "final_loss": log.losses[-1] if log.losses else None,
        "losses": log.losses,
        "memory_texts": len(memory),
        "final_locality_kl": (log.logs.get("locality_kl") or [None])[-1],
    }
    return slots, info


def remove_slots(lm: LM, layer: int, slots: Slots) -> None:
    bank = SlotBank.of(lm, layer)
    if bank is not None:
        bank.remove(slots)


@register("calinet", CaliNetHParams, lambda lm, hp: [])
def apply_calinet(lm: LM, requests: list[EditRequest], hp: CaliNetHParams) -> dict:
    """CaliNet: calibration slots beside one FFN, trained on the batch (Dong et al., 2022)."""
    layer = hp.layer_of(lm)
    slots, info = calibrate(lm, requests, hp)

    def undo() -> None:
        remove_slots(lm, layer, slots)

    return {"undo": undo, **info}
