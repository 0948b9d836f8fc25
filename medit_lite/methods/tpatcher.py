"""T-Patcher: one mistake, one neuron (Huang et al., ICLR 2023), on causal LMs.

T-Patcher keeps every original weight frozen and corrects each mistake by adding a few
*patch neurons* to one feed-forward (FFN) layer, the last one by default. Read an FFN as a
key-value memory (Geva et al., 2021): a neuron with key ``k``, bias ``b`` and value ``v``
fires with strength ``a = act(x·k + b)`` on the FFN input ``x`` and adds ``a·v`` to the
FFN output. A patch is such a neuron, added beside the existing ones (paper, §3.1):

    FFN_p(x) = FFN(x) + act(x·k_p + b_p) · v_p                                     (patched FFN)

**Where it attaches here.** Llama-style FFNs are gated, ``down(silu(gate·x) ⊙ (up·x))``,
with no single key per neuron, so the patch is not spliced into their matrices. It is a
separate module (:class:`Patch`) that reads the FFN's input ``x`` (the hidden state after
the pre-FFN norm) and adds ``Σ_i relu(x·k_i + b_i) v_i`` to the FFN's output, through
:class:`medit_lite.hooks.Hooks`. That is exactly the equation above with the ReLU as
``act``: BART's GELU (the paper's model) is almost zero below zero, Llama's SiLU is not
(``silu(-3) ≈ -0.14``), and the ReLU makes a silent patch contribute exactly nothing, so
the memory loss below fully controls locality. The patches live as child modules of the
FFN (``model.layers.29.mlp.tpatcher.patches.0.keys`` ...), the original parameters keep
their names and values, and removing a patch (``EditResult.restore``) removes its module
and, with the last one, the hooks.

**Which positions.** The paper patches the ``[CLS]`` position for classification (BERT)
and every decoder position for generation (BART). A causal LM is all decoder, so the patch
acts at *every* position, including every token generated later: at inference time there
is no way to tell in advance where an answer starts. It is trained to fire at the
positions that predict a wrongly predicted target token, one neuron per such token (up to
``max_neurons``; the paper's code does the same for zsRE), and to stay silent on every
position of a memory set. In the last layer a patch firing at position ``t`` changes only
the prediction made at ``t``: no later layer reads it. That is why the last layer is the
default, and it also makes training cheap: the frozen model below the patch is run once,
and each Adam step only recomputes the final norm and the unembedding.

**How a patch is trained** (paper, §3.2). For an edit ``(x_e, y_e)`` with FFN inputs
``q_e`` at the patched positions, the key starts at ``k = q_e / ‖q_e‖²`` (so ``q_e·k = 1``),
the bias at 0 (as the paper's code, ``ModifyLinearOutput._reset_parameters``) and the
value at 0, so that the model is unchanged at step 0 (a departure: the code's value,
``ModifyLinearInput``, starts at ``randn`` times an amplifier of 10), and Adam minimises

    L = l_e + α l_a + μ l_m                                                        (total loss)
    l_e = -(1/T) Σ_t log p(y_{e,t} | x_e, y_{e,<t})                                 (edit loss)
    l_a = exp(m_a - (q_e·k + b))                                               (activation loss)
    l_m = S(Q_M k + b + β; K) + S((Q_M - q_e) k + γ; K)                           (memory loss)

with ``S(z; K)`` the mean of the ``K`` largest values of ``exp(z)``. ``Q_M`` stacks the FFN
inputs of a *memory set*: every position of a set of ordinary texts, plus every position of
the earlier edits (the paper's code adds each edit to the memory, which protects the
earlier edits). The activation loss makes the patch fire on the edit; the first memory
term pushes its pre-activation below ``-β`` on the memory, the second keeps the edit's
activation at least ``γ`` above every memory one. The memory's first positions are left
out, as in the paper's code (its ``[:, 1:]``): no prediction is read there, and in a causal
LM the first position's hidden state is an outlier (the attention sink) that would
dominate the top-K. Defaults, from the paper's code (``src/utils.py``, ``scripts/main.py``):
``α = 1`` (``alc``), ``β = γ = 3`` (``margin_val2 = -3``, ``margin_val1 = 3``), ``m_a = 0``
(``act_margin_val``), ``K = 1000`` (``memory_loss = top1000_exp+top1000_exp``), at most 5
neurons per edit (``max_add_neuron_num``) and ``μ = 5`` (``mlc``; its zsRE runs use 10).
Its activation loss is ``top5_exp``, the mean of the 5 largest ``exp(m_a - a)``: with at
most 5 neurons and one edit at a time that is the mean used here. Three departures, for a
CPU and a gated FFN: Adam's learning rate for keys and biases is 3e-2 instead of 1e-2 (a
patch then stops after ~40 steps instead of ~120, 2-3 s on a CPU), without the paper's
weight decay of 0.01; and instead of the paper's trainable amplifier of the values
(``amplify_v``, initialised to 10) the values get their own learning rate of 0.1.
Training stops as soon as the edit is predicted, each neuron fires on its position and the
patch is silent on the whole memory (the paper's code trains up to 2000 steps with early
stopping on a validation set).

T-Patcher was published for BERT and BART; this module is an adaptation to decoder-only
LMs written for this project (EasyEdit has no implementation).
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import nn

from ..editing import register
from ..hooks import Hooks
from ..metrics import encode_pair, pair_logits
from ..models import LM
from ..positions import after_first_token
from ..requests import EditRequest

BANK_NAME = "tpatcher"  # child-module name of the patch bank inside a patched FFN


# -- hyperparameters -----------------------------------------------------------------------
@dataclass(frozen=True)
class TPatcherHParams:
    """Hyperparameters of T-Patcher (defaults: the paper's code, tuned steps for SmolLM2)."""

    layer: int | None = None  # FFN layer to patch; None = the last (the paper's choice)
    max_neurons: int = 5  # neurons per edit: one per wrongly predicted target token, at most
    lr: float = 3e-2  # Adam learning rate of keys and biases (paper code: 1e-2, see below)
    value_lr: float = 1e-1  # of the values (the paper's code scales values by 10 instead)
    max_steps: int = 300
    act_weight: float = 1.0  # α (paper code: alc)
    memory_weight: float = 5.0  # μ (paper code: mlc)
    act_margin: float = 0.0  # m_a: the edit pre-activation is pushed above it
    memory_margin: float = 3.0  # β: memory pre-activations are pushed below -β
    gap_margin: float = 3.0  # γ: the edit activation stays γ above the memory's
    top_k: int = 1000  # K of S(z; K), the top-K mean in the memory loss
    skip_correct: bool = True  # add nothing when the model already predicts the target
    memory_texts: tuple[str, ...] = field(default=(), repr=False)  # () = built-in texts
    seed: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> TPatcherHParams:
        """Same defaults for every model family (the patch adapts to ``d_model``)."""
        return cls()

    def validate(self, lm: LM) -> None:
        if self.layer is not None and not (
            isinstance(self.layer, int) and 0 <= self.layer < lm.n_layers
        ):
            raise ValueError(f"layer {self.layer} is outside the model's {lm.n_layers} layers")
        for name in ("max_neurons", "max_steps", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hyperparameter {name} must be a positive integer")
        for name in ("lr", "value_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hyperparameter {name} must be positive")
        if isinstance(self.memory_texts, str) or not all(
            isinstance(t, str) and t.strip() for t in self.memory_texts
        ):
            raise TypeError("hyperparameter memory_texts must be a tuple of non-empty strings")

    def layer_of(self, lm: LM) -> int:
        return lm.n_layers - 1 if self.layer is None else self.layer


# -- the patch and the bank that attaches patches to one FFN ----------------------------
class Patch(nn.Module):
    """``n`` patch neurons: keys ``[n, d]``, biases ``[n]``, values ``[n, d]``.

    ``forward(x) = relu(x Kᵀ + b) V``, the patch's contribution to the FFN output.
    ``edit_queries`` keeps the FFN inputs of the edit it was made for (every position of
    prompt and target), which later patches use as memory; it is a buffer, not a weight.
    """

    def __init__(self, keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys = nn.Parameter(keys)
        self.bias = nn.Parameter(bias)
        self.values = nn.Parameter(values)
        self.register_buffer("edit_queries", keys.new_zeros(0, keys.shape[1]), persistent=False)

    @classmethod
    def init_from(cls, queries: torch.Tensor) -> Patch:
        """Keys ``q / ‖q‖²`` (pre-activation 1 on the edit), zero biases and values."""
        q = queries.detach().float()
        keys = q / q.pow(2).sum(-1, keepdim=True)
        return cls(keys, q.new_zeros(q.shape[0]), torch.zeros_like(q))

    @property
    def n_neurons(self) -> int:
        return self.keys.shape[0]

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``x·k_i + b_i`` for each neuron: ``[..., d] -> [..., n]``."""
        return x @ self.keys.T.to(x.dtype) + self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x)) @ self.values.to(x.dtype)

    def extra_repr(self) -> str:
        return f"neurons={self.n_neurons}, d_model={self.keys.shape[1]}"


class PatchBank(nn.Module):
    """Every patch of one FFN; while attached it adds ``Σ_p patch_p(x)`` to ``FFN(x)``.

    It sits inside the FFN module as the child ``tpatcher`` and uses two hooks on the
    FFN: one remembers the FFN's input ``x``, the other adds the patches' output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.ModuleList()
        self._hooks = Hooks()
        self._x: torch.Tensor | None = None
        self._mlp = lambda: None  # weak reference to the FFN, set when attached

    # attach / detach --------------------------------------------------------------------
    @classmethod
    def of(cls, lm: LM, layer: int, create: bool = False) -> PatchBank | None:
        """The bank of ``layer``'s FFN; with ``create=True`` a new one is attached if none."""
        mlp = lm.module("mlp", layer)
        bank = mlp._modules.get(BANK_NAME)
        if bank is None and create:
            bank = cls()
            bank._mlp = weakref.ref(mlp)
            mlp.add_module(BANK_NAME, bank)
            bank._hooks.edit_input(mlp, bank._remember)
            bank._hooks.edit_output(mlp, bank._add)
        return bank

    def detach(self) -> None:
        """Remove the hooks and take the bank out of its FFN."""
        self._hooks.remove()
        mlp = self._mlp()
        if mlp is not None and mlp._modules.get(BANK_NAME) is self:
            del mlp._modules[BANK_NAME]

    def remove(self, patch: Patch) -> None:
        """Remove one patch; the bank detaches itself when it becomes empty."""
        for i, p in enumerate(self.patches):
            if p is patch:
                del self.patches[i]
                break
        if not len(self.patches):
            self.detach()

    # the forward pass -------------------------------------------------------------------
    def _remember(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return x

    def _add(self, out: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None or not len(self.patches):
            return out
        return out + self(x).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = torch.cat([p.keys for p in self.patches]).to(x.dtype)
        bias = torch.cat([p.bias for p in self.patches]).to(x.dtype)
        values = torch.cat([p.values for p in self.patches]).to(x.dtype)
        return torch.relu(x @ keys.T + bias) @ values

    @property
    def n_neurons(self) -> int:
        return sum(p.n_neurons for p in self.patches)


# -- the three losses (paper §3.2) ---------------------------------------------------------
def top_k_exp_mean(z: torch.Tensor, k: int) -> torch.Tensor:
    """``S(z; k)``: the mean of the ``k`` largest values of ``exp(z)`` (all of them if fewer)."""
    z = z.reshape(-1)
    return torch.exp(torch.topk(z, min(k, z.numel())).values).mean()


def activation_loss(edit_pre: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """``l_a = exp(m_a - (q_e·k + b))``, averaged over the patch neurons.

    ``edit_pre[i]`` is neuron ``i``'s pre-activation at the position it patches. The loss
    is large while the neuron does not fire on its edit and decays once it does.
    """
    return torch.exp(margin - edit_pre).mean()


def memory_loss(
    memory_pre: torch.Tensor,
    edit_pre: torch.Tensor,
    memory_margin: float = 3.0,
    gap_margin: float = 3.0,
    top_k: int = 1000,
) -> torch.Tensor:
    """``l_m = S(Q_M k + b + β; K) + S((Q_M - q_e) k + γ; K)``.

    ``memory_pre`` is ``[M, n]``: every memory position's pre-activation of each neuron;
    ``edit_pre`` is ``[n]``. The first term keeps the patch below ``-β`` on the memory, the
    second keeps each neuron's activation on its edit ``γ`` above its memory activations.
    The top-``K`` mean focuses the loss on the memory inputs closest to firing.
    """
    silent = top_k_exp_mean(memory_pre + memory_margin, top_k)
    gap = top_k_exp_mean(memory_pre - edit_pre[None, :] + gap_margin, top_k)
    return silent + gap


# -- the memory set --------------------------------------------------------------------------
def builtin_memory_texts() -> list[str]:
    """Ordinary texts written for this project (data/tpatcher_memory.json)."""
    text = resources.files("medit_lite").joinpath("data/tpatcher_memory.json").read_text("utf-8")
    return list(json.loads(text))


def probe_memory_texts(
    requests: Sequence[EditRequest], exclude: Sequence[EditRequest] = (), limit: int = 300
) -> tuple[str, ...]:
    """Memory texts drawn from a task, as the paper does with its training data: the
    neighborhood probes (prompt and answer) of *held-out* ``requests``, at most ``limit``.

    The probes of ``exclude`` (the stream being edited and measured) and its edit prompts
    and paraphrases are never taken, so a locality score computed on ``exclude``'s probes
    stays a score on inputs the patches were not trained on. Only probes are used, not the
    held-out edit questions: those look like the stream's paraphrases, and training the
    patches to stay silent on them would cost generalization.
    """
    banned = {p.prompt for r in exclude for p in r.neighborhood}
    banned |= {r.text for r in exclude} | {q for r in exclude for q in r.paraphrases}
    texts: dict[str, None] = {}  # insertion-ordered, with constant-time membership
    for r in requests:
        for probe in r.neighborhood:
            text = f"{probe.prompt} {probe.answer}"
            if probe.prompt not in banned and len(texts) < limit:
                texts.setdefault(text)
    return tuple(texts)


@torch.no_grad()
def ffn_inputs(
    lm: LM, layer: int, texts: Sequence[str], batch_size: int = 32, skip_first: bool = False
) -> torch.Tensor:
    """FFN inputs of ``layer`` at every (non-padding) position of ``texts``: ``[positions, d]``.

    ``skip_first`` leaves out each text's first position, as the paper's code does for its
    memory (``[:, 1:]``): its prediction is never scored or generated from, and in a
    causal LM its hidden state is an outlier (the attention sink).
    """
    out = []
    mlp = lm.module("mlp", layer)
    for start in range(0, len(texts), batch_size):
        batch = lm.tokenize(list(texts[start : start + batch_size]))
        with Hooks() as h:
            box = h.capture_input(mlp)
            h.edit_input(mlp, _stop)  # nothing above the FFN input is needed: skip it
            try:
                lm.model(**batch)
            except _Stop:
                pass
        mask = batch["attention_mask"]
        keep = after_first_token(mask) if skip_first else mask.bool()
        out.append(box.value[keep].float())
    return torch.cat(out) if out else torch.zeros(0, lm.d_model, device=lm.device_of("mlp", layer))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input has been seen."""


def _stop(x: torch.Tensor) -> torch.Tensor:
    raise _Stop


_MEMORY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def memory_queries(lm: LM, layer: int, texts: Sequence[str]) -> torch.Tensor:
    """:func:`ffn_inputs` of the memory texts, cached per model while its weights are unchanged.

    The cache key holds each original parameter's in-place version counter, so any change
    made by an editor (or a restore) recomputes the memory. Patch parameters are left out
    of the key: they act after the FFN input they would otherwise invalidate.
    """
    versions = tuple(
        p._version for name, p in lm.model.named_parameters() if f".{BANK_NAME}." not in name
    )
    key = (layer, hash(tuple(texts)))
    cache = _MEMORY_CACHE.setdefault(lm.model, {})
    if key in cache and cache[key][0] == versions:
        return cache[key][1]
    queries = ffn_inputs(lm, layer, texts, skip_first=True)
    cache[key] = (versions, queries)
    return queries


# -- one edit ----------------------------------------------------------------------------------
@dataclass
class EditSite:
    """What the frozen model computes on one edit, captured once before training."""

    target_ids: torch.Tensor  # [T] target tokens
    queries: torch.Tensor  # [T, d] FFN inputs at the positions predicting them
    base: torch.Tensor  # [T, d] the patched layer's output there (earlier patches included)
    all_queries: torch.Tensor  # [P+T-1, d] FFN inputs at every position but the first
    wrong: list[int]  # target indices the model gets wrong (teacher-forced argmax)


@torch.no_grad()
def edit_site(lm: LM, layer: int, request: EditRequest) -> EditSite:
    """Run the model on ``prompt + target`` once and read what training needs."""
    prompt_ids, target_ids = encode_pair(lm, request.text, request.target_new)
    ids = torch.tensor([prompt_ids + target_ids], device=lm.device)
    with Hooks() as h:
        q = h.capture_input(lm.module("mlp", layer))
        out = h.capture_output(lm.module("layer", layer))
        logits = lm.model(input_ids=ids).logits[0]
    rows = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(target_ids) - 1)
    target = torch.tensor(target_ids, device=logits.device)
    predicted = logits[rows].argmax(-1)
    return EditSite(
        target_ids=target,
        queries=q.value[0, rows].float(),
        base=out.value[0, rows].float(),
        all_queries=q.value[0, 1:].float(),  # the first position left out, as above
        wrong=[int(i) for i in torch.nonzero(predicted != target).flatten()],
    )


def _tail_logits(lm: LM, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last layer's output: final norm, then unembedding."""
    dtype = lm.dtype
    normed = lm.module("final_norm")(hidden.to(dtype))
    return lm.module("unembed")(normed).float()


def train_patch(
    lm: LM,
    layer: int,
    site: EditSite,
    memory: torch.Tensor,
    hp: TPatcherHParams,
    request: EditRequest | None = None,
) -> tuple[Patch, dict]:
    """Initialise a patch on the edit's wrong positions and train it with ``l_e + α l_a + μ l_m``.

    In the last layer the edit loss is computed from the captured layer output plus the
    patch (final norm and unembedding only); in any other layer the patch is attached and
    the whole model runs each step.
    """
    torch.manual_seed(hp.seed)
    neurons = site.wrong[: hp.max_neurons]
    at = lm.device_of("mlp", layer)  # the patched layer's own device
    patch = Patch.init_from(site.queries[neurons].to(at)).to(at)
    optimizer = torch.optim.Adam(
        [
            {"params": [patch.keys, patch.bias], "lr": hp.lr},
            {"params": [patch.values], "lr": hp.value_lr},
        ]
    )
    rows = torch.tensor(neurons, device=at)
    cols = torch.arange(len(neurons), device=at)
    last = layer == lm.n_layers - 1
    bank = None
    if not last:
        bank = PatchBank.of(lm, layer, create=True)
        bank.patches.append(patch)
        pairs = [encode_pair(lm, request.text, request.target_new)]
    history: list[dict] = []
    try:
        for step in range(hp.max_steps + 1):
            if last:
                logits = _tail_logits(lm, site.base + patch(site.queries))
            else:
                logits = pair_logits(lm, pairs)[0].float()
            pre = patch.pre_activation(site.queries)  # [T, n]
            edit_pre = pre[rows, cols]  # each neuron at its own position
            memory_pre = patch.pre_activation(memory)  # [M, n]
            l_e = torch.nn.functional.cross_entropy(logits, site.target_ids.to(logits.device))
            l_e = l_e.to(at)  # the unembedding may sit on another device than the patch
            l_a = activation_loss(edit_pre, hp.act_margin)
            l_m = memory_loss(memory_pre, edit_pre, hp.memory_margin, hp.gap_margin, hp.top_k)
            loss = l_e + hp.act_weight * l_a + hp.memory_weight * l_m
            with torch.no_grad():
                state = {
                    "step": step,
                    "loss": float(loss),
                    "edit_loss": float(l_e),
                    "activation_loss": float(l_a),
                    "memory_loss": float(l_m),
                    "edit_activation": float(edit_pre.min()),
                    "memory_activation": float(memory_pre.max()) if memory.numel() else -math.inf,
                    "correct": bool((logits.argmax(-1) == site.target_ids).all()),
                }
            history.append(state)
            done = state["correct"] and state["edit_activation"] > 0
            done = done and state["memory_activation"] < 0
            if done or step == hp.max_steps:
                break
            if not math.isfinite(state["loss"]):
                raise FloatingPointError(f"T-Patcher loss became {state['loss']}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        if bank is not None:
            bank.remove(patch)
    for p in patch.parameters():
        p.requires_grad_(False)
    if not all(torch.isfinite(p).all() for p in patch.parameters()):
        raise FloatingPointError("T-Patcher produced a non-finite patch")
    return patch, {"steps": len(history) - 1, "history": history, **history[-1]}


def patch_one(lm: LM, request: EditRequest, hp: TPatcherHParams) -> tuple[Patch | None, dict]:
    """Patch one mistake: find its wrong tokens, train a patch, attach it. Returns (patch, info)."""
    layer = hp.layer_of(lm)
    site = edit_site(lm, layer, request)
    if not site.wrong and hp.skip_correct:
        return None, {"skipped": True, "neurons": 0, "layer": layer}
    if not site.wrong:  # nothing wrong, patched anyway: one neuron on the first token
        site.wrong = [0]
    bank = PatchBank.of(lm, layer)
    texts = list(hp.memory_texts) or builtin_memory_texts()
    parts = [memory_queries(lm, layer, texts)]
    if bank is not None:  # earlier edits join the memory (the paper's memory update)
        parts += [p.edit_queries for p in bank.patches]
    memory = torch.cat(parts)
    patch, info = train_patch(lm, layer, site, memory, hp, request)
    patch.edit_queries = site.all_queries.detach().clone()
    PatchBank.of(lm, layer, create=True).patches.append(patch)
    info.update(skipped=False, neurons=patch.n_neurons, layer=layer, memory_size=len(memory))
    return patch, info


def remove_patch(lm: LM, layer: int, patch: Patch) -> None:
    """Take one patch out of ``layer``'s FFN (detaching the bank when it empties)."""
    bank = PatchBank.of(lm, layer)
    if bank is not None:
        bank.remove(patch)


def patch_activations(lm: LM, texts: Sequence[str], layer: int | None = None) -> torch.Tensor:
    """Each patch neuron's activation at the last token of each text: ``[texts, neurons]``.

    The last token is the position that predicts what comes next, where a patch for a
    prompt has to fire. Zero means the neuron is silent there.
    """
    layer = lm.n_layers - 1 if layer is None else layer
    bank = PatchBank.of(lm, layer)
    if bank is None or not len(bank.patches):
        return torch.zeros(len(texts), 0)
    rows = []
    with torch.no_grad():
        for text in texts:
            q = ffn_inputs(lm, layer, [text])[-1]
            rows.append(torch.cat([torch.relu(p.pre_activation(q)) for p in bank.patches]))
    return torch.stack(rows).cpu()


@register("tpatcher", TPatcherHParams, lambda lm, hp: [])
def apply_tpatcher(lm: LM, requests: list[EditRequest], hp: TPatcherHParams) -> dict:
    """T-Patcher: add trained patch neurons to the last FFN (Huang et al., 2023)."""
    layer = hp.layer_of(lm)
    added: list[Patch] = []
    infos: list[dict] = []
    try:
        for request in requests:
            patch, info = patch_one(lm, request, hp)
            if patch is not None:
                added.append(patch)
            infos.append(info)
    except BaseException:
        for patch in reversed(added):
            remove_patch(lm, layer, patch)
        raise

    def undo() -> None:
        for patch in reversed(added):
            remove_patch(lm, layer, patch)

    return {
        "undo": undo,
        "layer": layer,
        "neurons": sum(p.n_neurons for p in added),
        "patches": added,
        "edits": infos,
    }
