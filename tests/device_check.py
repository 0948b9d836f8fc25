"""A CPU stand-in for "the model is on CUDA": catch host tensors meeting model tensors.

On a machine without a GPU every tensor is on the CPU, so code that makes a tensor
without ``device=`` and adds it to an activation works here and fails on CUDA. Inside
:class:`DeviceCheck` every tensor is tagged, as a torch function mode sees it made:

* **model**: the model's parameters and buffers, tensors made with ``device=`` a
  ``torch.device`` (``lm.device``, ``x.device``), moved with ``.to(device)`` /
  ``.to(tensor)`` / ``.cuda()``, and whatever is computed from a model tensor;
* **host**: tensors made by a factory (``torch.tensor``, ``zeros``, ``arange``,
  ``randn``...) without ``device=`` (or with ``device="cpu"``), ``.cpu()`` results, and
  what is computed from host tensors only.

An operation that takes a model tensor and a host tensor of more than one element (what
CUDA refuses; 0-dim host scalars and host *indices* in ``x[idx]`` are allowed there
too) is recorded, with the line of ``medit_lite`` that ran it. A move that returns the
tensor itself on the CPU (``.cpu()`` of a CPU tensor) returns a copy here, as on CUDA.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

HOST, MODEL = "host", "model"
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.from_numpy,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.eye,
    torch.arange,
    torch.linspace,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _device_tag(target) -> str | None:
    """The tag a device argument gives: a torch.device or tensor follows the model."""
    if isinstance(target, str):
        return HOST if target == "cpu" else MODEL
    if isinstance(target, (torch.device, torch.Tensor)):
        return MODEL
    return None


#: Operations whose operands must agree in dtype (else they promote or refuse).
MIXING = {
    "add",
    "add_",
    "__add__",
    "__iadd__",
    "__radd__",
    "sub",
    "sub_",
    "__sub__",
    "__isub__",
    "__rsub__",
    "mul",
    "mul_",
    "__mul__",
    "__imul__",
    "__rmul__",
    "div",
    "__truediv__",
    "__itruediv__",
    "cat",
    "stack",
    "where",
    "__setitem__",
    "index_put_",
    "copy_",
    "linear",
    "matmul",
    "__matmul__",
    "addmm",
    "baddbmm",
    "bmm",
    "mm",
    "embedding",
}


def _mixes_precision(inputs) -> bool:
    """A half-precision tensor (bf16/fp16) meeting a floating tensor of another dtype
    (more than one element): the result is promoted, or the op refuses."""
    floats = {t.dtype for t in inputs if t.is_floating_point() and t.numel() > 1}
    return bool(floats & {torch.bfloat16, torch.float16}) and len(floats) > 1


def _where() -> str:
    """The innermost medit_lite line on the stack (else the innermost test line)."""
    frames = traceback.extract_stack()[:-3]
    for wanted in ("/medit_lite/", "/tests/"):
        for f in reversed(frames):
            if wanted in f.filename and "device_check" not in f.filename:
                return f"{f.filename.split('/work/main/')[-1]}:{f.lineno}: {f.line}"
    return "?"


class DeviceCheck(TorchFunctionMode):
    """``with DeviceCheck(lm.model) as check: ...``; then ``check.mixed`` lists the
    operations that met a host tensor with a model tensor (empty: none)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.tags = WeakIdKeyDictionary()
        for t in list(model.parameters()) + list(model.buffers()):
            self.tags[t] = MODEL
        self.mixed: list[str] = []
        self.promoted: list[str] = []

    def _tag_of_call(self, func, args, kwargs) -> str | None:
        if func in FACTORIES:
            return _device_tag(kwargs.get("device")) or HOST
        if func is torch.Tensor.cpu:
            return HOST
        if func is torch.Tensor.cuda:
            return MODEL
        if func is torch.Tensor.to:
            targets = [a for a in args[1:] if not isinstance(a, torch.dtype)]
            targets += [kwargs[k] for k in ("device", "other") if k in kwargs]
            for t in targets:
                if _device_tag(t) is not None:
                    return _device_tag(t)
        return None

    def _check(self, func, args, kwargs) -> str | None:
        """The tag the result inherits; records a mix of host and model inputs."""
        if func is torch.Tensor.__getitem__:
            inputs = [args[0]]  # host index tensors are fine on CUDA
        elif func is torch.Tensor.__setitem__:
            inputs = [args[0], *_tensors(args[2:])]
        else:
            inputs = list(_tensors(args)) + list(_tensors(kwargs))
        tags = {self.tags.get(t) for t in inputs if t.dim() > 0 or self.tags.get(t) == MODEL}
        name = getattr(func, "__name__", str(func))
        if MODEL in tags and HOST in tags:
            self.mixed.append(f"{name} at {_where()}")
        if name in MIXING and _mixes_precision(inputs):
            self.promoted.append(f"{name} at {_where()}")
        return MODEL if MODEL in tags else HOST if HOST in tags else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tag = self._tag_of_call(func, args, kwargs)
        if tag is not None and args and out is args[0] and self.tags.get(out) != tag:
            out = out.clone()  # a move to or from CUDA copies; on the CPU it returns itself
        if tag is None:
            tag = self._check(func, args, kwargs)
        if tag is not None:
            for t in _tensors(out):
                self.tags[t] = tag
        return out
