"""Read and overwrite module inputs and outputs during a forward pass.

Every method and analysis in ``medit_lite`` hooks the model through :class:`Hooks`, a
context manager whose hooks are always removed on exit, also when the body raises::

    with Hooks() as h:
        keys = h.capture_input(lm.module("mlp_out", 5))
        h.edit_output(lm.module("layer", 3), lambda out: out + delta)
        lm.model(**batch)
    keys.value  # the captured tensor
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Captured:
    """Holder for a tensor seen by a hook (the last call's, or all calls' in ``values``)."""

    detach: bool = True
    value: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def store(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach() if self.detach else tensor
        self.value = tensor
        self.values.append(tensor)


def _main(x):
    """The hidden-state tensor of a module's output or positional inputs."""
    return x[0] if isinstance(x, tuple) else x


def _replace_main(x, new: torch.Tensor):
    return (new, *x[1:]) if isinstance(x, tuple) else new


class Hooks:
    """A set of forward hooks that lives exactly as long as a ``with`` block."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook registered so far (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def capture_output(self, module: nn.Module, detach: bool = True) -> Captured:
        """Record the module's output (its first element when it returns a tuple)."""
        box = Captured(detach)
        self._handles.append(module.register_forward_hook(lambda m, i, o: box.store(_main(o))))
        return box

    def capture_input(self, module: nn.Module, detach: bool = True) -> Captured:
        """Record the module's first positional input (e.g. the keys of an MLP output)."""
        box = Captured(detach)
        self._handles.append(module.register_forward_pre_hook(lambda m, i: box.store(i[0])))
        return box

    def edit_output(self, module: nn.Module, fn: TensorFn) -> None:
        """Replace the module's output ``o`` by ``fn(o)`` (tuples keep their other parts)."""

        def hook(m, inputs, output):
            return _replace_main(output, fn(_main(output)))

        self._handles.append(module.register_forward_hook(hook))

    def edit_input(self, module: nn.Module, fn: TensorFn) -> None:
        """Replace the module's first positional input ``x`` by ``fn(x)``."""

        def hook(m, inputs):
            return (fn(inputs[0]), *inputs[1:])

        self._handles.append(module.register_forward_pre_hook(hook))
