"""GRACE: lifelong editing with a discrete key-value codebook (Hartvigsen et al., NeurIPS 2023).

GRACE leaves every weight of the model alone and wraps *one* layer in an adaptor that holds
a codebook of edits: keys ``k_i`` (activations the layer saw on an edited input), values
``v_i`` (trained replacements of the layer's output) and a deferral radius ``ε_i`` per key
(paper, §3). For an input whose query ``h`` (the wrapped layer's input) is close to a key,
the adaptor answers from the codebook; everywhere else it *defers* to the original layer:

    i* = argmin_i d(h, k_i),   GRACE(h) = v_{i*}  if d(h, k_{i*}) ≤ ε_{i*}  else  f(h)      (Eq. 1)

with ``d`` the Euclidean distance and ``f`` the wrapped layer. Which layer and which
position, as in the published code (``thartvigsen/grace``, ``grace/editors/grace.py``) and
EasyEdit's port for Llama (``easyeditor/models/grace/GRACE.py``,
``hparams/GRACE/llama3.2-1b.yaml``):

* the wrapped layer is an FFN's output projection (Llama's ``mlp.down_proj``); the query is
  its *input* (the FFN's hidden activation, ``d_mlp`` wide), the value replaces its
  *output* (``d_model`` wide, what the FFN adds to the residual stream);
* the key of an edit is the query at the **last token of the prompt** (``key_id =
  #prompt tokens - 1``): the position whose output predicts the first target token;
* ``replace_last``: only that position's output is replaced (EasyEdit's Llama 1B
  setting; its 7B file says ``replace_prompt``, which replaces the positions *before* the
  key token and nothing during cached generation). The later target tokens change through
  the attention of the layers above, which is why the layer is not the last one here.

**Queries at inference.** The reference adaptor only knows one position per forward pass:
during an edit the last prompt token; in ``generate`` first the prompt's last token and
then, with the key-value cache, each new token (sequence length 1). Its teacher-forced
evaluation reuses whatever ``key_id`` the last edit left behind, a stale index. Here every
position of every sequence is its own query, checked against the codebook by Eq. 1. This
gives the reference's decision exactly where it is defined (the last prompt token, the
position that predicts the first target token, and every generated token), makes
teacher-forced scoring of ``prompt + target`` (right-padded batches) and generation agree,
and also lets an edit fire inside a longer text that contains the edited prompt (an
earlier position within ε of a key). A position far from every key is untouched.

**A new edit** (paper, Algorithm 1, and the code's ``forward`` at ``iter == 0``): with
query ``h`` and label ``y`` (the target's token ids),

1. empty codebook, or ``d(h, k_{i*}) > ε_init + ε_{i*}`` (no ball overlaps): add the key
   ``(h, v, ε_init, y)``;
2. overlap and ``y ≠ y_{i*}`` (conflict): add the key and **split**:
   ``ε_{i*} = d/2 - 1e-5``, ``ε_new = d/2`` (the balls touch, they do not overlap);
3. overlap and ``y = y_{i*}``: **expand** (``eps_expand: coverage``): if ``d > ε_{i*}``,
   ``ε_{i*} = d``; no new key, and the value of ``i*`` is trained on the new edit.

The reference compares labels by the mean of the label tensor (prompt positions masked as
-100, so the mean also depends on the prompt length); here two labels match when their
target token ids are equal, the rule the paper states.

**Training the value** (code: ``edit``): the value starts ``cold`` (uniform in [0, 1),
``torch.rand``) and Adam with ``edit_lr = 1.0`` minimises the target's teacher-forced NLL
(``outputs.loss``: mean over target tokens) for ``n_iter`` steps, the other weights frozen.
Defaults from EasyEdit's Llama files: ``edit_lr 1.0``, ``n_iter 50`` (``llama3.2-1b``;
100 in the paper's code and for 7B), ``eps 1.0``, ``dist_fn euc``, ``val_init cold``,
``replacement replace_last``, ``eps_expand coverage``. One departure for a CPU: training
stops as soon as every target token is the argmax and the mean NLL is below ``stop_nll``
(the configs name ``reg: early_stop``; the loop shown there runs all ``n_iter`` steps).

**ε is an absolute distance.** ``eps 1.0`` fits the activation scale of Llama-2-7B's last
FFN, not this model's: here ε is chosen per model and layer from measured distances
(:func:`key_distances`; the benchmark ``benchmarks/eval_grace_calinet.py`` shows them):
half of a low percentile of the distances between an edit prompt's key and the keys of
prompts about *other* subjects with the same relation (CounterFact's neighborhood prompts,
the hardest inputs GRACE must defer on). Paraphrases lie as far from the key as those
neighbors do, so GRACE with a radius that keeps locality does not generalize to them:
the paper reports the same trade-off (its Fig. 4, ε against TRR/ERR).

**Memory and undo.** The codebook is one module per wrapped layer
(``model.layers.L.mlp.down_proj.grace``): keys ``[n, d_mlp]``, values ``[n, d_model]`` and
radii ``[n]``, stored as frozen parameters so that parameter counts show its size. Each
edit records how many entries there were before and a copy of the one entry it may have
changed (radius split or expanded, value retrained); its undo truncates to that count and
writes the copy back, so restoring stacked edits newest first gives back each earlier
codebook exactly, and the last undo removes the module and its hook.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..editing import register
from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import DEFAULT_MODEL, LM
from ..requests import EditRequest

CODEBOOK_NAME = "grace"  # child-module name of the codebook inside the wrapped projection

#: Default layer and radius measured for the offline default model (SmolLM2-135M, 30
#: layers) on the first 100 CounterFact records (``key_distances``; the benchmark stores
#: them): at layer 20 the keys have a median norm of 14.9; an edit prompt's key lies from
#: its neighborhood prompts' keys at ≥ 1.59 (1st percentile 3.27, median 14.4), from
#: other edit prompts at ≥ 3.15 (median 18.7) and from its paraphrases at ≥ 6.68 (median
#: 16.3). ``choose_epsilon`` (half the 1st percentile of the neighbor distances) gives
#: 1.64, rounded to 1.6 (one neighbor prompt in 1,000 lies inside that radius).
DEFAULTS = {DEFAULT_MODEL: {"layer": 20, "eps": 1.6}}


# -- hyperparameters ---------------------------------------------------------------------
@dataclass(frozen=True)
class GraceHParams:
    """Hyperparameters of GRACE (defaults: EasyEdit's Llama configs; ε measured here)."""

    layer: int | None = None  # FFN whose output projection is wrapped; None = 2/3 of depth
    eps: float = 1.0  # ε_init, the radius of a new key (absolute Euclidean distance)
    edit_lr: float = 1.0  # Adam learning rate of the value
    n_iter: int = 50  # at most this many Adam steps per edit
    stop_nll: float = 0.05  # stop once every target token is argmax and mean NLL < this
    val_init: str = "cold"  # "cold": uniform [0, 1); "warm": the layer's own output there
    eps_expand: str = "coverage"  # same-label rule: "coverage" or "moving_average"
    seed: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> GraceHParams:
        """Measured layer and ε for the default model; elsewhere layer 2/3 of depth, ε 1.0
        (EasyEdit's value): measure ε for another model with :func:`key_distances`."""
        return cls(**DEFAULTS.get(lm.name, {}))

    def validate(self, lm: LM) -> None:
        if self.layer is not None and not (
            isinstance(self.layer, int) and not isinstance(self.layer, bool)
        ):
            raise TypeError(f"hyperparameter layer must be an int, got {self.layer!r}")
        if self.layer is not None and not 0 <= self.layer < lm.n_layers:
            raise ValueError(f"layer {self.layer} is outside the model's {lm.n_layers} layers")
        if not self.eps > 0:
            raise ValueError("hyperparameter eps must be positive")
        if not self.edit_lr > 0:
            raise ValueError("hyperparameter edit_lr must be positive")
        if not isinstance(self.n_iter, int) or isinstance(self.n_iter, bool) or self.n_iter < 1:
            raise ValueError("hyperparameter n_iter must be a positive integer")
        if self.val_init not in ("cold", "warm"):
            raise ValueError(
                f"hyperparameter val_init must be 'cold' or 'warm', not {self.val_init!r}"
            )
        if self.eps_expand not in ("coverage", "moving_average"):
            raise ValueError(
                "hyperparameter eps_expand must be 'coverage' or 'moving_average', "
                f"not {self.eps_expand!r}"
            )

    def layer_of(self, lm: LM) -> int:
        return (2 * lm.n_layers) // 3 if self.layer is None else self.layer


# -- the codebook ------------------------------------------------------------------------
def deferral(
    query: torch.Tensor, keys: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1's decision for each query row: ``(use, nearest, distance)``.

    ``query`` is ``[N, d]``, ``keys`` ``[n, d]``, ``eps`` ``[n]``. ``nearest`` is the index
    of the closest key (Euclidean, computed in float32), ``use`` is True where the query
    lies within that key's radius (``d ≤ ε``, the reference's ``<=``): there the codebook
    answers; elsewhere the layer's own output is kept.
    """
    if not len(keys):
        n = query.shape[0]
        return (
            torch.zeros(n, dtype=torch.bool, device=query.device),
            torch.zeros(n, dtype=torch.long, device=query.device),
            torch.full((n,), math.inf, device=query.device),
        )
    dist = torch.cdist(query.float(), keys.float())  # [N, n]
    smallest, nearest = dist.min(-1)
    return smallest <= eps.float()[nearest], nearest, smallest


class Codebook(nn.Module):
    """GRACE's adaptor state for one wrapped projection: keys, values, radii, labels.

    It sits inside the projection as the child ``grace`` and uses two hooks on it (one
    remembers the input, the other edits the output): at every position whose input is
    within ε of its nearest key the output is replaced by that key's value (Eq. 1);
    elsewhere the projection's output passes unchanged.
    """

    def __init__(self, d_in: int, d_out: int, device, dtype) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(0, d_in, device=device, dtype=dtype), False)
        self.values = nn.Parameter(torch.zeros(0, d_out, device=device, dtype=dtype), False)
        self.epsilons = nn.Parameter(torch.zeros(0, device=device), False)
        self.labels: list[tuple[int, ...]] = []
        self._hooks = Hooks()
        self._proj = lambda: None  # weak reference to the wrapped module
        self._x: torch.Tensor | None = None
        self.last_use: torch.Tensor | None = None  # the last forward's decision, [B, T]

    # attach / detach ----------------------------------------------------------------------
    @classmethod
    def of(cls, lm: LM, layer: int, create: bool = False) -> Codebook | None:
        """The codebook of ``layer``; with ``create=True`` a new one is attached if none."""
        proj = lm.module("mlp_out", layer)
        book = proj._modules.get(CODEBOOK_NAME)
        if book is None and create:
            weight = lm.weight_out_in("mlp_out", layer)
            book = cls(weight.shape[1], weight.shape[0], weight.device, weight.dtype)
            book._proj = weakref.ref(proj)
            proj.add_module(CODEBOOK_NAME, book)
            book._hooks.edit_input(proj, book._remember)
            book._hooks.edit_output(proj, book._replace)
        return book

    def detach(self) -> None:
        """Remove the hook and take the codebook out of its projection."""
        self._hooks.remove()
        proj = self._proj()
        if proj is not None and proj._modules.get(CODEBOOK_NAME) is self:
            del proj._modules[CODEBOOK_NAME]

    def __len__(self) -> int:
        return self.keys.shape[0]

    # the forward pass -----------------------------------------------------------------
    def _remember(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return x

    def _replace(self, output: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None or not len(self):
            return output
        flat = x.reshape(-1, x.shape[-1])
        use, nearest, _ = deferral(flat, self.keys, self.epsilons)
        self.last_use = use.reshape(x.shape[:-1]).detach()
        if not bool(use.any()):
            return output
        replaced = self.values[nearest].to(output.dtype).reshape(output.shape)
        return torch.where(use.reshape(*output.shape[:-1], 1), replaced, output)

    # changes (each returns what its undo needs) ----------------------------------------
    def snapshot(self, i: int) -> tuple:
        """A copy of entry ``i`` (key, value, radius, label)."""
        return (
            i,
            self.keys[i].detach().clone(),
            self.values[i].detach().clone(),
            self.epsilons[i].detach().clone(),
            self.labels[i],
        )

    def write(self, entry: tuple) -> None:
        i, key, value, eps, label = entry
        with torch.no_grad():
            self.keys[i] = key
            self.values[i] = value
            self.epsilons[i] = eps
        self.labels[i] = label

    def append(self, key: torch.Tensor, value: torch.Tensor, eps: float, label) -> int:
        dev = self.keys.device
        self.keys = nn.Parameter(torch.cat([self.keys, key.to(self.keys.dtype)[None]]), False)
        self.values = nn.Parameter(
            torch.cat([self.values, value.detach().to(self.values.dtype)[None]]), False
        )
        eps_t = torch.tensor([float(eps)], device=dev)
        self.epsilons = nn.Parameter(torch.cat([self.epsilons, eps_t]), False)
        self.labels.append(tuple(label))
        return len(self) - 1

    def truncate(self, n: int) -> None:
        self.keys = nn.Parameter(self.keys[:n].clone(), False)
        self.values = nn.Parameter(self.values[:n].clone(), False)
        self.epsilons = nn.Parameter(self.epsilons[:n].clone(), False)
        del self.labels[n:]

    def extra_repr(self) -> str:
        return f"entries={len(self)}, d_key={self.keys.shape[1]}, d_value={self.values.shape[1]}"


# -- one edit ----------------------------------------------------------------------------
@dataclass
class EditSite:
    """What the model computes on one edit, read once before training."""

    ids: torch.Tensor  # [1, P+T] prompt and target tokens
    target_ids: torch.Tensor  # [T]
    key_pos: int  # the last prompt token
    query: torch.Tensor  # [d_mlp] the wrapped projection's input there
    layer_out: torch.Tensor  # [d_model] its output there (for ``val_init='warm'``)


@torch.no_grad()
def edit_site(lm: LM, layer: int, request: EditRequest) -> EditSite:
    """Run ``prompt + target`` once and read the query at the last prompt token."""
    prompt_ids, target_ids = encode_pair(lm, request.text, request.target_new)
    ids = torch.tensor([prompt_ids + target_ids], device=lm.device)
    proj = lm.module("mlp_out", layer)
    with Hooks() as h:
        x = h.capture_input(proj)
        y = h.capture_output(proj)
        lm.model(input_ids=ids)
    pos = len(prompt_ids) - 1
    return EditSite(ids, ids[0, pos + 1 :], pos, x.value[0, pos].clone(), y.value[0, pos].clone())


def prompt_keys(lm: LM, layer: int, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """GRACE's query (the wrapped projection's input) at the last token of each prompt:
    ``[len(prompts), d_mlp]``, float32."""
    proj = lm.module("mlp_out", layer)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = lm.tokenize(list(prompts[start : start + batch_size]))
            last = batch["attention_mask"].sum(1) - 1
            with Hooks() as h:
                box = h.capture_input(proj)
                lm.model(**batch)
            out.append(box.value[torch.arange(len(last)), last].float())
    return (
        torch.cat(out) if out else torch.zeros(0, lm.d_mlp, device=lm.device_of("mlp_out", layer))
    )


def key_distances(lm: LM, layer: int, requests: Sequence[EditRequest]) -> dict[str, list[float]]:
    """Distances that ε is chosen from, between GRACE keys at ``layer``:

    * ``paraphrase``: an edit prompt's key to each of its paraphrases' keys;
    * ``neighbor``: to each of its neighborhood prompts (other subjects, same relation);
    * ``other_edit``: to every other request's edit prompt;
    * ``norm``: the norm of each edit key (the activation scale).
    """
    edit = prompt_keys(lm, layer, [r.text for r in requests])
    para_i = [i for i, r in enumerate(requests) for _ in r.paraphrases]
    para = prompt_keys(lm, layer, [p for r in requests for p in r.paraphrases])
    nb_i = [i for i, r in enumerate(requests) for _ in r.neighborhood]
    nb_prompts = [p.prompt for r in requests for p in r.neighborhood]
    nb = prompt_keys(lm, layer, nb_prompts)
    same = {(i, p) for i, p in zip(nb_i, nb_prompts) if p == requests[i].text}
    cross = torch.cdist(edit, edit)
    off = ~torch.eye(len(edit), dtype=torch.bool, device=edit.device)
    texts = [r.text for r in requests]
    distinct = torch.tensor(
        [[a != b for b in texts] for a in texts], dtype=torch.bool, device=edit.device
    )
    nb_keep = [k for k, (i, p) in enumerate(zip(nb_i, nb_prompts)) if (i, p) not in same]
    nb_d = (edit[nb_i] - nb).norm(dim=-1)[nb_keep] if nb_i else edit.new_zeros(0)
    return {
        "paraphrase": (edit[para_i] - para).norm(dim=-1).tolist() if para_i else [],
        "neighbor": nb_d.tolist(),
        "other_edit": cross[off & distinct].tolist(),
        "norm": edit.norm(dim=-1).tolist(),
    }


def choose_epsilon(distances: dict[str, list[float]], quantile: float = 0.01) -> float:
    """Half of the ``quantile`` of the edit-to-neighbor distances (other subjects, same
    relation: the closest inputs GRACE must defer on). Fewer than ``quantile`` of the
    neighbors lie within 2ε of a key, so a ball of radius ε contains almost none, and two
    edits' balls overlap (and trigger a split or an expansion) only for keys that close."""
    d = torch.tensor(distances["neighbor"] or distances["other_edit"])
    if not len(d):
        raise ValueError("no neighbor or other-edit distances to choose ε from")
    return float(torch.quantile(d, quantile)) / 2


def _label(site: EditSite) -> tuple[int, ...]:
    return tuple(int(t) for t in site.target_ids)


def update_codebook(book: Codebook, site: EditSite, value0: torch.Tensor, hp: GraceHParams):
    """Apply the paper's rules for a new edit; return ``(entry index, rule, undo record)``.

    ``rule`` is ``"add"``, ``"split"`` or ``"expand"``; the undo record is ``(entries
    before, snapshot of the changed existing entry or None)``.
    """
    n_before = len(book)
    label = _label(site)
    if not n_before:
        return book.append(site.query, value0, hp.eps, label), "add", (n_before, None)
    _, nearest, dist = deferral(site.query[None], book.keys, book.epsilons)
    i, d = int(nearest[0]), float(dist[0])
    if d > hp.eps + float(book.epsilons[i]):  # rule 1: no overlap, a new key
        return book.append(site.query, value0, hp.eps, label), "add", (n_before, None)
    saved = book.snapshot(i)
    if book.labels[i] != label:  # rule 2: conflict, split both radii
        j = book.append(site.query, value0, d / 2, label)
        with torch.no_grad():
            book.epsilons[i] = d / 2 - 1e-5
        return j, "split", (n_before, saved)
    if d > float(book.epsilons[i]):  # rule 3: same label, expand
        with torch.no_grad():
            if hp.eps_expand == "moving_average":
                book.keys[i] = (0.5 * book.keys[i].float() + 0.5 * site.query.float()).to(
                    book.keys.dtype
                )
            book.epsilons[i] = d
    return i, "expand", (n_before, saved)


def train_value(lm: LM, layer: int, site: EditSite, value: torch.Tensor, hp: GraceHParams):
    """Adam on the value that replaces the projection's output at the key position,
    minimising the target's mean NLL; returns ``(value, info)``.

    The positions before the key do not depend on the value (causal attention), so they
    run once and their key-value cache is reused: each step runs only the key position
    and the target tokens.
    """
    v = value.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=hp.edit_lr)
    proj = lm.module("mlp_out", layer)
    pos = site.key_pos
    prefix, suffix = site.ids[:, :pos], site.ids[:, pos:-1]  # suffix predicts the targets
    past, kw = None, _cache_kwarg(lm)
    if pos:
        with torch.no_grad():
            out = lm.model(input_ids=prefix, use_cache=True)
            past = getattr(out, kw, None)

    def put(out: torch.Tensor) -> torch.Tensor:  # the suffix's first position is the key
        mask = torch.zeros(out.shape[1], 1, dtype=torch.bool, device=out.device)
        mask[0] = True
        return torch.where(mask, v.to(out.dtype), out)

    losses: list[float] = []
    correct = False
    with Hooks() as h:
        h.edit_output(proj, put)  # registered after the codebook's hook: overrides it here
        for step in range(hp.n_iter + 1):
            cache = copy.deepcopy(past)  # the forward appends to it: start from the prefix
            out = lm.model(input_ids=suffix, use_cache=past is not None, **{kw: cache})
            logits = out.logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, site.target_ids)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"GRACE loss became {losses[-1]}")
            correct = bool((logits.argmax(-1) == site.target_ids).all())
            if (correct and losses[-1] < hp.stop_nll) or step == hp.n_iter:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return v.detach(), {"steps": len(losses) - 1, "loss": losses[-1], "correct": correct}


def _cache_kwarg(lm: LM) -> str:
    """The name of the key-value cache argument: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (earlier)."""
    import inspect

    params = inspect.signature(lm.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def grace_one(lm: LM, request: EditRequest, hp: GraceHParams) -> tuple[tuple, dict]:
    """One edit: read its key, update the codebook, train the chosen value.

    Returns the undo record and an info dict; on failure the codebook is as before.
    """
    layer = hp.layer_of(lm)
    site = edit_site(lm, layer, request)
    created = Codebook.of(lm, layer) is None
    book = Codebook.of(lm, layer, create=True)
    g = torch.Generator(device="cpu").manual_seed(hp.seed)
    if hp.val_init == "cold":
        value0 = torch.rand(site.layer_out.shape[0], generator=g).to(site.layer_out.device)
    else:
        value0 = site.layer_out.float()
    n_before = len(book)
    record = (n_before, None)
    try:
        i, rule, record = update_codebook(book, site, value0, hp)
        start = book.values[i].float()
        value, info = train_value(lm, layer, site, start, hp)
        with torch.no_grad():
            book.values[i] = value.to(book.values.dtype)
    except BaseException:
        _undo_one(lm, layer, record, created)
        raise
    info.update(layer=layer, entry=i, rule=rule, entries=len(book))
    return (layer, record, created), info


def _undo_one(lm: LM, layer: int, record: tuple, created: bool) -> None:
    book = Codebook.of(lm, layer)
    if book is None:
        return
    n_before, saved = record
    book.truncate(n_before)
    if saved is not None:
        book.write(saved)
    if created and not len(book):
        book.detach()


def codebook_size(lm: LM, layer: int | None = None) -> int:
    """Number of entries in the GRACE codebook of ``layer`` (any layer when None)."""
    layers = range(lm.n_layers) if layer is None else [layer]
    return sum(len(b) for b in (Codebook.of(lm, i) for i in layers) if b is not None)


@register("grace", GraceHParams, lambda lm, hp: [])
def apply_grace(lm: LM, requests: list[EditRequest], hp: GraceHParams) -> dict:
    """GRACE: a codebook adaptor at one FFN, keys with deferral radii (Hartvigsen et al., 2023).

    Requests of a batch are edited one after another, as the reference does (batch size 1).
    """
    done: list[tuple] = []
    infos: list[dict] = []
    try:
        for request in requests:
            record, info = grace_one(lm, request, hp)
            done.append(record)
            infos.append(info)
    except BaseException:
        for layer, record, created in reversed(done):
            _undo_one(lm, layer, record, created)
        raise

    def undo() -> None:
        for layer, record, created in reversed(done):
            _undo_one(lm, layer, record, created)

    return {"undo": undo, "layer": hp.layer_of(lm), "edits": infos}
