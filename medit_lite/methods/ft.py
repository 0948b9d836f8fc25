"""Fine-tuning baselines: FT and FT-L.

Both minimise the teacher-forced negative log-likelihood of the new target, over all its
tokens, given the edit prompt, with Adam on the MLP output matrices
(``W_out`` of ``mlp_out``) of the chosen layers, all other weights frozen:

    min_W  (1/N) Σ_i  -(1/T_i) Σ_t log p_W(o*_{i,t} | p_i, o*_{i,<t})

**FT** leaves the weights free. **FT-L** is the norm-constrained fine-tuning of
Zhu et al. (2020), the "FT+L" baseline of ROME (Meng et al., 2022, §4.2): after every step
the weights are projected back into an ℓ∞ ball of radius ε around the original ones,
``W ← clip(W, W₀ − ε, W₀ + ε)``, which limits how far any single weight can move.

Defaults: for GPT-2 XL the values of ROME's FT+L configuration (layer 17, 25 steps,
lr 5e-4, ε = 5e-4); for other models the values tuned in this project on the default
SmolLM2-135M model (see ``FTHParams.for_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..editing import register
from ..metrics import encode_pair, pair_logits
from ..models import LM
from ..requests import EditRequest


@dataclass(frozen=True)
class FTHParams:
    """Hyperparameters of FT / FT-L."""

    layers: tuple[int, ...] = (0,)
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = None  # ε of the ℓ∞ ball (FT-L); None = FT
    weight_decay: float = 0.0
    early_stop_nll: float = 1e-2  # stop once the mean target NLL is below this
    batch_size: int = 16

    @classmethod
    def for_model(cls, lm: LM) -> FTHParams:
        """FT defaults for ``lm``: the paper's where it gives them, else tuned here."""
        return replace(_base_defaults(lm), norm_constraint=None)

    def validate(self, lm: LM) -> None:
        if self.steps < 1:
            raise ValueError("hyperparameter steps must be at least 1")
        if self.lr <= 0:
            raise ValueError("hyperparameter lr must be positive")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError("hyperparameter norm_constraint must be positive (or None for FT)")
        if self.batch_size < 1:
            raise ValueError("hyperparameter batch_size must be at least 1")


@dataclass(frozen=True)
class FTLHParams(FTHParams):
    """FT-L: the same fields, with the ℓ∞ constraint on by default."""

    @classmethod
    def for_model(cls, lm: LM) -> FTLHParams:
        base = _base_defaults(lm)
        fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
        fields["norm_constraint"] = base.norm_constraint or DEFAULT_EPSILON
        return cls(**fields)

    def validate(self, lm: LM) -> None:
        super().validate(lm)
        if self.norm_constraint is None:
            raise ValueError("FT-L needs norm_constraint (use method 'ft' for none)")


def _base_defaults(lm: LM) -> FTHParams:
    if lm.name in PAPER_DEFAULTS:
        return PAPER_DEFAULTS[lm.name]
    # tuned on SmolLM2-135M (see chapter 1): a layer a third of the way up
    return FTHParams(layers=(lm.n_layers // 3,), lr=1e-3, steps=40)


#: ε used where no paper value exists (tuned on the default model).
DEFAULT_EPSILON = 5e-3
#: ROME's FT+L configuration for GPT-2 XL (Meng et al., 2022, Appendix; repo hparams/FT).
PAPER_DEFAULTS = {
    "gpt2-xl": FTHParams(layers=(17,), lr=5e-4, steps=25, norm_constraint=5e-4),
}


def _weights(lm: LM, hp: FTHParams) -> list[str]:
    return [lm.module_name("mlp_out", layer) + ".weight" for layer in hp.layers]


def finetune(lm: LM, requests: list[EditRequest], hp: FTHParams) -> dict:
    """Adam on the target NLL over the chosen MLP output weights (projected for FT-L)."""
    params = dict(lm.model.named_parameters())
    weights = [params[n] for n in _weights(lm, hp)]
    originals = [w.detach().clone() for w in weights]
    pairs = [encode_pair(lm, r.text, r.target_new) for r in requests]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=hp.lr, weight_decay=hp.weight_decay)
    losses = []
    try:
        for _ in range(hp.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for start in range(0, len(pairs), hp.batch_size):
                chunk = pairs[start : start + hp.batch_size]
                loss = _mean_target_nll(lm, chunk) * len(chunk) / len(pairs)
                loss.backward()
                total += float(loss.detach())
            losses.append(total)
            if total < hp.early_stop_nll:
                break
            optimizer.step()
            if hp.norm_constraint is not None:
                with torch.no_grad():
                    for w, w0 in zip(weights, originals):
                        w.copy_(torch.clamp(w, w0 - hp.norm_constraint, w0 + hp.norm_constraint))
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
    return {"losses": losses, "steps": len(losses)}


def _mean_target_nll(lm: LM, pairs) -> torch.Tensor:
    logits = pair_logits(lm, pairs)
    nlls = [
        torch.nn.functional.cross_entropy(lg.float(), torch.tensor(t, device=lg.device))
        for lg, (_, t) in zip(logits, pairs)
    ]
    return torch.stack(nlls).mean()


@register("ft", FTHParams, _weights)
def apply_ft(lm: LM, requests: list[EditRequest], hp: FTHParams) -> dict:
    """FT: unconstrained fine-tuning of one MLP output matrix."""
    return finetune(lm, requests, hp)


@register("ft-l", FTLHParams, _weights)
def apply_ft_l(lm: LM, requests: list[EditRequest], hp: FTHParams) -> dict:
    """FT-L: fine-tuning with an ℓ∞ norm constraint (Zhu et al., 2020)."""
    return finetune(lm, requests, hp)
