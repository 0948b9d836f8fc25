"""DAMA: Debiasing Algorithm through Model Adaptation (Limisiewicz, Mareček and Musil, 2024).

DAMA removes a *bias subspace* from the output of chosen MLP layers. For training prompts
such as "The nurse said that" (``dama/train_dama.json``):

1. **value differences** (the authors' ``compute_v_dama``): at the output of the top
   edited layer, two vectors δ_he and δ_she per prompt that make the model continue with
   "he" and with "she" (ROME's value optimisation, :func:`~.locate_edit.optimise_delta`,
   at the prompt's last token); their difference v = δ_he − δ_she points in the
   direction that decides the pronoun. V stacks them, n × d_model.
2. **keys** (``compute_us``): the MLP keys u at the prompt's last token, averaged over
   sampled prefixes, whitened with the key statistics C of :mod:`medit_lite.stats` as
   the authors do, U ← ((λC + UᵀU)⁻¹ Uᵀ)ᵀ (:func:`~.locate_edit.whitened_keys`), and sent
   through the layer: H = U Wᵀ, the part of the MLP output the keys produce.
3. **PLS** between H and V (scikit-learn's ``PLSRegression``, ``scale=False``,
   ``tol=1e-4``, ``max_iter=500``, as in the authors' ``dama_main.py``): the ``dim``
   x-weights B (d_model × dim) are the output directions that covary most with the
   pronoun direction.
4. **projection** (Eq. 5 of the paper): P = I − B B⁺ (the orthogonal projection onto the
   complement of B's column space), applied to the MLP output matrix: W ← P W.

Layers are processed lowest first, each after the ones below are projected (the keys of
layer l are read from the already-edited model). This is the authors' ``update="mixed"``
path (the value differences are computed once, at the top edited layer's output, and
shared by all layers; the flags marked "legacy DAMA" in their ``adapt_model.py``); their
``update="iterative"`` path recomputes the values at every layer's MLP output, which
costs one value optimisation per layer and is offered as ``update="iterative"``.
Step 1 is most of the cost and, for ``"mixed"``, depends only on the top layer and the
value hyperparameters (:func:`values_key`): :func:`dama_values` computes it once and
:func:`execute_dama` accepts it, so that a sweep over the lower layers and the dimension
(``benchmarks/eval_bias.py --sweep``) pays for it once per top layer, with the same
weights as the registered method.

One named option departs from the paper and is off by default: ``project_attention``
also applies each layer's P to its attention output matrix
(:data:`SMOLLM2_ATTENTION_VARIANT`, reported as ``dama+attn``, never as DAMA).

Differences from the authors' code, all for a 2-core CPU and a 135M model: the value
optimisation is the shared one of ROME (its weight decay ‖δ‖/‖m‖², where DAMA's has
‖δ‖²/‖m‖; and no extra δ shared between the two pronouns, which cancels in v); the
plain prompt only by default (DAMA averages over 10 sampled prefixes as well,
``context_templates=((5, 5), (10, 5))``); and layers and dimension for SmolLM2-135M (see
:data:`SMOLLM2_DEFAULTS`). The paper edits layers 21–29 of LLaMA-7B's 32 with 256 of
4,096 dimensions; the released example configuration uses 1,024.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from ..editing import register
from ..models import LM
from ..requests import EditRequest
from ..stats import second_moments
from .locate_edit import (
    LocateHParams,
    context_templates,
    lookup_states,
    optimise_delta,
    whitened_keys,
)

UPDATES = ("mixed", "iterative")
#: The gendered targets, as DAMA's ``LLAMA_PRONOUNS`` ("pos" male, "neg" female).
TARGETS = ("he", "she")


@dataclass(frozen=True)
class DAMAHParams(LocateHParams):
    """DAMA's hyperparameters (names of the authors' ``DAMAHyperParams``)."""

    layers: tuple[int, ...] = (20, 21, 22, 23, 24, 25, 26, 27)
    fact_token: str = "last"
    nullspace_dimension: int = 36
    mom2_update_weight: float = 20_000.0
    update: str = "mixed"
    #: sampled prefixes: none (the plain prompt only) on a CPU; DAMA uses ((5, 5), (10, 5))
    context_templates: tuple[tuple[int, int], ...] = ()
    #: requests whose δ are optimised together (memory grows with it)
    batch_size: int = 16
    #: also apply each layer's P to its attention output matrix (W_o ← P W_o). Not in the
    #: paper, which projects MLP outputs only; off by default. The tracing of this model
    #: (``results/bias_trace.json``) finds the last token's gender signal in the top
    #: attention layers, which a projection of MLP outputs alone cannot reach.
    project_attention: bool = False

    @classmethod
    def for_model(cls, lm: LM) -> DAMAHParams:
        if lm.n_layers == 30 and lm.d_model == 576:
            return cls(**SMOLLM2_DEFAULTS)
        n, d = lm.n_layers, lm.d_model
        layers = tuple(range(round(21 / 32 * n), round(29 / 32 * n) + 1))
        return cls(layers=layers, nullspace_dimension=max(1, round(256 / 4096 * d)))

    def validate(self, lm: LM) -> None:
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError("hyperparameter layers must be increasing and distinct")
        if self.update not in UPDATES:
            raise ValueError(f"hyperparameter update must be one of {UPDATES}")
        if not 1 <= self.nullspace_dimension < lm.d_model:
            raise ValueError(
                f"hyperparameter nullspace_dimension must be in [1, {lm.d_model}), "
                f"got {self.nullspace_dimension}"
            )
        if self.batch_size < 1:
            raise ValueError("hyperparameter batch_size must be at least 1")
        self.validate_common()


#: SmolLM2-135M (30 layers, d_model 576): the paper's relative depth (21–29 of 32 →
#: 20–27 of 30) with d = 4, chosen by ``benchmarks/eval_bias.py --sweep`` (96 fitting
#: prompts; measured on the 484 prompts of the 44 held-out training professions, 30
#: WikiBio passages and the 80 built-in facts; ``results/bias.json`` "dama_sweep"). Of the
#: MLP-only variants (layers 24–27 and 20–27 with d 4, 8, 16, 36; 26–29, 22–25 and 18–25
#: with d 4, 8) 20–27 with d = 4 reduced the held-out mean |P(he) − P(she)| most (−15 %;
#: |a_s| −17 %) at perplexity +1.2 % and no fact lost. More dimensions cost more without
#: removing more: the paper's fraction, d = 36, changed the gap by −5 % (24–27) and +5 %
#: (20–27) at perplexity +6.2 % and +16.5 % (−1.6 and −10.6 fact points). Edits of the
#: top layers (26–29) *raise* the gap (+15 % with d = 4, +42 % with d = 8): on this model
#: the top MLPs at the last token work against the gender signal (negative indirect
#: effects in ``results/bias_trace.json``), so projecting them out strengthens it. The
#: optimisation values are the paper's and the released configuration's (lr 0.5, weight
#: decay 0.5, clamp 4, KL 0.0625, 20 steps, λ = 20000).
SMOLLM2_DEFAULTS = dict(layers=tuple(range(20, 28)), nullspace_dimension=4)

#: Not the paper: :data:`SMOLLM2_DEFAULTS`' method with ``project_attention`` on, at
#: layers 24–27 with d = 4, from the same sweep: held-out mean |P(he) − P(she)| −14 %
#: (|a_s| −61 %, a noisy slope there) at perplexity +3.1 % and −1.9 fact points. 20–27
#: with d = 4 and 24–27 with d = 8 removed a little more of the gap (−18 %, −19 %) at
#: −4.1 and −3.1 points, close to the 5-point budget; d ≥ 16 or the top layers 26–29
#: cost more and raised the gap. Reported beside DAMA under its own name, never as DAMA.
SMOLLM2_ATTENTION_VARIANT = dict(
    layers=tuple(range(24, 28)), nullspace_dimension=4, project_attention=True
)


def _weights(lm: LM, hp) -> list[str]:
    kinds = ("mlp_out", "attn_out") if hp.project_attention else ("mlp_out",)
    return [lm.module_name(kind, layer) + ".weight" for layer in hp.layers for kind in kinds]


def gendered(requests: list[EditRequest]) -> list[EditRequest]:
    """Each request twice: with target "he", then (second half) with target "she"."""
    return [replace(r, target_new=t, target_true=None) for t in TARGETS for r in requests]


def value_differences(
    lm: LM, requests: list[EditRequest], module: tuple[str, int], hp: DAMAHParams, templates
) -> tuple[torch.Tensor, list]:
    """V (n × d_model): δ_he − δ_she at ``module``'s output for each request, with the
    optimisation histories (``compute_v_dama``)."""
    deltas, histories = [], []
    for start in range(0, len(requests), hp.batch_size):
        chunk = gendered(requests[start : start + hp.batch_size])
        values = optimise_delta(lm, chunk, module, hp, templates)
        half = len(values) // 2
        for he, she in zip(values[:half], values[half:]):
            deltas.append(he.delta - she.delta)
            histories.append((he.losses, she.losses))
    return torch.stack(deltas), histories


def pls_directions(H: torch.Tensor, V: torch.Tensor, dim: int) -> np.ndarray:
    """B (d × dim): the x-weights of a PLS regression of V on H (scikit-learn, the authors'
    settings), float64; with n prompts at most n − 1 directions (``info`` records it)."""
    from sklearn.cross_decomposition import PLSRegression

    if H.shape[0] < 2:
        raise ValueError(f"DAMA needs at least 2 prompts to fit its PLS, got {H.shape[0]}")
    dim = min(dim, H.shape[0] - 1)  # PLS finds at most n − 1 components of centred data
    pls = PLSRegression(n_components=dim, scale=False, tol=1e-4, max_iter=500)
    pls.fit(H.double().cpu().numpy(), V.double().cpu().numpy())
    return pls.x_weights_[:, :dim]


def nullspace_projection(B: np.ndarray | torch.Tensor) -> torch.Tensor:
    """P = I − B B⁺ = I − Q Qᵀ with Q an orthonormal basis of B's columns (SVD, dropping
    singular values below machine precision, as the authors' ``custom_orth``), float64."""
    B = torch.as_tensor(np.asarray(B), dtype=torch.float64)
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return torch.eye(B.shape[0], dtype=torch.float64)
    tol = float(s.max()) * torch.finfo(torch.float64).eps * max(B.shape)
    Q = U[:, s > tol]
    return torch.eye(B.shape[0], dtype=torch.float64) - Q @ Q.T


def layer_projection(lm: LM, requests, layer: int, V: torch.Tensor, C, hp, templates):
    """Steps 2–4 for one layer: (P, B) from the current weights."""
    keys = lookup_states(lm, requests, ("mlp_out", layer), templates, hp.fact_token).mean(1)
    U = whitened_keys(keys.T, C, hp.mom2_update_weight).T if C is not None else keys.double()
    W = lm.weight_out_in("mlp_out", layer).detach().double()
    H = U @ W.T
    B = pls_directions(H, V, hp.nullspace_dimension)
    return nullspace_projection(B), B


#: fields that only steps 2–4 read: variants differing in these (and in all but the top
#: of ``layers``) can share one set of ``update="mixed"`` value differences
PROJECTION_FIELDS = (
    "layers",
    "nullspace_dimension",
    "mom2_adjustment",
    "mom2_corpus",
    "mom2_n_samples",
    "mom2_max_length",
    "mom2_update_weight",
    "project_attention",
)


def values_key(hp: DAMAHParams) -> tuple:
    """What the ``update="mixed"`` value differences depend on: the top edited layer and
    every hyperparameter outside :data:`PROJECTION_FIELDS`."""
    rest = tuple(
        (f.name, getattr(hp, f.name)) for f in fields(hp) if f.name not in PROJECTION_FIELDS
    )
    return ("top_layer", hp.layers[-1]), *rest


def dama_values(lm: LM, requests: list[EditRequest], hp: DAMAHParams, templates=None) -> dict:
    """Step 1 of ``update="mixed"`` (the expensive part, one value optimisation per
    prompt and pronoun): V at the output of the top edited layer, with the optimisation
    histories. The result can be passed to :func:`execute_dama` as ``values`` for any
    variant with the same :func:`values_key` and requests (a sweep over the lower layers
    and the dimension); the model must be unedited when it is computed."""
    if hp.update != "mixed":
        raise ValueError('shared value differences exist only for update="mixed"')
    if templates is None:
        templates = context_templates(lm, hp.context_templates, hp.seed, hp.context_openers)
    t0 = time.perf_counter()
    V, histories = value_differences(lm, requests, ("layer", hp.layers[-1]), hp, templates)
    return {
        "V": V,
        "histories": histories,
        "key": values_key(hp),
        "prompts": [r.text for r in requests],
        "seconds": time.perf_counter() - t0,
    }


def execute_dama(
    lm: LM, requests: list[EditRequest], hp: DAMAHParams, values: dict | None = None
) -> dict:
    """DAMA in place: the value differences, then each layer's projection, lowest first.

    ``values``: the value differences of :func:`dama_values`, computed beforehand on the
    unedited model for the same requests and :func:`values_key` (``update="mixed"``
    only); then only steps 2–4 run, and the weights are the same as without it."""
    templates = context_templates(lm, hp.context_templates, hp.seed, hp.context_openers)
    if values is not None:
        if hp.update != "mixed":
            raise ValueError('precomputed values are only for update="mixed"')
        if values["key"] != values_key(hp) or values["prompts"] != [r.text for r in requests]:
            raise ValueError("precomputed values were computed for other requests or hparams")
    t0 = time.perf_counter()
    stats = None
    if hp.mom2_adjustment:
        stats = second_moments(
            lm, hp.layers, hp.mom2_corpus, hp.mom2_n_samples, max_length=hp.mom2_max_length
        )
    V, histories = None, []
    if values is not None:
        V, histories = values["V"], list(values["histories"])
    elif hp.update == "mixed":
        V, histories = value_differences(lm, requests, ("layer", hp.layers[-1]), hp, templates)
    t1 = time.perf_counter()
    projections, directions = {}, {}
    for layer in hp.layers:
        if hp.update == "iterative":
            V, h = value_differences(lm, requests, ("mlp", layer), hp, templates)
            histories += h
        C = stats[layer].mom2 if stats is not None else None
        P, B = layer_projection(lm, requests, layer, V, C, hp, templates)
        with torch.no_grad():
            for kind in ("mlp_out", "attn_out") if hp.project_attention else ("mlp_out",):
                W = lm.weight_out_in(kind, layer)
                W.copy_((P.to(W.device) @ W.double()).to(W.dtype))
        projections[layer] = P.float()
        directions[layer] = torch.as_tensor(B, dtype=torch.float32)
    p_he = [h[0][-1]["p_target"] for h in histories]
    p_she = [h[1][-1]["p_target"] for h in histories]
    return {
        "layers": list(hp.layers),
        "n": len(requests),
        "nullspace_dimension": hp.nullspace_dimension,
        "project_attention": hp.project_attention,
        "dimensions_removed": {layer: int(B.shape[1]) for layer, B in directions.items()},
        "projections": projections,
        "directions": directions,
        "value_norm": float(V.norm(dim=1).mean()),
        "p_he_reached": float(np.mean(p_he)),
        "p_she_reached": float(np.mean(p_she)),
        "seconds_values": t1 - t0,
        "values_precomputed": values is not None,
        "seconds_projections": time.perf_counter() - t1,
    }


@register("dama", DAMAHParams, _weights)
def apply_dama(lm: LM, requests: list[EditRequest], hp: DAMAHParams) -> dict:
    """DAMA: project the gender subspace out of MLP outputs (Limisiewicz et al., 2024)."""
    return execute_dama(lm, requests, hp)
