"""Steps shared by the methods that *learn to edit*: MEND, KnowledgeEditor (KE) and
Editable Neural Networks (ENN).

All three turn the gradient of the edit loss into a weight change, and all three are
trained on triples (edit, equivalent input, unrelated input). What they share lives here,
once:

* **gradient pairs**: for a linear map ``h = W u`` the gradient of a sequence loss is
  ``∇_W L = Σ_t δ_t u_tᵀ`` with ``δ_t = ∂L/∂h_t`` (Mitchell et al., 2022, §3.1), so one
  forward/backward pass gives, per edit, the pairs ``(u_t, δ_t)`` that carry its gradient
  (:func:`module_gradient_pairs`; with ``create_graph=True`` they stay differentiable, for
  ENN's second-order training);
* **the per-row update**: a change ``ΔW = c Σ_t d_t v_tᵀ`` built from pairs acts on a layer
  input ``x`` as ``c Σ_t (v_t · x) d_t``; a mini-batch whose rows each carry their own edit
  runs in one pass (:func:`lowrank_apply`, :func:`per_row`);
* **training triples and cached layer inputs**: the edited layers are the last ones, so the
  residual stream entering the first of them is computed once per training sequence
  (:func:`stream_cache`) and training passes run only the layers from there up
  (:func:`medit_lite.replay.replay_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import LM
from ..progress import progress
from ..replay import final_hidden, layer_input, replay_layers
from ..requests import EditRequest


def pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask for token sequences."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    return ids, mask


def target_positions(pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column (the position predicting each target token) and target id, flat."""
    rows = torch.cat([torch.full((len(t),), i) for i, (_, t) in enumerate(pairs)])
    cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(t) - 1) for p, t in pairs])
    ids = torch.cat([torch.tensor(t) for _, t in pairs])
    return rows, cols, ids


def row_mean_nll(
    logits: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    n: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per row, the mean NLL of its target tokens (``logits`` [N, V] at the flat positions);
    ``label_smoothing`` as :func:`torch.nn.functional.cross_entropy`'s."""
    nll = nn.functional.cross_entropy(
        logits.float(), ids.to(logits.device), reduction="none", label_smoothing=label_smoothing
    )
    rows = rows.to(logits.device)
    sums = torch.zeros(n, device=logits.device).index_add(0, rows, nll)
    counts = torch.zeros(n, device=logits.device).index_add(0, rows, torch.ones_like(nll))
    return sums / counts


def target_logits(
    lm: LM, normed: torch.Tensor, pairs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict each target token of ``pairs`` (rows of
    ``normed``, the final-norm output), with their rows and target ids."""
    rows, cols, ids = target_positions(pairs)
    dev = normed.device
    return lm.module("unembed")(normed[rows.to(dev), cols.to(dev)]), rows, ids


def replayed_normed(
    lm: LM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    hidden: torch.Tensor | None,
    start: int,
    *,
    grad: bool = True,
) -> torch.Tensor:
    """The final-norm output for padded ``ids`` under the model as it is (hooks
    included), running only the layers from ``start`` up on ``hidden``, the residual
    stream entering it (all layers when ``hidden`` is None); with gradients if ``grad``."""
    dev = lm.device
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        with replay_layers(lm, start, hidden):
            return final_hidden(
                lm,
                detach=not grad,
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                use_cache=False,
            )


@torch.no_grad()
def reference_logprobs(
    lm: LM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    hidden: torch.Tensor | None,
    start: int,
    loc_mask: torch.Tensor,
) -> torch.Tensor:
    """The locality reference: next-token log-probabilities at the ``loc_mask`` positions
    of the unrelated inputs, under the model as it is, without gradients."""
    return answer_logprobs(lm, replayed_normed(lm, ids, mask, hidden, start, grad=False), loc_mask)


def pairs_nll(
    lm: LM,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    hidden: torch.Tensor | None = None,
    start: int = 0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Each pair's mean target NLL under the model as it is (hooks included), with
    gradients; ``hidden``: the residual stream entering layer ``start`` (then only the
    layers from there up run)."""
    ids, mask = pad([p + t for p, t in pairs], lm.tokenizer.pad_token_id)
    normed = replayed_normed(lm, ids, mask, hidden, start)
    logits, rows, targets = target_logits(lm, normed, pairs)
    return row_mean_nll(logits, rows, targets, len(pairs), label_smoothing)


def module_gradient_pairs(
    lm: LM,
    modules: Sequence[nn.Module],
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    hidden: torch.Tensor | None = None,
    start: int = 0,
    create_graph: bool = False,
    label_smoothing: float = 0.0,
    extra=None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each module (a linear map), ``(row, u [N, d_in], δ [N, d_out])`` at every
    position of every edit sequence up to the last one that predicts a target token; the
    loss of a row is its mean target NLL, so ``Σ_t δ_t u_tᵀ`` over a row is that row's
    ``∇_W`` (the tests check it against autograd).

    ``hidden``: the residual stream entering layer ``start`` (then only the layers from
    there up run). ``create_graph``: keep ``u`` and ``δ`` differentiable with respect to
    the model's weights. ``extra``: a callable ``(hooks) -> None`` that installs further
    hooks for the pass (ENN's earlier inner steps)."""
    dev = lm.device
    leaves: list[torch.Tensor] = [None] * len(modules)  # type: ignore[list-item]

    def add_leaf(i):
        def fn(out):
            leaves[i] = torch.zeros_like(out, requires_grad=True)
            return out + leaves[i]

        return fn

    with torch.enable_grad(), Hooks() as h:
        inputs = [h.capture_input(m, detach=not create_graph) for m in modules]
        if extra is not None:
            extra(h)
        for i, m in enumerate(modules):
            h.edit_output(m, add_leaf(i))
        loss = pairs_nll(lm, pairs, hidden=hidden, start=start, label_smoothing=label_smoothing)
        grads = torch.autograd.grad(loss.sum(), leaves, create_graph=create_graph)
    # every position that can influence a target token: up to the last one predicting it
    # (earlier positions reach later ones through attention in the layers above)
    rows = torch.cat([torch.full((len(p) + len(t) - 1,), i) for i, (p, t) in enumerate(pairs)])
    cols = torch.cat([torch.arange(len(p) + len(t) - 1) for p, t in pairs])
    r, c = rows.to(dev), cols.to(dev)
    return [(rows, box.value[r, c].float(), g[r, c].float()) for box, g in zip(inputs, grads)]


def lowrank_apply(x: torch.Tensor, v: torch.Tensor, d: torch.Tensor, scale) -> torch.Tensor:
    """``scale · Σ_t (v_t · x) d_t`` for every row of ``x`` [R, S, d_in] with its own pairs
    ``v`` [R, T, d_in], ``d`` [R, T, d_out] (zero rows pad): ``x`` through
    ``ΔW = scale · Σ_t d_t v_tᵀ``."""
    return scale * torch.einsum("rst,rto->rso", torch.einsum("rsi,rti->rst", x.float(), v), d)


def per_row(pairs_of_layer, n_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the flat ``(row, v, d)`` pairs of one layer to ``[n_rows, T, ·]``."""
    rows, u, d = pairs_of_layer
    counts = torch.bincount(rows, minlength=n_rows)
    width = max(int(counts.max()), 1)
    U = torch.zeros(n_rows, width, u.shape[1], device=device, dtype=u.dtype)
    D = torch.zeros(n_rows, width, d.shape[1], device=device, dtype=d.dtype)
    slot = torch.cat([torch.arange(int(c)) for c in counts])
    rows, slot = rows.to(device), slot.to(device)
    U = U.index_put((rows, slot), u)
    D = D.index_put((rows, slot), d)
    return U, D


def add_row_updates(h: Hooks, modules: Sequence[nn.Module], updates) -> None:
    """Install, for each module, ``out + scale · Σ_t (v_t · x) d_t`` with each row's own
    pairs: ``updates[i] = (V [R, T, d_in], D [R, T, d_out], scale)`` (several per module
    allowed: a list of such triples)."""
    for m, ups in zip(modules, updates):
        ups = ups if isinstance(ups, list) else [ups]
        box = h.capture_input(m, detach=False)

        def fn(out, box=box, ups=ups):
            for V, D, scale in ups:
                out = out + lowrank_apply(box.value, V, D, scale).to(out.dtype)
            return out

        h.edit_output(m, fn)


# -- training triples -------------------------------------------------------------------
@dataclass
class Example:
    """One training triple, tokenized: the edit, an equivalent input (with the new
    target), and an unrelated probe with the index of its first answer-predicting position."""

    edit: tuple[list[int], list[int]]
    equiv: tuple[list[int], list[int]]
    loc: list[int]
    loc_answer: int

    def loc_positions(self) -> range:
        """Positions of ``loc`` that predict the probe's answer tokens."""
        return range(self.loc_answer, len(self.loc) - 1)


def usable(data: Sequence[EditRequest]) -> list[EditRequest]:
    """The records that have a rephrase and an unrelated probe."""
    return [r for r in data if r.paraphrases and r.neighborhood]


def examples(lm: LM, data: Sequence[EditRequest]) -> list[Example]:
    """Training triples of the usable records of ``data``."""
    out = []
    for r in usable(data):
        loc_p, loc_t = encode_pair(lm, r.neighborhood[0].prompt, r.neighborhood[0].answer)
        out.append(
            Example(
                encode_pair(lm, r.text, r.target_new),
                encode_pair(lm, r.paraphrases[0], r.target_new),
                loc_p + loc_t,
                len(loc_p) - 1,
            )
        )
    return out


@torch.no_grad()
def stream_cache(
    lm: LM, seqs: list[list[int]], layer: int, batch_size: int = 32, desc: str = "layer inputs"
):
    """The residual stream entering ``layer`` for each sequence ([n_i, d_model] each)."""
    out: list[torch.Tensor] = []
    for begin in progress(range(0, len(seqs), batch_size), desc=desc):
        chunk = seqs[begin : begin + batch_size]
        ids, mask = pad(chunk, lm.tokenizer.pad_token_id)
        batch = {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
        hidden = layer_input(lm, batch, layer)
        out += [hidden[i, : len(s)].cpu() for i, s in enumerate(chunk)]
    return out


def stack_hidden(hs: list[torch.Tensor], device) -> torch.Tensor:
    """Zero-pad cached layer inputs to one [rows, width, d_model] tensor."""
    width = max(h.shape[0] for h in hs)
    out = torch.zeros(len(hs), width, hs[0].shape[1], dtype=hs[0].dtype)
    for i, h in enumerate(hs):
        out[i, : h.shape[0]] = h
    return out.to(device)


class TripleCache:
    """The cached inputs of layer ``first`` for each example's three sequences (edit,
    equivalent, unrelated), and the batched tensors a training step needs."""

    def __init__(self, lm: LM, exs: list[Example], first: int, desc: str):
        self.lm, self.first = lm, first
        self.index = {id(e): i for i, e in enumerate(exs)}
        seqs = [s for e in exs for s in (e.edit[0] + e.edit[1], e.equiv[0] + e.equiv[1], e.loc)]
        self.cache = stream_cache(lm, seqs, first, desc=desc)

    def hidden(self, exs: Sequence[Example], which: Sequence[int]) -> torch.Tensor:
        """Stacked layer inputs: for each kind in ``which`` (0 edit, 1 equivalent,
        2 unrelated), every example of ``exs`` in order."""
        hs = [self.cache[3 * self.index[id(e)] + k] for k in which for e in exs]
        return stack_hidden(hs, self.lm.device)

    def loc_mask(self, exs: Sequence[Example], mask: torch.Tensor) -> torch.Tensor:
        """Of an attention ``mask`` over the unrelated probes, only the positions that
        predict their answers."""
        out = torch.zeros_like(mask, dtype=torch.bool)
        for r, e in enumerate(exs):
            out[r, e.loc_answer : len(e.loc) - 1] = True
        return out.to(self.lm.device)


def answer_logprobs(lm: LM, normed: torch.Tensor, loc_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary at the masked positions."""
    return torch.log_softmax(lm.module("unembed")(normed[loc_mask]).float(), -1)


def kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p_ref ‖ p)``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
