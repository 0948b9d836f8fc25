"""Integrated-gradients attribution of FFN neurons (knowledge attribution).

Dai et al. (ACL 2022, "Knowledge Neurons in Pretrained Transformers", §3.1) score every
intermediate neuron of a feed-forward layer by how much it contributes to the probability
of a fact's answer. Let ``w`` be the activations of layer ``l``'s FFN intermediate neurons
(here: the input of the MLP output matrix, ``lm.module("mlp_out", l)``; for Llama's gated
MLP that is ``act(gate x) * (up x)``) at the position that predicts the answer, and
``P_x(ŵ)`` the model's probability of the answer when that position's activations are
replaced by ``ŵ`` (every other layer and position untouched). Their Eq. 3 is the
integrated gradient from the baseline ``w' = 0``::

    Attr(w_i) = w_i ∫_0^1 ∂P_x(α w) / ∂w_i dα

and Eq. 4 its Riemann approximation with ``m`` steps (``m = 20`` in the paper)::

    Attr(w_i) ≈ (w_i / m) Σ_{k=1}^{m} ∂P_x((k/m) w) / ∂w_i

By the completeness of integrated gradients (Sundararajan et al., 2017), the attributions
of one layer sum to ``P_x(w) − P_x(0)`` up to the discretisation error of the sum.

**Captum or our own sum.** Captum's ``LayerIntegratedGradients`` computes the same
quantity, but it is not installed here, it would need a forward function wrapping the HF
model and a per-layer, per-position patch anyway (it attributes a whole layer's output
at every position, while the paper patches one position), and the Riemann sum is a dozen
lines on top of :mod:`medit_lite.hooks`. So this is a hand-written, batched right Riemann
sum (``k = 1..m``, exactly Eq. 4; the authors' code ``Hunter-DDM/knowledge-neurons``
uses the left sum ``k = 0..m-1``, which differs by ``O(1/m)``).

**Batching.** For one (prompt, target token, layer) the ``m`` steps are ``m`` rows of one
batch, row ``k`` carrying ``(k/m) w`` at the patched position: one forward and one backward
pass for all steps, never one per step or per neuron. Two exact shortcuts make a row cheap:
(1) the patched position is the last one of its input, so the tokens before it are those
of the clean run: their keys and values are recorded once and each row holds a single
token; (2) the layers below the patched one compute what they did in the clean run, so a
row starts at its layer from the clean residual stream
(:func:`medit_lite.replay.staggered_layers`), which also lets the rows of several layers
share a pass (``MAX_ROWS`` rows at most), each paying only for its own layers. A slow loop
over full-prompt passes (``tests/test_attribution.py``) gives the same scores.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import LM
from ..replay import PrefixKV, cache_keyword, final_hidden, record_kv, staggered_layers


def _check(lm: LM, prompts, targets, layers, steps) -> list[int]:
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be lists of strings, not a single string")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    for p, t in zip(prompts, targets):
        if not isinstance(p, str) or not isinstance(t, str):
            raise TypeError("every prompt and target must be a string")
        if not p.strip():
            raise ValueError("a prompt is empty")
        if not t.strip():
            raise ValueError(f"the target for prompt {p!r} is empty")
    if layers is None:
        return list(range(lm.n_layers))
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer (or be None for all)")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer {layer!r} is not an integer")
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} is outside the model's {lm.n_layers} layers")
    return layers


MAX_ROWS = 256  # rows (steps x layers) of one batched pass


@dataclass
class _Clean:
    """One clean run of a sequence: every layer's keys and values, the residual stream
    entering every layer ([layers, n, d_model]) and the FFN activations ([layers, n, d_mlp])."""

    ids: list[int]
    kv: list
    stream: torch.Tensor
    acts: torch.Tensor


def _clean_run(lm: LM, ids: list[int]) -> _Clean:
    batch = torch.tensor([ids], device=lm.device)
    with torch.no_grad(), Hooks() as h:
        emb = h.capture_output(lm.module("embed"))
        outs = [h.capture_output(lm.module("layer", j)) for j in range(lm.n_layers - 1)]
        acts = [h.capture_input(lm.module("mlp_out", j)) for j in range(lm.n_layers)]
        with record_kv(lm) as kv:
            final_hidden(lm, input_ids=batch, use_cache=False)
    stream = torch.stack([emb.value[0]] + [box.value[0] for box in outs])
    return _Clean(ids, kv, stream, torch.stack([box.value[0] for box in acts]))


def _patched_pass(
    lm: LM,
    clean: _Clean,
    n: int,
    layers: Sequence[int],
    scaled: torch.Tensor,
    target_id: int,
) -> torch.Tensor:
    """P(``target_id``) after ``clean.ids[:n]``, one row per row of ``scaled``
    ([len(layers) * steps, d_mlp], block ``j`` of ``steps`` rows patching ``layers[j]``,
    layers ascending): each row's FFN activations at the last position of its layer are
    replaced by its row of ``scaled``."""
    steps = scaled.shape[0] // len(layers)
    rows = scaled.shape[0]
    starts = [layer for layer in layers for _ in range(steps)]
    pos = n - 1
    entry = clean.stream[torch.tensor(starts, device=lm.device), pos][:, None].clone()
    kv, extra = None, {}
    if pos > 0:
        mask_cache = DynamicCache(config=lm.model.config)
        kv = []
        for j, rec in enumerate(clean.kv):
            keys, values = rec.keys[:, :, :pos], rec.values[:, :, :pos]
            mask_cache.update(keys, values, j)
            expand = (bisect.bisect_right(starts, j), -1, -1, -1)  # the rows that run at j
            kv.append(PrefixKV(keys.expand(*expand), values.expand(*expand)))
        positions = torch.tensor([[pos]], device=lm.device)
        extra = {"position_ids": positions, "use_cache": True, cache_keyword(lm): mask_cache}
    ids = torch.tensor([[clean.ids[pos]]], device=lm.device).expand(rows, 1)
    with Hooks() as h:  # hooks first: the swapped stack hides the blocks' module paths
        for j, layer in enumerate(layers):
            h.edit_input(lm.module("mlp_out", layer), _patcher(scaled, j * steps, steps))
        with staggered_layers(lm, starts, entry, kv):
            extra.setdefault("use_cache", False)
            normed = final_hidden(lm, detach=False, input_ids=ids, **extra)
    logits = lm.module("unembed")(normed[:, -1].contiguous()).float()
    return torch.softmax(logits, dim=-1)[:, target_id]


def _patcher(scaled: torch.Tensor, first: int, steps: int):
    def patch(x: torch.Tensor) -> torch.Tensor:
        block = scaled[first : first + steps, None].to(x.dtype)
        return torch.cat([x[:first], block, x[first + steps :]])

    return patch


def neuron_attributions(
    lm: LM,
    prompts: list[str],
    targets: list[str],
    layers: Sequence[int] | None = None,
    steps: int = 20,
    per_token: bool = False,
) -> list[torch.Tensor]:
    """Integrated-gradients score of every FFN intermediate neuron, per (prompt, target).

    For each pair and each target token ``o_t`` (teacher forcing: the input is the prompt
    followed by ``o_<t``), the score of neuron ``i`` of layer ``l`` attributes
    ``P(o_t | prompt, o_<t)`` to that neuron's activation at the position that predicts
    ``o_t`` (Dai et al., 2022, Eq. 3-4, baseline zero, ``steps`` Riemann steps; other
    layers and positions untouched). Returns one float32 CPU tensor per pair: shape
    ``[len(layers), d_mlp]`` summed over the target's tokens, or ``[T, len(layers),
    d_mlp]`` with ``per_token=True``. ``layers=None`` means every layer, in that order.

    Cost: the ``steps`` rows of a (pair, token, layer) run in one batched forward and
    backward pass (rows of several layers share it, up to ``MAX_ROWS`` rows).
    """
    layers = _check(lm, prompts, targets, layers, steps)
    order = sorted(range(len(layers)), key=lambda j: layers[j])
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=lm.device) / steps
    group = max(1, MAX_ROWS // steps)
    out: list[torch.Tensor] = []
    for prompt, target in zip(prompts, targets):
        prompt_ids, target_ids = encode_pair(lm, prompt, target)
        if not target_ids:
            raise ValueError(f"target {target!r} has no tokens")
        if len(prompt_ids) + len(target_ids) > lm.max_length:
            raise ValueError(f"prompt and target do not fit the model's context: {prompt!r}")
        clean = _clean_run(lm, prompt_ids + target_ids[:-1])
        scores = torch.zeros(len(target_ids), len(layers), lm.d_mlp)
        for t, target_id in enumerate(target_ids):
            n = len(prompt_ids) + t
            for g in range(0, len(order), group):
                idx = order[g : g + group]
                chosen = [layers[j] for j in idx]
                w = clean.acts[chosen, n - 1].float()  # [len(chosen), d_mlp]
                scaled = (alphas[None, :, None] * w[:, None]).reshape(-1, lm.d_mlp)
                scaled.requires_grad_(True)
                with torch.enable_grad():
                    probs = _patched_pass(lm, clean, n, chosen, scaled, target_id)
                    (grad,) = torch.autograd.grad(probs.sum(), scaled)
                mean_grad = grad.reshape(len(chosen), steps, -1).mean(1)
                scores[t, idx] = (w * mean_grad).cpu()
        out.append(scores if per_token else scores.sum(0))
    return out


def plot_attribution_heatmap(scores: torch.Tensor, layers: Sequence[int] | None = None, title=""):
    """A layers × neurons heatmap of attribution scores ([len(layers), d_mlp]), with the
    largest score per layer marked."""
    import matplotlib.pyplot as plt

    scores = scores.float().cpu()
    layers = list(range(scores.shape[0])) if layers is None else list(layers)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    bound = float(scores.abs().max()) or 1.0
    im = ax.imshow(
        scores, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest"
    )
    ax.set(xlabel="FFN neuron", ylabel="layer", title=title)
    ax.set_yticks(range(len(layers))[::3], [str(layer) for layer in layers][::3])
    fig.colorbar(im, ax=ax, label="attribution (ΔP)")
    fig.tight_layout()
    return fig
