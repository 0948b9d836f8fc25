"""``edit()``: apply an editing method to a model, measure it, and undo it exactly.

Every method registers itself here with :func:`register`: a hyperparameter dataclass
(with per-model defaults), the names of the parameters it may change, and an ``apply``
function. ``edit()`` does everything the methods share:

1. validates the requests and hyperparameters *before any weight changes*;
2. backs up exactly the parameters the method declares;
3. runs the method (per request in turn with ``sequential=True``, else once on the batch);
4. checks the new weights are finite, and on any failure puts every weight back;
5. returns an :class:`EditResult` with timing, peak memory, what changed, and
   ``restore()``, which brings back bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .memory import memory_trace
from .metrics import encode_pair
from .models import LM
from .progress import progress
from .requests import EditRequest, as_requests
from .stats import reuse_statistics


@dataclass
class Method:
    """A registered editing method."""

    name: str
    hparams: type
    apply: Callable[[LM, list[EditRequest], object], dict | None]
    params: Callable[[LM, object], list[str]]
    doc: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, hparams: type, params: Callable[[LM, object], list[str]]):
    """Decorator registering ``apply(lm, requests, hparams) -> info`` under ``name``.

    ``params(lm, hparams)`` names the parameters ``apply`` may change; ``info`` may hold
    an ``"undo"`` callable for methods that add modules instead of changing weights.
    """

    def wrap(apply):
        METHODS[name] = Method(name, hparams, apply, params, (apply.__doc__ or "").strip())
        return apply

    return wrap


def get_method(name: str) -> Method:
    from . import methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# -- validation ------------------------------------------------------------------------
def make_hparams(method: Method, lm: LM, hparams=None, **overrides):
    """The method's defaults for ``lm``, with ``hparams`` / ``overrides`` on top, validated."""
    base = hparams if hparams is not None else method.hparams.for_model(lm)
    if not isinstance(base, method.hparams):
        raise TypeError(f"hparams for {method.name} must be {method.hparams.__name__}")
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) for {method.name}: {', '.join(unknown)}")
    for name, value in overrides.items():
        default = getattr(base, name)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"hyperparameter {name} must be a number, got {value!r}")
    hp = dataclasses.replace(base, **overrides)
    check_hparams(hp, lm)
    return hp


def check_hparams(hp, lm: LM) -> None:
    """Reject NaN/inf numbers, negative counts and layers outside the model."""
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"hyperparameter {f.name} must be finite, got {v}")
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"hyperparameter {f.name} must not be negative, got {v}")
        if f.name == "layers":
            if not values:
                raise ValueError("hyperparameter layers must name at least one layer")
            for v in values:
                if not isinstance(v, int) or not 0 <= v < lm.n_layers:
                    raise ValueError(f"layer {v} is outside the model's {lm.n_layers} layers")
    if hasattr(hp, "validate"):
        hp.validate(lm)


def check_requests(lm: LM, requests: Sequence[EditRequest]) -> None:
    """Every edit prompt with its new target must tokenize and fit the model's context."""
    for i, r in enumerate(requests):
        prompt_ids, target_ids = encode_pair(lm, r.text, r.target_new)
        if not target_ids:
            raise ValueError(f"request {i}: target_new {r.target_new!r} has no tokens")
        n = len(prompt_ids) + len(target_ids)
        if n > lm.max_length:
            raise ValueError(
                f"request {i}: prompt and target are {n} tokens, longer than the model's "
                f"context of {lm.max_length}"
            )


# -- the result --------------------------------------------------------------------------
@dataclass
class EditResult:
    """What one call of :func:`edit` did, and how to undo it."""

    lm: LM
    method: str
    requests: list[EditRequest]
    hparams: object
    seconds: float
    #: the most memory the edit allocated at one time, and what it left allocated (the
    #: state a method attaches: codebook, patches, memory), in bytes above the start
    #: (:mod:`medit_lite.memory`); None where not measured (on the CPU unless asked for)
    peak_memory_bytes: int | None
    changed: list[str]
    info: list[dict] = field(default_factory=list)
    retained_memory_bytes: int | None = None
    _backup: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    restored: bool = False

    def restore(self) -> None:
        """Put back the exact weights from before the edit (idempotent).

        Restore stacked edits newest first.
        """
        if self.restored:
            return
        _put_back(self.lm, self._backup, self._undo)
        self.restored = True

    @property
    def original_weights(self) -> dict[str, torch.Tensor]:
        """The saved values, from before the edit, of every parameter the method could
        change (name → tensor; a copy of the mapping, the tensors are the backup itself:
        do not modify them)."""
        return dict(self._backup)

    def changed_elements(self) -> int:
        """How many elements of the model's parameters differ from before the edit."""
        params = dict(self.lm.model.named_parameters())
        return sum(int((params[n] != self._backup[n]).sum()) for n in self.changed)

    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of the change of each changed parameter."""
        params = dict(self.lm.model.named_parameters())
        return {n: float((params[n] - self._backup[n]).float().norm()) for n in self.changed}

    def __enter__(self) -> EditResult:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _put_back(lm: LM, backup: dict[str, torch.Tensor], undo: list[Callable[[], None]]) -> None:
    for fn in reversed(undo):
        fn()
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, saved in backup.items():
            params[name].copy_(saved)


def edit(
    lm: LM,
    requests,
    method: str = "ft-l",
    *,
    sequential: bool = False,
    hparams=None,
    measure_memory: bool | None = None,
    **overrides,
) -> EditResult:
    """Edit ``lm`` in place to make each request's ``target_new`` its answer.

    ``sequential=True`` applies the requests one after another, each on top of the
    previous ones (edits accumulate); otherwise the method sees them as one batch.
    Keyword ``overrides`` change single hyperparameters, e.g. ``edit(lm, r, "ft", lr=1e-3)``.
    ``measure_memory``: record the memory the edit allocates (``peak_memory_bytes``,
    ``retained_memory_bytes``); by default on CUDA only, where it costs nothing; on the
    CPU it runs the edit under the profiler (:mod:`medit_lite.memory`), which makes
    ``seconds`` larger. Nothing changes in the model when validation or the method fails.
    """
    spec = get_method(method)
    reqs = as_requests(requests)
    hp = make_hparams(spec, lm, hparams, **overrides)
    check_requests(lm, reqs)

    params = dict(lm.model.named_parameters())
    names = spec.params(lm, hp)
    backup = {n: params[n].detach().clone() for n in names}
    undo: list[Callable[[], None]] = []
    infos: list[dict] = []
    batches = [[r] for r in reqs] if sequential else [reqs]

    def apply_all() -> None:
        with reuse_statistics():  # a sequential stream keeps the first C of each layer
            for batch in progress(
                batches, desc=f"{method} edits", disable=len(batches) < 2 or None
            ):
                info = dict(spec.apply(lm, batch, hp) or {})
                if "undo" in info:
                    undo.append(info.pop("undo"))
                infos.append(info)

    if measure_memory is None:
        measure_memory = lm.device.type == "cuda"
    peak = retained = None
    start = time.perf_counter()
    try:
        if measure_memory:
            _, peak, retained = memory_trace(lm.device, apply_all)
        else:
            apply_all()
        for n in names:
            if not torch.isfinite(params[n]).all():
                raise FloatingPointError(f"{method} produced non-finite values in {n}")
    except BaseException:
        _put_back(lm, backup, undo)
        raise
    seconds = time.perf_counter() - start
    changed = [n for n in names if not torch.equal(params[n], backup[n])]
    return EditResult(
        lm=lm,
        method=method,
        requests=reqs,
        hparams=hp,
        seconds=seconds,
        peak_memory_bytes=peak,
        changed=changed,
        info=infos,
        retained_memory_bytes=retained,
        _backup=backup,
        _undo=undo,
    )


def weights_fingerprint(lm: LM) -> str:
    """SHA-256 over every parameter's bytes: equal fingerprints mean identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in lm.model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
