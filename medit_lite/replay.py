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

:func:`staggered_layers` generalises this to a batch whose rows start at different
layers (each block runs on the rows that have started) and that holds only the tokens
after a prefix whose keys and values are known (:class:`PrefixKV`, recorded by
:func:`record_kv`). :func:`final_hidden` runs a pass without the unembedding.
"""

from __future__ import annotations

import bisect
import inspect
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
    stand_in = _Replay(hidden)
    with _blocks_swapped(lm, lambda j, block: stand_in if j < layer else block):
        yield


@contextmanager
def _blocks_swapped(lm: LM, stand_in):
    """Within the block, decoder block ``j`` is ``stand_in(j, block)``; the original
    blocks are put back on exit, also after an error."""
    stack = lm.model.get_submodule(lm.adapter.layers)
    originals = [stack[j] for j in range(lm.n_layers)]
    try:
        for j, block in enumerate(originals):
            stack[j] = stand_in(j, block)
        yield
    finally:
        for j, block in enumerate(originals):
            stack[j] = block


#: What decoder blocks call their key/value cache argument (Llama-family and GPT-J:
#: ``cache``, ``past_key_values`` before transformers 5.2x; GPT-NeoX: ``layer_past``).
CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")


class _Block(nn.Module):
    """Stand-in for decoder block ``j`` of :func:`staggered_layers`: the real block runs
    on the first ``n`` rows of the batch only (``n=None``: on all of them), with ``kv`` as
    its key/value cache; the other rows get their stored input of the next layer
    (``entry``)."""

    def __init__(self, block: nn.Module, n: int | None, entry: torch.Tensor | None, kv):
        super().__init__()
        self.block, self.n, self.entry, self.kv = block, n, entry, kv
        # the names of the arguments after the hidden states (GPT-2 passes some by position)
        self.arg_names = list(inspect.signature(block.forward).parameters)[1:]

    def forward(self, hidden, *args, **kwargs):
        batch = hidden.shape[0]
        n = batch if self.n is None else self.n
        if n == 0:
            return self.entry.to(hidden.device)
        kwargs |= dict(zip(self.arg_names, args))
        if n < batch:  # masks and other per-row arguments, for the rows that run
            kwargs = {k: _first_rows(v, n, batch) for k, v in kwargs.items()}
        names = [k for k in CACHE_ARGUMENTS if k in kwargs]
        if self.kv is not None and not names:
            raise RuntimeError("this model's decoder blocks take no key/value cache argument")
        for name in names:
            kwargs[name] = self.kv
        out = self.block(hidden[:n], **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out if n >= batch else torch.cat([out, self.entry[n:].to(out.device)])


def _first_rows(value, n: int, batch: int):
    """``value[:n]`` for per-row tensors (at least 2-D, ``batch`` rows; ``batch`` > 1)."""
    if isinstance(value, tuple):
        return tuple(_first_rows(v, n, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch > 1:
        return value[:n]
    return value


class PrefixKV:
    """The key/value cache one block sees in :func:`staggered_layers`: the keys and values
    ([rows, heads, prefix, head_dim]) of the tokens before the batch's first token. It
    never grows: each pass appends its own keys and values to a copy."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, keys, values, *args, **kwargs):
        return torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)


class RecordKV:
    """A cache that keeps the keys and values a block computes (for :func:`record_kv`)."""

    keys = values = None

    def update(self, keys, values, *args, **kwargs):
        self.keys, self.values = keys, values
        return keys, values


@contextmanager
def staggered_layers(lm: LM, starts: list[int], entry: torch.Tensor, kv=None):
    """Within the block, row ``i`` of the batch computes from layer ``starts[i]`` on (rows
    sorted by start); below it, it replays ``entry[i]``, its stored input of that layer.

    One forward pass thus serves rows whose changes begin at different layers (causal
    tracing), each paying only for its own layers. ``kv[j]``, when given, is the
    :class:`PrefixKV` of layer ``j`` for the rows that run there: the batch then holds
    only the tokens after a cached prefix (the caller passes their ``position_ids`` and a
    cache of the prefix's length for the attention mask)."""
    if list(starts) != sorted(starts):
        raise ValueError("rows must be sorted by their start layer")
    counts = [bisect.bisect_right(starts, j) for j in range(lm.n_layers)]

    def stand_in(j, block):
        return _Block(block, counts[j], entry, None if kv is None else kv[j])

    with _blocks_swapped(lm, stand_in):
        yield


@contextmanager
def record_kv(lm: LM):
    """Within the block, every decoder block keeps the keys and values it computes: the
    context yields one :class:`RecordKV` per layer (filled by the next forward pass)."""
    records = [RecordKV() for _ in range(lm.n_layers)]
    with _blocks_swapped(lm, lambda j, block: _Block(block, None, None, records[j])):
        yield records


def cache_keyword(lm: LM) -> str:
    """The name of the forward pass's key/value cache argument (``cache`` from
    transformers 5.2x on, ``past_key_values`` before): passes that run only the tokens
    after a cached prefix hand it the cache under this name."""
    params = inspect.signature(lm.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Stop(Exception):
    pass


def _stop(x):
    raise _Stop


def final_hidden(lm: LM, detach: bool = True, forward=None, **inputs) -> torch.Tensor:
    """The output of the final norm ([batch, seq, d_model]) for a forward pass with
    ``inputs``, without the unembedding. Callers apply ``lm.module("unembed")`` to the
    positions they need: the model's own ``logits_to_keep=1`` slices a non-contiguous
    [batch, 1, d_model] view, on which the vocabulary-sized product runs ~10× slower on
    the CPU than on a contiguous [batch, d_model] matrix. ``forward`` is the forward
    function to call (default ``lm.model``; a context router passes the model's own)."""
    with Hooks() as h:
        box = h.capture_output(lm.module("final_norm"), detach=detach)
        h.edit_output(lm.module("final_norm"), _stop)  # runs after the capture
        try:
            (forward or lm.model)(**inputs)
        except _Stop:
            pass
    return box.value


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
