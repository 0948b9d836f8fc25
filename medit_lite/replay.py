"""Run a model from layer ``l`` on, replaying a known residual stream below it.

Several computations in this package run the same prompts many times with changes that
only start at some layer ``l``: causal tracing (a restoration at layer ``l`` leaves every
layer below it as in the corrupted run) and the optimisation of ROME's value vector
(the new value enters at the edited layer; Meng et al., 2022, Eq. 4). Layers below ``l``
then compute the same thing every time. :func:`replay_layers` swaps them, for the
duration of a ``with`` block, for stand-ins that return the stored input of layer ``l``,
so a forward pass costs only the layers from ``l`` up (and no gradient graph exists
below ``l``). The swap works for every family the adapter knows, because a decoder
stack passes only the hidden states from one block to the next.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .hooks import Hooks
from .models import LM


class _Replay(nn.Module):
    """Stand-in for a decoder block: ignores its input, returns a stored tensor."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden


@contextmanager
def replay_layers(lm: LM, layer: int, hidden: torch.Tensor | None):
    """Within the block, layers ``0 .. layer-1`` do not compute and layer ``layer`` gets
    ``hidden`` ([batch, seq, d_model]) as its input. ``layer=0`` (or ``hidden=None``)
    changes nothing; ``layer=n_layers`` replays the whole stack (only the final norm
    and the unembedding run)."""
    if layer == 0 or hidden is None:
        yield
        return
    if not 0 < layer <= lm.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{lm.n_layers}")
    stack = lm.model.get_submodule(lm.adapter.layers)
    originals = [stack[i] for i in range(layer)]
    stand_in = _Replay(hidden)
    try:
        for i in range(layer):
            stack[i] = stand_in
        yield
    finally:
        for i, module in enumerate(originals):
            stack[i] = module


class _Stop(Exception):
    pass


def _stop(x):
    raise _Stop


@torch.no_grad()
def layer_input(lm: LM, batch: dict, layer: int) -> torch.Tensor | None:
    """The residual stream entering ``layer`` (the output of layer ``layer-1``) for a
    tokenized batch, computed without running the layers above; None for layer 0."""
    if layer == 0:
        return None
    with Hooks() as h:
        box = h.capture_output(lm.module("layer", layer - 1))
        if layer < lm.n_layers:
            h.edit_input(lm.module("layer", layer), _stop)
        try:
            lm.model(**batch, use_cache=False, logits_to_keep=1)
        except _Stop:
            pass
    return box.value
