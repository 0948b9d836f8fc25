"""KnowledgeEditor (KE): editing factual knowledge with a hypernetwork (De Cao, Aziz and
Titov, EMNLP 2021).

**The update** (§3, Eq. 3-4 of the paper; ``ConditionedParameter`` in the authors' code).
A hypernetwork reads a *condition*, the text ``"{prediction} >> {new answer} || {input}"``
(the model's current answer, the desired one, and the question), and for every edited
matrix ``W`` (d_out × d_in) turns the gradient of the edit loss into an update::

    c   = tanh(Linear(BiLSTM(embed(condition))))                 (1024 numbers)
    [α_col, α_row, β_col, β_row, η] = Linear(tanh(Linear(c)))   (per matrix, weight-normed)
    α̂ = softmax(α_row)ᵀ α_col,   β̂ = softmax(β_row)ᵀ β_col      (rank-one d_out × d_in)
    ΔW = max_scale · σ(η) · (α̂ ⊙ ∇_W L + β̂),      W̃ = W + ΔW

where ``∇_W L`` is the gradient of the label-smoothed NLL (ε = 0.1) of the new answer.
Because ``α̂`` is rank one, ``α̂ ⊙ Σ_t δ_t u_tᵀ = Σ_t (softmax(α_row) ⊙ δ_t)(α_col ⊙ u_t)ᵀ``:
the update is carried by gradient pairs too, and applies to a layer input in one low-rank
product (:mod:`medit_lite.methods.meta_edit`).

**Training** (§3.2, Eq. 5-6): a constrained problem, the edit succeeds on the input and on
its paraphrases while the predictions on other inputs move little::

    min_φ  L_edit(x_e) + L_edit(x'_e)      subject to      KL(p_θ(·|x_o) ‖ p_θ̃(·|x_o)) ≤ m

solved as a Lagrangian, ``L_edit + λ (KL − m)``, with ``λ ≥ 0`` trained by gradient
*ascent* (its gradient is negated and it is clipped at 0 after each step), RMSprop
(centred) with learning rate 3e-4 for the hypernetwork and 0.1 for ``λ``; the margin ``m``
starts at 1e-3 and is multiplied by 0.8 (down to 1e-5) whenever more than 90% of the
edits succeed ("flipped"), the paper's annealing (``margin_kl_max/min`` in the code, where
it is checked after each validation epoch; here over the last ``anneal_every`` training
edits). Only the hypernetwork and ``λ`` train; the model is frozen.

**What differs, and why.** The authors edit every weight matrix of BART-base or BERT-base;
here, as MEND and EasyEdit do for GPT-style models, the MLP output matrices of the last 3
layers, so KE, MEND and ENN change the same weights. The condition's token embedding is
the model's own, frozen (the authors initialise it from the model and train it: 28M more
parameters here). The authors train 200,000 steps of one edit and 63 other inputs with a
linear warm-up; here mini-batches of edits, each row with its own update and its own
unrelated probe, for a few hundred steps at a constant learning rate, the KL at the
probe's answer tokens (like MEND's ``loc_positions="answer"``). With so few steps the
learning rate is 1e-3 instead of the authors' 3e-4: on the same 120 training records,
200 steps at 3e-4 left the Eiffel Tower → Rome edit at P(Rome) 0.005 (from 0.006) while
120 steps at 1e-3 raised it to 0.31 (the update is ``α̂ ⊙ ∇W`` with ``α̂``'s rows a
softmax, so its scale must be learned through the conditioner's output, which takes many
steps).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..editing import register
from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import LM
from ..progress import progress
from ..requests import EditRequest
from ..training import TrainedParts, TrainLog, register_trainer, train
from ..training import training_requests as default_training_requests
from .meta_edit import (
    Example,
    TripleCache,
    add_row_updates,
    answer_logprobs,
    examples,
    kl,
    module_gradient_pairs,
    pad,
    per_row,
    reference_logprobs,
    replayed_normed,
    row_mean_nll,
    target_logits,
    usable,
)


@dataclass(frozen=True)
class KEHParams:
    """Hyperparameters of KnowledgeEditor's hypernetwork and of its training (the
    authors' defaults where they apply: ``train_bart_seq2seq_augmented_kilt.py``)."""

    layers: tuple[int, ...] = ()  # () = the last 3 layers (for_model fills them in)
    lstm_dim: int = 128  # the condition BiLSTM's hidden size per direction
    condition_dim: int = 1024
    hidden_dim: int = 128  # the per-matrix conditioner's hidden layer
    max_scale: float = 1.0
    label_smoothing: float = 0.1  # ``eps``
    lr: float = 1e-3  # the authors: 3e-4 over 200,000 steps (see the module docstring)
    lr_multiplier: float = 0.1  # ``lr_alpha``: the Lagrange multiplier's learning rate
    margin_kl_max: float = 1e-3
    margin_kl_min: float = 1e-5
    margin_decay: float = 0.8
    anneal_every: int = 25  # edits are counted over windows of this many steps
    anneal_flipped: float = 0.9  # success rate above which the margin shrinks
    use_views: bool = True  # the edit loss also on a paraphrase (``--use_views``)
    train_steps: int = 300
    batch_size: int = 8
    train_records: int | None = 120
    prediction_tokens: int = 6  # greedy tokens of the model's prediction in the condition
    seed: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> KEHParams:
        return cls(layers=tuple(range(lm.n_layers - 3, lm.n_layers)))

    def validate(self, lm: LM) -> None:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("hyperparameter layers has a layer twice")
        for name in ("lstm_dim", "condition_dim", "hidden_dim", "train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"hyperparameter {name} must be at least 1")
        if self.lr <= 0 or self.max_scale <= 0:
            raise ValueError("hyperparameters lr and max_scale must be positive")
        if not 0 < self.margin_kl_min <= self.margin_kl_max:
            raise ValueError("need 0 < margin_kl_min <= margin_kl_max")

    def training_part(self) -> dict:
        return dataclasses.asdict(self)


# -- the hypernetwork --------------------------------------------------------------------
class ConditionEncoder(nn.Module):
    """``tanh(Linear(BiLSTM(embed(tokens))))``: the last hidden state of each direction,
    concatenated (allennlp's ``PytorchSeq2VecWrapper`` in the authors' code)."""

    def __init__(self, d_embed: int, lstm_dim: int, condition_dim: int):
        super().__init__()
        self.lstm = nn.LSTM(d_embed, lstm_dim, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_dim, condition_dim)

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            embedded, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return torch.tanh(self.out(torch.cat([h[0], h[1]], -1)))


class MatrixConditioner(nn.Module):
    """For one d_out × d_in matrix: ``[α_col, α_row, β_col, β_row, η]`` from the condition
    (two weight-normalised linear layers with a tanh between them, as the authors')."""

    def __init__(self, condition_dim: int, hidden_dim: int, d_out: int, d_in: int):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.d_out, self.d_in = d_out, d_in
        self.net = nn.Sequential(
            wn(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            wn(nn.Linear(hidden_dim, 2 * (d_out + d_in) + 1)),
        )

    def forward(self, condition: torch.Tensor):
        return self.net(condition).split([self.d_in, self.d_out, self.d_in, self.d_out, 1], -1)


class KEEditor(nn.Module):
    """The condition encoder, one conditioner per edited matrix, and the Lagrange
    multiplier ``λ`` of the KL constraint with its current margin (a buffer)."""

    def __init__(self, lm: LM, hp: KEHParams):
        super().__init__()
        self.condition = ConditionEncoder(lm.d_model, hp.lstm_dim, hp.condition_dim)
        self.conditioners = nn.ModuleList(
            MatrixConditioner(hp.condition_dim, hp.hidden_dim, lm.d_model, lm.d_mlp)
            for _ in hp.layers
        )
        self.max_scale = hp.max_scale
        self.multiplier = nn.Parameter(torch.ones(()))
        self.multiplier.register_hook(lambda g: -g)  # gradient ascent on λ
        self.register_buffer("margin", torch.tensor(float(hp.margin_kl_max)))

    def encode(self, lm: LM, conditions: Sequence[list[int]]) -> torch.Tensor:
        ids, mask = pad(conditions, lm.tokenizer.pad_token_id)
        with torch.no_grad():
            embedded = lm.module("embed")(ids.to(lm.device)).float()
        return self.condition(embedded, mask.sum(1))

    def update_pairs(self, j: int, condition: torch.Tensor, grads) -> tuple:
        """Layer ``j``'s update as flat pairs ``(row, v, d)``: ``ΔW_r = Σ d vᵀ`` over row
        ``r``'s pairs equals ``max_scale σ(η_r) (α̂_r ⊙ ∇W_r + β̂_r)``."""
        rows, u, delta = grads
        a_col, a_row, b_col, b_row, eta = self.conditioners[j](condition)
        scale = self.max_scale * torch.sigmoid(eta)  # [n, 1]
        dev = u.device
        r = rows.to(dev)
        v = a_col[r] * u
        d = (scale * a_row.softmax(-1))[r] * delta
        n = condition.shape[0]
        bias_rows = torch.arange(n)
        v = torch.cat([v, b_col])
        d = torch.cat([d, scale * b_row.softmax(-1)])
        return torch.cat([rows, bias_rows]), v, d


def condition_text(prediction: str, new: str, question: str) -> str:
    """The authors' condition string: ``"{prediction} >> {alternative} || {input}"``."""
    return f"{prediction.strip()} >> {new.strip()} || {question.strip()}"


def predictions(lm: LM, prompts: Sequence[str], n_tokens: int, batch_size: int = 32) -> list[str]:
    """The model's greedy answers (first line, at most ``n_tokens`` tokens)."""
    out: list[str] = []
    for begin in progress(range(0, len(prompts), batch_size), desc="KE: predictions"):
        texts = lm.generate(list(prompts[begin : begin + batch_size]), max_new_tokens=n_tokens)
        out += [t.strip().split("\n")[0] for t in texts]
    return out


def _condition_ids(
    lm: LM, requests: Sequence[EditRequest], preds: Sequence[str]
) -> list[list[int]]:
    texts = [condition_text(p, r.target_new, r.text) for r, p in zip(requests, preds)]
    return [lm.tokenizer(t, add_special_tokens=False)["input_ids"] or [0] for t in texts]


# -- training -----------------------------------------------------------------------------
class _Trainer:
    """One mini-batch of KE's Lagrangian (Eq. 6); keeps the window of edit successes the
    margin schedule reads."""

    def __init__(self, lm: LM, editor: KEEditor, hp: KEHParams, exs: list[Example], conds):
        self.lm, self.editor, self.hp = lm, editor, hp
        self.layers = list(hp.layers)
        self.first = min(self.layers)
        self.modules = [lm.module("mlp_out", layer) for layer in self.layers]
        self.cache = TripleCache(lm, exs, self.first, desc="KE: layer inputs")
        self.conds = {id(e): c for e, c in zip(exs, conds)}
        self.flipped: list[float] = []

    def __call__(self, batch: list) -> tuple[torch.Tensor, dict]:
        lm, hp, dev = self.lm, self.hp, self.lm.device
        exs = [b.extra["_ke"] for b in batch]
        n = len(exs)
        grads = module_gradient_pairs(
            lm,
            self.modules,
            [e.edit for e in exs],
            hidden=self.cache.hidden(exs, [0]),
            start=self.first,
            label_smoothing=hp.label_smoothing,
        )
        condition = self.editor.encode(lm, [self.conds[id(e)] for e in exs])
        kinds = [0, 1, 2] if hp.use_views else [0, 2]
        updates = []
        for j in range(len(self.layers)):
            V, D = per_row(self.editor.update_pairs(j, condition, grads[j]), n, dev)
            updates.append((V.repeat(len(kinds), 1, 1), D.repeat(len(kinds), 1, 1), 1.0))
        edited = [e.edit for e in exs] + ([e.equiv for e in exs] if hp.use_views else [])
        seqs = [p + t for p, t in edited] + [e.loc for e in exs]
        ids, mask = pad(seqs, lm.tokenizer.pad_token_id)
        hidden = self.cache.hidden(exs, kinds)
        loc = slice(len(edited), len(seqs))
        loc_mask = self.cache.loc_mask(exs, mask[loc])
        base_logp = reference_logprobs(lm, ids[loc], mask[loc], hidden[loc], self.first, loc_mask)
        with Hooks() as h:
            add_row_updates(h, self.modules, updates)
            normed = replayed_normed(lm, ids, mask, hidden, self.first)
        logits, rows, targets = target_logits(lm, normed, edited)
        nll = row_mean_nll(logits, rows, targets, len(edited), hp.label_smoothing)
        l_edit = nll.mean()
        l_kl = kl(base_logp, answer_logprobs(lm, normed[loc], loc_mask))
        loss = l_edit + self.editor.multiplier * (l_kl - self.editor.margin)
        with torch.no_grad():  # the edit succeeded: every new-target token is the argmax
            hit = (logits.argmax(-1).cpu() == targets).float()
            per = torch.ones(len(edited)).scatter_reduce(0, rows, hit, "amin")
            self.flipped.append(float(per[:n].mean()))
        return loss, {
            "edit_nll": float(l_edit.detach()),
            "loc_kl": float(l_kl.detach()),
            "multiplier": float(self.editor.multiplier.detach()),
            "margin": float(self.editor.margin),
            "flipped": self.flipped[-1],
        }

    def after_step(self, step: int, log: TrainLog) -> None:
        """Project ``λ`` onto ``λ ≥ 0``; shrink the margin after a window of successes."""
        with torch.no_grad():
            self.editor.multiplier.clamp_(min=0.0)
            if step % self.hp.anneal_every == 0:
                window = self.flipped[-self.hp.anneal_every :]
                if sum(window) / len(window) > self.hp.anneal_flipped:
                    m = max(float(self.editor.margin) * self.hp.margin_decay, self.hp.margin_kl_min)
                    self.editor.margin.fill_(m)


def new_editor(lm: LM, hp: KEHParams) -> KEEditor:
    torch.manual_seed(hp.seed)
    return KEEditor(lm, hp).to(lm.device)


def fit_editor(lm: LM, editor: KEEditor, data: Sequence[EditRequest], hp: KEHParams) -> TrainLog:
    """Train ``editor`` on ``data`` with :func:`medit_lite.training.train`."""
    data = usable(data)
    exs = examples(lm, data)
    if len(exs) < 2:
        raise ValueError("KE needs at least 2 training records with a rephrase and a probe")
    t0 = time.perf_counter()
    preds = predictions(lm, [r.text for r in data], hp.prediction_tokens)
    loss_fn = _Trainer(lm, editor, hp, exs, _condition_ids(lm, data, preds))
    items = [dataclasses.replace(r, extra={"_ke": e}) for r, e in zip(data, exs)]
    prep = time.perf_counter() - t0

    def rmsprop(params):
        lagrange = [editor.multiplier]
        rest = [p for p in params if p is not editor.multiplier]
        groups = [{"params": rest, "lr": hp.lr}, {"params": lagrange, "lr": hp.lr_multiplier}]
        return torch.optim.RMSprop(groups, centered=True)

    editor.train()
    log = train(
        editor,
        loss_fn,
        items,
        steps=hp.train_steps,
        batch_size=min(hp.batch_size, len(items)),
        lr=hp.lr,
        seed=hp.seed,
        desc="KE hypernetwork",
        optimizer=rmsprop,
        after_step=loss_fn.after_step,
    )
    editor.eval()
    log.logs["prep_seconds"] = [prep]
    return log


#: KE's trained hypernetworks, per model and hyperparameters.
EDITORS = TrainedParts(
    "ke",
    KEHParams,
    new=lambda lm, hp: new_editor(lm, hp),
    fit=lambda lm, editor, data, hp: fit_editor(lm, editor, data, hp),
    data_for=lambda hp: default_training_requests(limit=hp.train_records),
    select=usable,
)


def ke_editor(
    lm: LM,
    hp: KEHParams | None = None,
    *,
    data: Sequence[EditRequest] | None = None,
    retrain: bool = False,
) -> tuple[KEEditor, TrainLog]:
    """The trained hypernetwork for ``lm`` and ``hp`` (cached on disk and in memory)."""
    return EDITORS.get(lm, hp, data=data, retrain=retrain)


@register_trainer("ke")
def train_ke(lm: LM, hp=None, *, data=None, retrain: bool = False) -> TrainLog:
    """Train (or load) KE's hypernetwork: ``python -m medit_lite train --method ke``."""
    return ke_editor(lm, hp, data=data, retrain=retrain)[1]


def is_trained(lm: LM, hp: KEHParams | None = None) -> bool:
    """Whether :func:`ke_editor` will load rather than train."""
    return EDITORS.is_trained(lm, hp)


# -- the edit -----------------------------------------------------------------------------
def _weights(lm: LM, hp: KEHParams) -> list[str]:
    return [lm.module_name("mlp_out", layer) + ".weight" for layer in hp.layers]


def weight_deltas(editor: KEEditor, layers: Sequence[int], condition, grads, n: int) -> dict:
    """``ΔW_l`` per layer, summed over the ``n`` requests (each with its own condition)."""
    out = {}
    for j, layer in enumerate(layers):
        _, v, d = editor.update_pairs(j, condition, grads[j])
        out[layer] = d.T @ v
    return out


@register("ke", KEHParams, _weights)
def apply_ke(lm: LM, requests: list[EditRequest], hp: KEHParams) -> dict:
    """KnowledgeEditor: the gradient of the new answer's NLL, reshaped by a hypernetwork
    conditioned on (prediction, new answer, question): ``W ← W + s·(α̂ ⊙ ∇W + β̂)``
    (De Cao et al., 2021, Eq. 3-4)."""
    editor, log = ke_editor(lm, hp)
    t0 = time.perf_counter()
    layers = list(hp.layers)
    preds = [
        lm.generate(r.text, max_new_tokens=hp.prediction_tokens).strip().split("\n")[0]
        for r in requests
    ]
    pairs = [encode_pair(lm, r.text, r.target_new) for r in requests]
    modules = [lm.module("mlp_out", layer) for layer in layers]
    grads = module_gradient_pairs(lm, modules, pairs, label_smoothing=hp.label_smoothing)
    with torch.no_grad():
        condition = editor.encode(lm, _condition_ids(lm, requests, preds))
        deltas = weight_deltas(editor, layers, condition, grads, len(requests))
        for layer, delta in deltas.items():
            w = lm.weight_out_in("mlp_out", layer)
            w += delta.to(device=w.device, dtype=w.dtype)
    return {
        "edit_seconds": time.perf_counter() - t0,
        "delta_norms": {layer: float(d.norm()) for layer, d in deltas.items()},
        "trained_from_cache": log.from_cache,
    }
