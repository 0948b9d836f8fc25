"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

**The rank-one gradient.** For a linear layer ``h = W u`` the gradient of a loss over a
sequence is a sum of outer products, one per token (§3.1)::

    ∇_W L = Σ_t δ_t u_tᵀ,      δ_t = ∂L/∂h_t  (the output gradient),  u_t (the input)

so a d_out × d_in gradient is carried by T pairs (u_t, δ_t) of d_in + d_out numbers.

**The editor.** A network ``g`` maps each pair to a pseudo-pair, ``(ũ_t, δ̃_t) =
g(û_t, δ̂_t)``, where ``û, δ̂`` are ``u, δ`` standardised by a running mean and standard
deviation collected during training (the authors' ``GradientTransform``, ``norm: True``).
``g`` is an MLP with one hidden layer whose layers are low-rank and residual, identity at
initialisation (``IDMLP`` with ``LRLinear``: ``z ← z + ReLU((A B z + b) ⊙ s_l + o_l)``,
``A = 0`` at first, rank 1920 there, inputs ``u`` and ``δ`` concatenated: ``combine: True``), one
network shared by all edited matrices of the same shape with a per-layer scale ``s_l``
and shift ``o_l`` (``shared: True``, ``n_modes``). The edit is (Eq. 3-4)::

    W̃_l = W_l − α_l ∇̃W_l,      ∇̃W_l = Σ_t δ̃_t ũ_tᵀ

with a learned step size ``α_l`` per layer (``edit_lrs``, initialised at ``edit_lr =
1e-4``). The authors' code adds ``lr · ∇̃`` and learns the sign; here α starts as a descent
step, the paper's equation.

**Training** (§3.2, Eq. 5): for an edit ``(x_e, y_e)`` with an equivalent input ``x'_e``
(the zsRE rephrase) and an unrelated input ``x_loc``::

    L = c_edit · (−log p_θ̃(y_e | x'_e)) + c_loc · KL(p_θ(· | x_loc) ‖ p_θ̃(· | x_loc))

with ``c_edit = 0.1``, ``c_loc = 1`` (``cedit``, ``cloc`` in the authors' config), Adam,
gradient clipping at 100, only the editor and the α trained (the base model is frozen,
``train_base: False``). Edited by default: the MLP output matrices of the last 3 layers
(the authors edit both MLP matrices of the last 3 blocks of GPT-style models; EasyEdit's
Llama configs edit gate, up and down projections of the last 3 layers).

**Budget, and what differs.** The KL term is taken at the positions that predict the
unrelated probe's answer (``loc_positions="answer"``; the authors: every token of the
unrelated input, ``"all"``): on a CPU the 49k-word unembedding of every position dominates
a training step, and locality is measured on those answer tokens. The authors train up to
100,000 steps with an outer learning rate of 1e-6 (and 1e-4 for the α) and rank 1920; this
trains on a shared CPU in minutes, so the defaults are 150 steps of 8 edits from 120
training records, learning rate 1e-4 for the editor and the α alike, and rank 256 (the
editor runs on every token of every edit sequence, and at rank 1920 it would cost as much
as the model's own layers).
Training is fast because the edited layers are the last ones: the residual stream entering
the first edited layer does not depend on the edit, so it is computed once per training
sequence and the training passes run only the edited layers and above
(:func:`medit_lite.replay.replay_layers`). The edits of one mini-batch are independent:
each row of the post-edit pass sees only its own edit, applied as the low-rank update
``−α Σ_t (ũ_t · x) δ̃_t`` of the layer's output, which equals running ``W̃`` on that row.
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
from ..requests import EditRequest
from ..training import TrainedParts, TrainLog, register_trainer, train
from ..training import training_requests as default_training_requests
from .meta_edit import Example as _Example  # noqa: F401  (kept for older imports)
from .meta_edit import (
    TripleCache,
    answer_logprobs,
    kl,
    lowrank_apply,
    module_gradient_pairs,
    reference_logprobs,
    replayed_normed,
)
from .meta_edit import examples as _examples
from .meta_edit import pad as _pad
from .meta_edit import per_row as _per_row
from .meta_edit import row_mean_nll as _row_mean_nll
from .meta_edit import target_positions as _target_positions
from .meta_edit import usable as _usable


@dataclass(frozen=True)
class MENDHParams:
    """Hyperparameters of MEND's editor and of its training."""

    layers: tuple[int, ...] = ()  # () = the last 3 layers (for_model fills them in)
    rank: int = 256  # rank of the editor's low-rank layers (authors: 1920)
    n_hidden: int = 1  # hidden layers of the editor (authors: 1)
    edit_lr: float = 1e-4  # initial α (authors' edit_lr)
    c_edit: float = 0.1
    c_loc: float = 1.0
    train_steps: int = 150
    batch_size: int = 8
    lr: float = 1e-4
    grad_clip: float = 100.0
    train_records: int | None = 120  # None: every training triple
    loc_positions: str = "answer"  # KL at the probe's answer tokens; "all": every token
    seed: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> MENDHParams:
        return cls(layers=tuple(range(lm.n_layers - 3, lm.n_layers)))

    def validate(self, lm: LM) -> None:
        if not self.layers:
            raise ValueError("hyperparameter layers must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("hyperparameter layers has a layer twice")
        for name in ("rank", "train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"hyperparameter {name} must be at least 1")
        if self.lr <= 0 or self.edit_lr <= 0:
            raise ValueError("hyperparameters lr and edit_lr must be positive")
        if self.loc_positions not in ("answer", "all"):
            raise ValueError("hyperparameter loc_positions must be 'answer' or 'all'")

    def training_part(self) -> dict:
        """Every field: they all shape the trained editor."""
        return dataclasses.asdict(self)


# -- the editor network ------------------------------------------------------------------
class LowRankResidual(nn.Module):
    """``z + ReLU((A B z + b) ⊙ s_mode + o_mode)``, identity at initialisation (A = 0).

    The authors' ``LRLinear`` with ``init: id`` (``B`` is drawn from N(0, 1) there too).
    """

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        mid = min(rank, dim)
        self.a = nn.Parameter(torch.zeros(dim, mid))
        self.b = nn.Parameter(torch.randn(mid, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.b.T) @ self.a.T + self.bias
        pre = pre * self.scale[mode] + self.shift[mode]
        return z + pre.clamp(min=0)


class MENDEditor(nn.Module):
    """The gradient transform ``g`` of all edited matrices (one shape, one net) and the
    per-layer step sizes ``α``. Standardisation statistics are buffers, saved with it."""

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_hidden: int, lr: float):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.net = nn.ModuleList(LowRankResidual(dim, rank, n_layers) for _ in range(n_hidden + 1))
        self.alpha = nn.Parameter(torch.full((n_layers,), float(lr)))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Fold a batch of pairs into the running mean and variance (Chan et al.'s
        parallel form of the authors' one-sample-at-a-time Welford update)."""
        z = torch.cat([u, delta], -1).float().reshape(-1, self.mean.shape[0])
        n = z.shape[0]
        if n == 0:
            return
        mean_b = z.mean(0)
        m2_b = ((z - mean_b) ** 2).sum(0)
        total = self.count + n
        diff = mean_b - self.mean
        self.mean += diff * n / total
        self.m2 += m2_b + diff**2 * self.count * n / total
        self.count.copy_(total)

    def std(self) -> torch.Tensor:
        if self.count < 2:
            raise RuntimeError("MEND's editor has seen fewer than 2 gradient pairs")
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int):
        """Pseudo-pairs ``(ũ, δ̃)`` for pairs ``u`` [..., d_in], ``δ`` [..., d_out]."""
        z = torch.cat([u, delta], -1).float()
        z = (z - self.mean) / (self.std() + 1e-7)
        for layer in self.net:
            z = layer(z, mode)
        return z.split([self.d_in, self.d_out], -1)


# -- gradient pairs ---------------------------------------------------------------------
def gradient_pairs(
    lm: LM,
    layers: Sequence[int],
    pairs: Sequence[tuple[list[int], list[int]]],
    hidden: torch.Tensor | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each layer, the (u_t, δ_t) of its MLP output matrix at every position t of every
    edit sequence up to the last one that predicts a target token (the loss: each row's
    mean target NLL): ``{layer: (row, u [N, d_mlp], δ [N, d_model])}``. ``Σ_t δ_t u_tᵀ``
    over a row is that row's ∇_W (see the tests).

    ``hidden``: the residual stream entering ``min(layers)`` (then only the layers from
    there up run)."""
    modules = [lm.module("mlp_out", layer) for layer in layers]
    start = min(layers) if hidden is not None else 0
    found = module_gradient_pairs(lm, modules, pairs, hidden=hidden, start=start)
    return dict(zip(layers, found))


def pseudo_pairs(editor: MENDEditor, layers: Sequence[int], grads: dict) -> dict:
    """The editor's (ũ, δ̃) for every layer's pairs (mode j for the j-th layer)."""
    return {
        layer: (grads[layer][0], *editor(grads[layer][1], grads[layer][2], j))
        for j, layer in enumerate(layers)
    }


def weight_deltas(editor: MENDEditor, layers: Sequence[int], pseudo: dict) -> dict:
    """``ΔW_l = −α_l Σ_t δ̃_t ũ_tᵀ`` per layer, summed over every pair ([d_model, d_mlp])."""
    return {
        layer: -editor.alpha[j] * pseudo[layer][2].T @ pseudo[layer][1]
        for j, layer in enumerate(layers)
    }


# -- training ---------------------------------------------------------------------------
def _lowrank_edit(x: torch.Tensor, u: torch.Tensor, d: torch.Tensor, alpha: torch.Tensor):
    """``−α Σ_t (ũ_t · x) δ̃_t`` for every row of ``x`` (MEND's edit applied per row)."""
    return lowrank_apply(x, u, d, -alpha)


class _Trainer:
    """The loss of one mini-batch of MEND training (Eq. 5)."""

    def __init__(self, lm: LM, editor: MENDEditor, hp: MENDHParams, examples: list[_Example]):
        self.lm, self.editor, self.hp = lm, editor, hp
        self.layers = list(hp.layers)
        self.first = min(self.layers)
        self.cache = TripleCache(lm, examples, self.first, desc="MEND: layer inputs")

    def __call__(self, batch: list) -> tuple[torch.Tensor, dict]:
        lm, hp, dev = self.lm, self.hp, self.lm.device
        examples = [b.extra["_mend"] for b in batch]
        n = len(examples)
        grads = gradient_pairs(
            lm, self.layers, [e.edit for e in examples], self.cache.hidden(examples, [0])
        )
        for layer in self.layers:
            self.editor.observe(grads[layer][1], grads[layer][2])
        pseudo = pseudo_pairs(self.editor, self.layers, grads)
        # post-edit pass: rows 0..n-1 the equivalent inputs, rows n..2n-1 the unrelated ones
        seqs = [e.equiv[0] + e.equiv[1] for e in examples] + [e.loc for e in examples]
        ids, mask = _pad(seqs, lm.tokenizer.pad_token_id)
        hidden = self.cache.hidden(examples, [1, 2])
        if hp.loc_positions == "answer":  # the positions predicting the probe's answer
            loc_mask = self.cache.loc_mask(examples, mask[n:])
        else:  # every token of the unrelated input
            loc_mask = mask[n:].bool().to(dev)
        base_logp = reference_logprobs(lm, ids[n:], mask[n:], hidden[n:], self.first, loc_mask)
        with Hooks() as h:
            for j, layer in enumerate(self.layers):
                U, D = _per_row(pseudo[layer], n, dev)
                U, D = torch.cat([U, U]), torch.cat([D, D])
                box = h.capture_input(lm.module("mlp_out", layer), detach=False)
                alpha = self.editor.alpha[j]

                def fn(out, box=box, U=U, D=D, alpha=alpha):
                    return out + _lowrank_edit(box.value, U, D, alpha).to(out.dtype)

                h.edit_output(lm.module("mlp_out", layer), fn)
            normed = replayed_normed(lm, ids, mask, hidden, self.first)
        rows, cols, targets = _target_positions([e.equiv for e in examples])
        logits = lm.module("unembed")(normed[rows.to(dev), cols.to(dev)])
        l_edit = _row_mean_nll(logits, rows, targets, n).mean()
        l_loc = kl(base_logp, answer_logprobs(lm, normed[n:], loc_mask))
        loss = hp.c_edit * l_edit + hp.c_loc * l_loc
        return loss, {"edit_nll": float(l_edit.detach()), "loc_kl": float(l_loc.detach())}


def new_editor(lm: LM, hp: MENDHParams) -> MENDEditor:
    torch.manual_seed(hp.seed)
    editor = MENDEditor(lm.d_mlp, lm.d_model, len(hp.layers), hp.rank, hp.n_hidden, hp.edit_lr)
    return editor.to(lm.device)


def fit_editor(
    lm: LM, editor: MENDEditor, data: Sequence[EditRequest], hp: MENDHParams
) -> TrainLog:
    """Train ``editor`` on ``data`` with :func:`medit_lite.training.train`."""
    examples = _examples(lm, data)
    if len(examples) < 2:
        raise ValueError("MEND needs at least 2 training records with a rephrase and a probe")
    t0 = time.perf_counter()
    loss_fn = _Trainer(lm, editor, hp, examples)
    items = [dataclasses.replace(r, extra={"_mend": e}) for r, e in zip(_usable(data), examples)]
    prep = time.perf_counter() - t0
    editor.train()
    log = train(
        editor,
        loss_fn,
        items,
        steps=hp.train_steps,
        batch_size=min(hp.batch_size, len(items)),
        lr=hp.lr,
        seed=hp.seed,
        grad_clip=hp.grad_clip,
        desc="MEND editor",
    )
    editor.eval()
    log.logs["prep_seconds"] = [prep]
    return log


#: MEND's trained editors, per model and hyperparameters (memory, disk cache, or trained).
EDITORS = TrainedParts(
    "mend",
    MENDHParams,
    new=lambda lm, hp: new_editor(lm, hp),
    fit=lambda lm, editor, data, hp: fit_editor(lm, editor, data, hp),
    data_for=lambda hp: default_training_requests(limit=hp.train_records),
    select=_usable,
)


def mend_editor(
    lm: LM,
    hp: MENDHParams | None = None,
    *,
    data: Sequence[EditRequest] | None = None,
    retrain: bool = False,
) -> tuple[MENDEditor, TrainLog]:
    """The trained editor for ``lm`` and ``hp`` (cached on disk and in memory)."""
    return EDITORS.get(lm, hp, data=data, retrain=retrain)


@register_trainer("mend")
def train_mend(lm: LM, hp=None, *, data=None, retrain: bool = False) -> TrainLog:
    """Train (or load) MEND's editor: what ``python -m medit_lite train --method mend`` runs."""
    return mend_editor(lm, hp, data=data, retrain=retrain)[1]


# -- the edit -----------------------------------------------------------------------------
def _weights(lm: LM, hp: MENDHParams) -> list[str]:
    return [lm.module_name("mlp_out", layer) + ".weight" for layer in hp.layers]


@register("mend", MENDHParams, _weights)
def apply_mend(lm: LM, requests: list[EditRequest], hp: MENDHParams) -> dict:
    """MEND: one forward/backward pass on the edit prompt(s), the editor maps the gradient's
    rank-one factors, ``W ← W − α Σ δ̃ ũᵀ`` (Mitchell et al., 2022, Eq. 3-4)."""
    editor, log = mend_editor(lm, hp)
    t0 = time.perf_counter()
    pairs = [encode_pair(lm, r.text, r.target_new) for r in requests]
    layers = list(hp.layers)
    grads = gradient_pairs(lm, layers, pairs)
    with torch.no_grad():
        deltas = weight_deltas(editor, layers, pseudo_pairs(editor, layers, grads))
        for layer, delta in deltas.items():
            w = lm.weight_out_in("mlp_out", layer)
            w += delta.to(device=w.device, dtype=w.dtype)
    return {
        "edit_seconds": time.perf_counter() - t0,
        "delta_norms": {layer: float(d.norm()) for layer, d in deltas.items()},
        "trained_from_cache": log.from_cache,
    }


def is_trained(lm: LM, hp: MENDHParams | None = None) -> bool:
    """Whether an editor for ``lm`` and ``hp`` is in memory or in the cache (so that
    :func:`mend_editor` will not train)."""
    return EDITORS.is_trained(lm, hp)


def plot_training(log: dict, title: str = "MEND editor training"):
    """The loss curves of a training run (``losses``, ``edit_nll``, ``loc_kl`` lists, as in
    a :class:`~medit_lite.training.TrainLog`'s logs or the benchmark JSON)."""
    from ..plots import training_curves

    panels = [
        ("losses", "total: c_edit·L_edit + c_loc·KL"),
        ("edit_nll", "L_edit (rephrase NLL)"),
        ("loc_kl", "KL on the unrelated probe"),
    ]
    return training_curves(log, panels, title)
