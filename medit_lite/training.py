"""The one training loop of the package: what meta-learning and memory methods train.

Several editors train something once, before any edit, so that later edits are cheap:
SERAC's scope classifier, the gate of natural-language patches, CaliNet's calibration
slots, MEND's and KnowledgeEditor's hypernetworks, ENN's editable base. They share:

* **data**: :func:`training_requests`, zsRE training records (Levy et al., 2017, as
  repackaged by MEND, Mitchell et al., 2022) as :class:`EditRequest` triples: the edit
  (``text`` → ``target_new``), its rephrase (``paraphrases[0]``, in scope) and an unrelated
  question with its answer (``neighborhood[0]``, out of scope). Read from
  ``zsre_train_sample.json`` in the shared data when present; otherwise the built-in fact
  set, with a warning (those facts are also what the tests edit, so that fallback is for
  trying things out, not for measuring);
* **the loop**: :func:`train`: seeded, Adam, random mini-batches of requests, a tqdm bar
  that is quiet in CI, optional gradient clipping, and the loss curve it returns;
* **a cache**: :func:`load_or_train`: trained weights stored as safetensors under
  ``$MEDIT_CACHE/trained/<method>/<key>.safetensors`` (with the loss curve beside them as
  JSON), the key a hash of the model's identity (name, config and a fingerprint of some of
  its weights), the training data and the hyperparameters, so that a change of any of them
  trains anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import LM, cache_dir
from .progress import progress
from .requests import EditRequest, builtin_requests, from_zsre, read_records, shared_data

TRAIN_FILE = "zsre_train_sample.json"


def training_requests(source=None, limit: int | None = None) -> list[EditRequest]:
    """Training triples for editors, as EditRequests (edit, rephrase, unrelated probe).

    ``source`` is a zsRE file in MEND's format; by default the shared
    ``zsre_train_sample.json``. Where that is absent, the built-in facts, with a warning.
    Records that make no valid request (two of the shared sample's 1,000 have an empty
    ``alt``) are left out, with a warning that names them.
    """
    path = source if source is not None else shared_data(TRAIN_FILE)
    if path is None:
        warnings.warn(
            f"{TRAIN_FILE} not found (no ../shared/data and no $MEDIT_DATA): training on the "
            "built-in facts instead; results are for trying out, not for measuring",
            stacklevel=2,
        )
        requests = builtin_requests()
        return requests[:limit] if limit is not None else requests
    requests, skipped = [], []
    for i, record in enumerate(read_records(path)[:limit]):
        try:
            requests.append(from_zsre(record))
        except (ValueError, TypeError, KeyError) as err:
            skipped.append(f"{i} ({err})")
    if skipped:
        warnings.warn(
            f"{path}: left out {len(skipped)} record(s) that make no valid edit request: "
            + "; ".join(skipped[:5]),
            stacklevel=2,
        )
    return requests


def requests_digest(requests: Sequence[EditRequest]) -> str:
    """A short hash of a list of requests (what they ask, in order)."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def model_identity(lm: LM) -> str:
    """A short hash of the model: its name, config and a sample of its weights.

    Cheap on large models (a strided sample of the embedding and of the last MLP output
    matrix, not every byte), yet a different checkpoint of the same architecture gives a
    different identity.
    """
    h = hashlib.sha256(lm.name.encode())
    h.update(lm.model.config.to_json_string(use_diff=False).encode())
    for kind, layer in (("embed", None), ("mlp_out", lm.n_layers - 1)):
        w = lm.module(kind, layer).weight.detach().flatten()
        sample = w[:: max(1, w.numel() // 65536)].float().cpu().contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(lm: LM, data: Sequence[EditRequest], hparams) -> str:
    """Hash of model identity, training data and hyperparameters (a dataclass or dict)."""
    hp = dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) else dict(hparams)
    blob = json.dumps(
        {"model": model_identity(lm), "data": requests_digest(data), "hparams": hp},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def trained_path(method: str, key: str) -> Path:
    """Where the weights trained for ``method`` under ``key`` are cached."""
    return cache_dir() / "trained" / method / f"{key}.safetensors"


@dataclass
class TrainLog:
    """What a training run did: the loss per step and any other logged values."""

    losses: list[float] = field(default_factory=list)
    logs: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0
    from_cache: bool = False
    path: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LossFn = Callable[[list[EditRequest]], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


def train(
    parameters: nn.Module | Sequence[nn.Parameter],
    loss_fn: LossFn,
    data: Sequence[EditRequest],
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    grad_clip: float | None = None,
    weight_decay: float = 0.0,
    desc: str = "training",
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    after_step: Callable[[int, TrainLog], None] | None = None,
) -> TrainLog:
    """Minimise ``loss_fn(batch)`` over ``steps`` random mini-batches of ``data`` with Adam.

    ``loss_fn`` returns the loss, or ``(loss, logs)`` with a dict of floats to record
    (e.g. the edit and locality terms). Batches are drawn without replacement within an
    epoch, from a generator seeded with ``seed`` (torch is seeded too), so a run is
    reproducible on the same machine. Returns the :class:`TrainLog`; parameters are
    trained in place.

    ``optimizer``: a factory ``params -> Optimizer`` for methods whose paper uses another
    optimiser than Adam (KE: centered RMSprop with a learning rate per group);
    ``after_step(step, log)`` runs after each update (KE's projection of its Lagrange
    multiplier and its margin schedule).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    data = list(data)
    if not data:
        raise ValueError("no training data")
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = optimizer(params)
    log = TrainLog()
    order: list[int] = []
    start = time.perf_counter()
    bar = progress(range(steps), desc=desc)
    for _ in bar:
        if len(order) < batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order += fresh
        batch = [data[i] for i in order[:batch_size]]
        del order[:batch_size]
        opt.zero_grad(set_to_none=True)
        out = loss_fn(batch)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {float(loss)} at step {log.steps}")
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        log.losses.append(float(loss.detach()))
        for k, v in extra.items():
            log.logs.setdefault(k, []).append(float(v))
        log.steps += 1
        if after_step is not None:
            after_step(log.steps, log)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}", refresh=False)
    log.seconds = time.perf_counter() - start
    return log


#: Methods that train something before they edit (name -> ``fn(lm, hp=None, *, data=None,
#: retrain=False) -> TrainLog``, training or loading from the cache): what
#: ``python -m medit_lite train --method NAME`` runs.
TRAINERS: dict[str, Callable[..., TrainLog]] = {}


def register_trainer(name: str):
    """Decorator registering a method's training function in :data:`TRAINERS`."""

    def wrap(fn):
        TRAINERS[name] = fn
        return fn

    return wrap


def load_or_train(
    module: nn.Module,
    method: str,
    key: str,
    fit: Callable[[], TrainLog],
    *,
    retrain: bool = False,
) -> TrainLog:
    """Load ``module``'s weights cached under ``(method, key)``, or run ``fit()`` and cache.

    ``fit`` trains ``module`` in place and returns its :class:`TrainLog`. The weights are
    saved as safetensors, the log as JSON beside them; a cached load returns the stored
    log with ``from_cache=True``.
    """
    from safetensors.torch import load_file, save_file

    path = trained_path(method, key)
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and not retrain:
        state = load_file(str(path), device=str(next(module.parameters()).device))
        module.load_state_dict(state)
        log = TrainLog(**json.loads(meta.read_text()))
        log.from_cache, log.path = True, str(path)
        return log
    log = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    log.path = str(path)
    # the log first, the weights last: a process that finds the weights finds their log
    # (names with the process id: two processes training the same key do not collide)
    meta_tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps(log.to_dict()))
    meta_tmp.replace(meta)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(path)
    return log


class TrainedParts:
    """The trained part of a method (an editor, a hypernetwork, a trained base) for each
    model and hyperparameters: kept in memory, in the safetensors cache under
    ``$MEDIT_CACHE``, or trained now with :func:`load_or_train`.

    ``new(lm, hp)`` builds an untrained part, ``fit(lm, part, data, hp)`` trains it and
    returns the :class:`TrainLog`, ``data_for(hp)`` gives the default training records,
    ``select(data)`` keeps the usable ones (they enter the cache key). ``hp`` needs
    ``for_model`` (on ``hparams``) and ``training_part()``."""

    def __init__(self, method: str, hparams: type, new, fit, data_for, select=list):
        self.method, self.hparams = method, hparams
        self.new, self.fit, self.data_for, self.select = new, fit, data_for, select
        self.memo: dict[tuple, tuple[nn.Module, TrainLog]] = {}

    def _memo_key(self, lm: LM, hp) -> tuple:
        return (id(lm.model), str(lm.device), tuple(sorted(hp.training_part().items())))

    def _key(self, lm: LM, data, hp) -> str:
        return cache_key(lm, data, hp.training_part())

    def get(self, lm: LM, hp=None, *, data=None, retrain: bool = False):
        """``(part, log)``: from memory, from the cache, or trained now (then cached)."""
        hp = hp or self.hparams.for_model(lm)
        memo = self._memo_key(lm, hp)
        if data is None and memo in self.memo and not retrain:
            return self.memo[memo]
        data = self.select(data if data is not None else self.data_for(hp))
        part = self.new(lm, hp)
        key = self._key(lm, data, hp)
        log = load_or_train(
            part, self.method, key, lambda: self.fit(lm, part, data, hp), retrain=retrain
        )
        part.requires_grad_(False)
        part.eval()
        self.memo[memo] = (part, log)
        return part, log

    def is_trained(self, lm: LM, hp=None) -> bool:
        """Whether :meth:`get` will load rather than train."""
        hp = hp or self.hparams.for_model(lm)
        if self._memo_key(lm, hp) in self.memo:
            return True
        data = self.select(self.data_for(hp))
        return trained_path(self.method, self._key(lm, data, hp)).exists()
