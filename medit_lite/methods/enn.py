"""Editable Neural Networks (ENN): editable training (Sinitsin et al., ICLR 2020).

**The edit** (§3, Eq. 1): ``k`` gradient steps on the edit loss, from the model's weights::

    θ_0 = θ,    θ_{i+1} = θ_i − η ⊙ ∇_θ L_edit(x_e, y_e; θ_i),    Edit(θ) = θ_k

with a learned step size per edited matrix (``edit_lrs`` in MEND's implementation of ENN,
initialised at 1e-2; ``n_edit_steps: 1`` there).

**Editable training** (§3, Eq. 2-4): the *model* is trained so that this cheap edit works
and stays local::

    L = L_base(θ) + c_edit · L_edit(x'_e; Edit(θ)) + c_loc · KL(p_θ(·|x_loc) ‖ p_Edit(θ)(·|x_loc))

differentiating through the inner steps (second order; ``first_order=True`` detaches the
inner gradients, as MEND's ``fomaml_callback``). ``L_base`` keeps the model what it was:
here, as in MEND's trainer (``base_loss: distill``), the KL from the original pretrained
model to θ on the unrelated inputs. As there, ``c_edit = 0.1``, ``c_loc = 1``,
``c_base = 1``, Adam with learning rate 1e-5 for the weights and 1e-3 for the step sizes,
gradient clipping at 100. Only the edited layers train (the last 3 MLPs: every weight
matrix of each, like MEND's ``inner_params`` for GPT-style models).

**ENN changes the model by design.** The editably-trained weights θ are the base that
edits start from: :func:`install` puts them into the model (and its ``restore()`` brings
back the pretrained weights, bit for bit); an ``edit(lm, r, "enn")`` on an installed model
takes the ``k`` steps from θ and its ``restore()`` returns to θ exactly. An edit on a model
without the base installs it first (then ``restore()`` returns to the pretrained weights),
so ENN's measured locality includes what editable training cost the model.

**How training runs here.** The inner step of one edit is a sum of rank-one gradients,
``∇W = Σ_t δ_t u_tᵀ`` (:mod:`medit_lite.methods.meta_edit`), so each row of a mini-batch
carries its own edited model as a low-rank update of the layer outputs, and θ itself enters
as ``W₀x + (θ − W₀)x``: the weights of the loaded model are never written while training.
The authors train on full datasets for many thousand steps; this trains a few hundred
steps of 8 edits on the zsRE training triples.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..editing import register
from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import LM
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
    pairs_nll,
    per_row,
    reference_logprobs,
    replayed_normed,
    row_mean_nll,
    target_logits,
    usable,
)


@dataclass(frozen=True)
class ENNHParams:
    """Hyperparameters of ENN's edit and of editable training (MEND's ``enn.yaml`` and
    ``config.yaml`` where they apply)."""

    layers: tuple[int, ...] = ()  # () = the last 3 layers (for_model fills them in)
    edit_steps: int = 1  # k (``n_edit_steps``)
    edit_lr: float = 1e-2  # initial step size η of every matrix
    c_edit: float = 0.1
    c_loc: float = 1.0
    c_base: float = 1.0
    lr: float = 1e-5  # Adam on the model's weights
    lr_lr: float = 1e-3  # Adam on the step sizes
    first_order: bool = False
    grad_clip: float = 100.0
    train_steps: int = 150
    batch_size: int = 8
    train_records: int | None = 120
    seed: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> ENNHParams:
        return cls(layers=tuple(range(lm.n_layers - 3, lm.n_layers)))

    def validate(self, lm: LM) -> None:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("hyperparameter layers has a layer twice")
        for name in ("edit_steps", "train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"hyperparameter {name} must be at least 1")
        if self.edit_lr <= 0 or self.lr <= 0 or self.lr_lr <= 0:
            raise ValueError("hyperparameters edit_lr, lr and lr_lr must be positive")

    def training_part(self) -> dict:
        return dataclasses.asdict(self)


def inner_names(lm: LM, layers: Sequence[int]) -> list[str]:
    """The weight matrices ENN edits: every 2-D weight of the MLPs of ``layers``
    (gate, up and down projections in Llama-family models; GPT-2's ``c_fc``, ``c_proj``)."""
    names = []
    for layer in layers:
        prefix = lm.module_name("mlp", layer)
        for sub, module in lm.module("mlp", layer).named_modules():
            w = getattr(module, "weight", None)
            if sub and isinstance(w, torch.Tensor) and w.dim() == 2:
                names.append(f"{prefix}.{sub}.weight")
    return names


def _module(lm: LM, weight_name: str) -> nn.Module:
    return lm.model.get_submodule(weight_name.rsplit(".", 1)[0])


def _out_in(lm: LM, module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A weight as (d_out, d_in): GPT-2's Conv1D stores it transposed."""
    return w if isinstance(module, nn.Linear) else w.T


class ENNBase(nn.Module):
    """What editable training produces: the edited matrices' trained values θ (as
    ``[d_out, d_in]``) and their step sizes η."""

    def __init__(self, lm: LM, hp: ENNHParams):
        super().__init__()
        self.names = inner_names(lm, hp.layers)
        params = dict(lm.model.named_parameters())
        self.weights = nn.ParameterList(
            nn.Parameter(_out_in(lm, _module(lm, n), params[n].detach()).float().clone())
            for n in self.names
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.names),), float(hp.edit_lr)))


def _shift_hooks(h: Hooks, modules, base: ENNBase, originals) -> None:
    """Layer outputs as if the weights were θ: ``W₀x + (θ − W₀)x``."""
    for m, theta, w0 in zip(modules, base.weights, originals):
        box = h.capture_input(m, detach=False)

        def fn(out, box=box, theta=theta, w0=w0):
            return out + (box.value.float() @ (theta - w0).T).to(out.dtype)

        h.edit_output(m, fn)


class _Trainer:
    """One mini-batch of the editable-training objective (Eq. 4)."""

    def __init__(self, lm: LM, base: ENNBase, hp: ENNHParams, exs: list[Example]):
        self.lm, self.base, self.hp = lm, base, hp
        self.first = min(hp.layers)
        self.modules = [_module(lm, n) for n in base.names]
        params = dict(lm.model.named_parameters())
        self.originals = [
            _out_in(lm, m, params[n].detach()).float() for m, n in zip(self.modules, base.names)
        ]
        self.cache = TripleCache(lm, exs, self.first, desc="ENN: layer inputs")

    def _hooks_at(self, done: list[list]):
        """Hooks that run θ with the inner steps ``done`` so far."""

        def install(h: Hooks) -> None:
            _shift_hooks(h, self.modules, self.base, self.originals)
            add_row_updates(h, self.modules, done)

        return install

    def _inner_steps(self, exs, hidden) -> list[list]:
        """The ``k`` inner steps of every row, as per-module low-rank updates."""
        lm, hp, n = self.lm, self.hp, len(exs)
        steps: list[list] = [[] for _ in self.modules]
        for _ in range(hp.edit_steps):
            extra = self._hooks_at([list(s) for s in steps])

            found = module_gradient_pairs(
                lm,
                self.modules,
                [e.edit for e in exs],
                hidden=hidden,
                start=self.first,
                create_graph=not hp.first_order,
                extra=extra,
            )
            for i, (rows, u, d) in enumerate(found):
                if hp.first_order:
                    u, d = u.detach(), d.detach()
                V, D = per_row((rows, u, d), n, lm.device)
                steps[i].append((V, D, -self.base.edit_lrs[i]))
        return steps

    def __call__(self, batch: list) -> tuple[torch.Tensor, dict]:
        if self.hp.first_order:
            return self._loss(batch)
        # second order: the fused attention kernels have no double backward on every
        # device; the composite ("math") one does
        with sdpa_kernel(SDPBackend.MATH):
            return self._loss(batch)

    def _loss(self, batch: list) -> tuple[torch.Tensor, dict]:
        lm, hp, dev = self.lm, self.hp, self.lm.device
        exs = [b.extra["_enn"] for b in batch]
        n = len(exs)
        steps = self._inner_steps(exs, self.cache.hidden(exs, [0]))
        seqs = [e.equiv[0] + e.equiv[1] for e in exs] + [e.loc for e in exs]
        ids, mask = pad(seqs, lm.tokenizer.pad_token_id)
        ids, mask = ids.to(dev), mask.to(dev)
        hidden = self.cache.hidden(exs, [1, 2])
        loc_mask = self.cache.loc_mask(exs, mask[n:])
        loc = (ids[n:], mask[n:], hidden[n:], self.first)
        orig_logp = reference_logprobs(lm, *loc, loc_mask)  # the original model
        with Hooks() as h:  # θ, before the edit
            _shift_hooks(h, self.modules, self.base, self.originals)
            pre_logp = answer_logprobs(lm, replayed_normed(lm, *loc), loc_mask)
        doubled = [[(torch.cat([V, V]), torch.cat([D, D]), s) for V, D, s in st] for st in steps]
        with Hooks() as h:  # Edit(θ), each row its own edit
            _shift_hooks(h, self.modules, self.base, self.originals)
            add_row_updates(h, self.modules, doubled)
            normed = replayed_normed(lm, ids, mask, hidden, self.first)
        equiv = [e.equiv for e in exs]
        logits, rows, targets = target_logits(lm, normed, equiv)
        l_edit = row_mean_nll(logits, rows, targets, n).mean()
        l_loc = kl(pre_logp.detach(), answer_logprobs(lm, normed[n:], loc_mask))
        l_base = kl(orig_logp, pre_logp)
        loss = hp.c_edit * l_edit + hp.c_loc * l_loc + hp.c_base * l_base
        return loss, {
            "edit_nll": float(l_edit.detach()),
            "loc_kl": float(l_loc.detach()),
            "base_kl": float(l_base.detach()),
        }


def new_base(lm: LM, hp: ENNHParams) -> ENNBase:
    torch.manual_seed(hp.seed)
    return ENNBase(lm, hp).to(lm.device)


def fit_base(lm: LM, base: ENNBase, data: Sequence[EditRequest], hp: ENNHParams) -> TrainLog:
    """Editable training of ``base`` on ``data`` with :func:`medit_lite.training.train`."""
    data = usable(data)
    exs = examples(lm, data)
    if len(exs) < 2:
        raise ValueError("ENN needs at least 2 training records with a rephrase and a probe")
    t0 = time.perf_counter()
    loss_fn = _Trainer(lm, base, hp, exs)
    items = [dataclasses.replace(r, extra={"_enn": e}) for r, e in zip(data, exs)]
    prep = time.perf_counter() - t0

    def adam(params):
        rates = [base.edit_lrs]
        rest = [p for p in params if p is not base.edit_lrs]
        return torch.optim.Adam([{"params": rest, "lr": hp.lr}, {"params": rates, "lr": hp.lr_lr}])

    log = train(
        base,
        loss_fn,
        items,
        steps=hp.train_steps,
        batch_size=min(hp.batch_size, len(items)),
        lr=hp.lr,
        seed=hp.seed,
        grad_clip=hp.grad_clip,
        desc="ENN editable training",
        optimizer=adam,
    )
    log.logs["prep_seconds"] = [prep]
    return log


#: Models whose ENN base is installed (id of the HF model -> the base).
_INSTALLED: dict[int, ENNBase] = {}
#: ENN's editably-trained bases, per model and hyperparameters.
BASES = TrainedParts(
    "enn",
    ENNHParams,
    new=lambda lm, hp: new_base(lm, hp),
    fit=lambda lm, base, data, hp: fit_base(lm, base, data, hp),
    data_for=lambda hp: default_training_requests(limit=hp.train_records),
    select=usable,
)


def enn_base(
    lm: LM,
    hp: ENNHParams | None = None,
    *,
    data: Sequence[EditRequest] | None = None,
    retrain: bool = False,
) -> tuple[ENNBase, TrainLog]:
    """The editably-trained weights for ``lm`` and ``hp`` (cached on disk and in memory).
    Must be called on the pretrained model (it is, the first time, by every ENN edit)."""
    hp = hp or ENNHParams.for_model(lm)
    if id(lm.model) in _INSTALLED and (data is not None or retrain or not is_trained(lm, hp)):
        raise RuntimeError("ENN's base is installed in this model: restore it before training")
    return BASES.get(lm, hp, data=data, retrain=retrain)


@register_trainer("enn")
def train_enn(lm: LM, hp=None, *, data=None, retrain: bool = False) -> TrainLog:
    """Editable training (or loading it): ``python -m medit_lite train --method enn``."""
    return enn_base(lm, hp, data=data, retrain=retrain)[1]


def is_trained(lm: LM, hp: ENNHParams | None = None) -> bool:
    """Whether :func:`enn_base` will load rather than train."""
    return BASES.is_trained(lm, hp)


# -- installing the base -------------------------------------------------------------------
def _write_base(lm: LM, base: ENNBase) -> None:
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, theta in zip(base.names, base.weights):
            w = params[name]
            value = _out_in(lm, _module(lm, name), theta.detach())
            w.copy_(value.to(device=w.device, dtype=w.dtype))


@dataclass
class Installed:
    """The ENN base in a model; ``restore()`` puts the pretrained weights back exactly."""

    lm: LM
    backup: dict[str, torch.Tensor] = field(repr=False)
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        params = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for name, saved in self.backup.items():
                params[name].copy_(saved)
        _INSTALLED.pop(id(self.lm.model), None)
        self.restored = True

    def __enter__(self) -> Installed:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def install(lm: LM, hp: ENNHParams | None = None) -> Installed:
    """Put the editably-trained weights into ``lm`` (training them first if needed)."""
    hp = hp or ENNHParams.for_model(lm)
    if id(lm.model) in _INSTALLED:
        raise RuntimeError("ENN's base is already installed in this model")
    base, _ = enn_base(lm, hp)
    params = dict(lm.model.named_parameters())
    backup = {n: params[n].detach().clone() for n in base.names}
    _write_base(lm, base)
    _INSTALLED[id(lm.model)] = base
    return Installed(lm, backup)


def is_installed(lm: LM) -> bool:
    return id(lm.model) in _INSTALLED


# -- the edit -----------------------------------------------------------------------------
def _weights(lm: LM, hp: ENNHParams) -> list[str]:
    return inner_names(lm, hp.layers)


def edit_steps(lm: LM, base: ENNBase, requests: Sequence[EditRequest], k: int) -> list[float]:
    """``k`` steps ``W ← W − η ⊙ ∇W L_edit`` on the model's weights (in place); returns
    the loss before each step."""
    params = dict(lm.model.named_parameters())
    weights = [params[n] for n in base.names]
    pairs = [encode_pair(lm, r.text, r.target_new) for r in requests]
    losses = []
    for _ in range(k):
        for w in weights:
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = pairs_nll(lm, pairs).sum()
                grads = torch.autograd.grad(loss, weights)
        finally:
            for w in weights:
                w.requires_grad_(False)
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for w, g, lr in zip(weights, grads, base.edit_lrs):
                w -= (lr * g).to(w.dtype)
    return losses


@register("enn", ENNHParams, _weights)
def apply_enn(lm: LM, requests: list[EditRequest], hp: ENNHParams) -> dict:
    """ENN: ``k`` gradient steps with learned step sizes from the editably-trained weights
    (Sinitsin et al., 2020, Eq. 1); installs those weights first when the model lacks them."""
    installed_here = not is_installed(lm)
    base, log = enn_base(lm, hp) if installed_here else (_INSTALLED[id(lm.model)], None)
    t0 = time.perf_counter()
    info: dict = {}
    if installed_here:
        _write_base(lm, base)
        key = id(lm.model)
        _INSTALLED[key] = base
        info["undo"] = lambda: _INSTALLED.pop(key, None)
    losses = edit_steps(lm, base, requests, hp.edit_steps)
    info.update(
        edit_seconds=time.perf_counter() - t0,
        edit_losses=losses,
        installed_base=installed_here,
        trained_from_cache=None if log is None else log.from_cache,
    )
    return info
