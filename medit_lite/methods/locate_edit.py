"""The locate-then-edit steps ROME, MEMIT, LSDM and DAMA share (Meng et al., 2022; 2023).

A located MLP output matrix W (``mlp_out``, d_model × d_mlp) is read as a linear
associative memory from keys k (its input, the MLP's hidden activation) to values v (its
output). An edit in this family has three steps, each a function below; the method
modules compose them as their papers' algorithm boxes do (the reference code splits them
the same way: ``compute_u`` / ``compute_v`` / ``rome_main``):

0. **contexts** (:func:`context_templates`): short prefixes sampled from the model, so
   keys and values do not depend on one particular context;
1. **keys** (ROME Eq. 3, :func:`lookup_states`, :func:`compute_key`): the input (or
   output) of a module at the lookup token (the subject's last token, or the last
   token), averaged over the contexts;
2. **values** (ROME Eq. 4, MEMIT Eq. 16, :func:`optimise_delta`): a vector δ added at the
   lookup token that makes the model say the new target, found with Adam (NLL over the
   contexts + KL on "{subject} is a" + weight decay, with a norm clamp);
3. **update**: the least-squares change of W that writes the new values for the new keys
   while keeping the keys summarised by C = E[k kᵀ] (:mod:`medit_lite.stats`): rank one
   with a hard constraint (ROME Eq. 2, :func:`rank_one_update`) or a batch with the
   weight λ on the old keys (MEMIT Eq. 14, :func:`least_squares_update`).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..hooks import Hooks
from ..metrics import encode_pair
from ..models import LM
from ..positions import subject_span
from ..replay import cache_keyword, final_hidden, layer_input, replay_layers
from ..requests import EditRequest
from ..stats import NAMED_CORPORA, check_n_tokens, second_moment

FACT_TOKENS = ("subject_last", "last")
EARLY_STOP_TERMS = ("loss", "nll")


@dataclass(frozen=True)
class LocateHParams:
    """Hyperparameters ROME and MEMIT share: the lookup token, the optimisation of the new
    value (Eq. 4 of ROME, Eq. 16 of MEMIT) and the key statistics (names follow the
    reference configuration files)."""

    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    #: what ``early_stop_loss`` is compared with: the whole loss (the reference code) or
    #: only its NLL term, i.e. stop once the mean P(target) over the contexts is ≈ 95 %
    early_stop_term: str = "loss"
    #: (length in tokens, how many) of the prefixes sampled from the model for k* and v*
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    #: the words the sampled prefixes start with, in turn (MEMIT's code: five openers)
    context_openers: tuple[str, ...] = ("The",)
    mom2_adjustment: bool = True
    mom2_corpus: str = "offline"
    mom2_n_samples: int = 20_000  # key vectors (tokens) averaged into C
    mom2_max_length: int = 128
    seed: int = 0

    def validate_common(self, lm: LM | None = None) -> None:
        """Checks of the shared fields (each subclass adds its own in ``validate``); with
        ``lm``, also that ``mom2_n_samples`` gives an invertible C (at least d_mlp keys)."""
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"hyperparameter fact_token must be one of {FACT_TOKENS}")
        if self.v_num_grad_steps < 1:
            raise ValueError("hyperparameter v_num_grad_steps must be at least 1")
        if self.v_lr <= 0:
            raise ValueError("hyperparameter v_lr must be positive")
        if self.clamp_norm_factor <= 0:
            raise ValueError("hyperparameter clamp_norm_factor must be positive")
        if self.early_stop_term not in EARLY_STOP_TERMS:
            raise ValueError(f"hyperparameter early_stop_term must be one of {EARLY_STOP_TERMS}")
        _check_templates(self.context_templates)
        _check_corpus(self, lm)


def _check_templates(spec) -> None:
    for item in spec:
        if (
            not isinstance(item, (tuple, list))
            or len(item) != 2
            or not all(isinstance(x, int) and x >= 1 for x in item)
        ):
            raise ValueError(
                "hyperparameter context_templates must hold (length, count) pairs of "
                f"positive integers, got {item!r}"
            )


def _check_corpus(hp, lm: LM | None = None) -> None:
    if hp.mom2_adjustment:
        if hp.mom2_corpus not in NAMED_CORPORA:
            raise ValueError(f"hyperparameter mom2_corpus must be one of {NAMED_CORPORA}")
        if hp.mom2_n_samples < 1:
            raise ValueError("hyperparameter mom2_n_samples must be at least 1")
        if hp.mom2_max_length < 2:
            raise ValueError("hyperparameter mom2_max_length must be at least 2")
        if lm is not None:
            try:
                check_n_tokens(lm, hp.mom2_n_samples)
            except ValueError as e:
                raise ValueError(f"hyperparameter mom2_n_samples: {e}") from None


# -- step 0: prefixes ------------------------------------------------------------------
_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def context_templates(
    lm: LM, spec=((5, 10), (10, 10)), seed: int = 0, openers: Sequence[str] = ("The",)
) -> list[str]:
    """``"{}"`` plus short texts sampled from the model (top-k 5, seeded), each followed by
    ``". {}"``: the contexts k* and v* are averaged over (ROME Eq. 3 and 4). For each
    ``(length, count)`` of ``spec``, ``count`` texts of ``length`` tokens, the i-th starting
    with ``openers[i % len(openers)]`` (MEMIT's code: "The", "Therefore", "Because", "I",
    "You", one text each).

    Kept per model object for the session (sampling them takes a few seconds).
    """
    _check_templates(spec)
    openers = tuple(openers)
    if not openers or not all(isinstance(o, str) and o.strip() for o in openers):
        raise ValueError("context_openers must be non-empty words")
    per_model = _TEMPLATES.setdefault(lm.model, {})
    key = (tuple(map(tuple, spec)), seed, openers)
    if key not in per_model:
        out = ["{}"]
        devices = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for length, count in spec:
                starts = [openers[i % len(openers)] for i in range(count)]
                texts = lm.generate(starts, length - 1, do_sample=True, top_k=5)
                for start, t in zip(starts, texts):
                    t = (start + t).replace("{", " ").replace("}", " ").replace("\n", " ")
                    out.append(" ".join(t.split()) + ". {}")
        per_model[key] = out
    return list(per_model[key])


def template_groups(spec) -> list[int]:
    """How many templates each group holds: the plain prompt, then each ``(length,
    count)`` of ``spec`` (for MEMIT's grouped key average)."""
    return [1] + [count for _, count in spec]


def average_keys(keys: torch.Tensor, groups: Sequence[int] | None) -> torch.Tensor:
    """Keys ``[n, T, d]`` averaged over the templates: flat (``groups=None``), or, as
    MEMIT's ``compute_ks``, the mean of each group's mean (the plain prompt then weighs as
    much as all sampled prefixes of one length together)."""
    if groups is None:
        return keys.mean(1)
    if sum(groups) != keys.shape[1]:
        raise ValueError(f"groups {list(groups)} do not add up to {keys.shape[1]} templates")
    parts = torch.split(keys, list(groups), dim=1)
    return torch.stack([p.mean(1) for p in parts], 1).mean(1)


# -- step 1: the key -------------------------------------------------------------------
def _rows(lm: LM, request: EditRequest, templates: list[str], fact_token: str):
    """(prompt ids, target ids, lookup index) for the edit prompt in every context."""
    rows = []
    for tpl in templates:
        template = tpl.replace("{}", request.prompt)
        text = template.replace("{}", request.subject, 1)
        prompt_ids, target_ids = encode_pair(lm, text, request.target_new)
        if fact_token == "last":
            idx = len(prompt_ids) - 1
        else:
            idx = subject_span(lm, template, request.subject)[1] - 1
        rows.append((prompt_ids, target_ids, idx))
    return rows


def _batch(lm: LM, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, seqs))
    pad = lm.tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}


class _Stop(Exception):
    pass


def _stop(*args):
    raise _Stop


@torch.no_grad()
def lookup_states(
    lm: LM,
    requests: list[EditRequest],
    module: tuple[str, int],
    templates: list[str],
    fact_token: str = "subject_last",
    output: bool = False,
    batch_size: int = 128,
) -> torch.Tensor:
    """[requests, templates, d]: the input (or ``output=True``: the output) of ``module``
    at the lookup token of each request's prompt in each context. The forward pass stops
    at ``module``."""
    kind, layer = module
    rows = [row for r in requests for row in _rows(lm, r, templates, fact_token)]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = _batch(lm, [p for p, _, _ in chunk])
        with Hooks() as h:
            target = lm.module(kind, layer)
            box = h.capture_output(target) if output else h.capture_input(target)
            if output and kind == "layer" and layer + 1 < lm.n_layers:
                h.edit_input(lm.module("layer", layer + 1), _stop)
            elif not output:
                h.edit_input(target, _stop)
            try:
                lm.model(**batch, use_cache=False, logits_to_keep=1)
            except _Stop:
                pass
        at = box.value.device  # the module's own device (device maps place layers apart)
        idx = torch.tensor([i for _, _, i in chunk], device=at)
        out.append(box.value[torch.arange(len(chunk), device=at), idx].float())
    return torch.cat(out).view(len(requests), len(templates), -1)


def compute_key(
    lm: LM, request: EditRequest, layer: int, templates: list[str], fact_token="subject_last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k*, k_p): the MLP key at the lookup token averaged over ``templates`` (Eq. 3),
    and the key of the plain prompt (``templates[0]`` must be ``"{}"``)."""
    if templates[0] != "{}":
        raise ValueError('templates[0] must be the plain prompt "{}"')
    keys = lookup_states(lm, [request], ("mlp_out", layer), templates, fact_token)[0]
    return keys.mean(0), keys[0]


# -- step 2: the value -------------------------------------------------------------------
@dataclass
class ValueResult:
    """The optimised value: v* = ``v_init`` + ``delta`` at the edited layer's MLP output."""

    delta: torch.Tensor
    v_init: torch.Tensor
    losses: list[dict] = field(default_factory=list)

    @property
    def v_star(self) -> torch.Tensor:
        return self.v_init + self.delta


@dataclass
class _RowIndex:
    """Rows of :func:`optimise_delta`'s batch, with the index tensors that point into them
    (target tokens, KL positions, owners). Each row is split at its lookup token: the
    *prefix* before it cannot depend on δ (attention is causal), so it is run once and
    kept as a key/value cache; each optimisation step runs only the *suffix* (the lookup
    token, where δ is added, and what follows it). Positions are counted in the suffix
    (the lookup token is position 0 of every row); ``rows`` maps rows to the full batch.
    """

    suffix: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids of the suffixes
    prefix: dict[str, torch.Tensor]  # input_ids, attention_mask of the prefixes
    hidden: torch.Tensor | None  # the residual stream entering the edited layer (suffixes)
    rows: torch.Tensor  # [rows] index of each row in the full batch
    lookup: torch.Tensor  # [rows] the lookup token's position in the suffix (0 with a cache)
    owner: torch.Tensor  # [rows] the request each row belongs to
    tgt_rows: torch.Tensor  # [targets] row of each target token ...
    tgt_pos: torch.Tensor  # ... the position predicting it ...
    tgt_ids: torch.Tensor  # ... its id ...
    tgt_weight: torch.Tensor  # ... and 1 / (target tokens in its row)
    kl_rows: torch.Tensor  # [kl rows] the "{subject} is a" rows held here ...
    kl_pos: torch.Tensor  # ... their last position ...
    requests: torch.Tensor  # ... and their requests (indices into the full list)
    cache_arg: str = "past_key_values"  # the forward pass's name for the cache
    _cache: object = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.suffix["attention_mask"].sum(1)

    def select(self, active: torch.Tensor) -> _RowIndex:
        """Only the rows of the requests where ``active`` (indexed by the full request list)
        is true: the finished requests' rows are dropped from the forward pass."""
        return self.select_rows(active[self.owner])

    def select_rows(self, keep_rows: torch.Tensor) -> _RowIndex:
        """The rows where ``keep_rows`` is true, padded only to the longest of them."""
        sel = torch.nonzero(keep_rows).flatten()
        new_index = torch.full_like(self.owner, -1)
        new_index[sel] = torch.arange(len(sel), device=sel.device)
        width = int(self.lengths[sel].max()) if len(sel) else 0
        prefix_width = int(self.prefix["attention_mask"][sel].sum(1).max()) if len(sel) else 0
        keep_tgt = keep_rows[self.tgt_rows]
        keep_kl = keep_rows[self.kl_rows]
        return _RowIndex(
            suffix={k: v[sel, :width] for k, v in self.suffix.items()},
            prefix={k: v[sel, :prefix_width] for k, v in self.prefix.items()},
            hidden=None if self.hidden is None else self.hidden[sel, :width],
            rows=self.rows[sel],
            lookup=self.lookup[sel],
            owner=self.owner[sel],
            tgt_rows=new_index[self.tgt_rows[keep_tgt]],
            tgt_pos=self.tgt_pos[keep_tgt],
            tgt_ids=self.tgt_ids[keep_tgt],
            tgt_weight=self.tgt_weight[keep_tgt],
            kl_rows=new_index[self.kl_rows[keep_kl]],
            kl_pos=self.kl_pos[keep_kl],
            requests=self.requests[keep_kl],
            cache_arg=self.cache_arg,
        )

    def by_length(self, max_parts: int = 3) -> list[_RowIndex]:
        """The rows split into at most ``max_parts`` groups of similar suffix length, chosen
        to pad as few tokens as possible."""
        length_t = self.lengths
        cuts = _length_cuts(sorted(length_t.tolist()), max_parts)
        if len(cuts) == 1:
            return [self]
        parts, low = [], 0
        for high in cuts:
            parts.append(self.select_rows((length_t > low) & (length_t <= high)))
            low = high
        return parts

    def inputs(self, lm: LM) -> dict:
        """Keyword arguments of the model's forward pass over the suffixes: with a fresh
        copy of the prefixes' key/value cache (each pass appends to it) when there is a
        prefix. The cache is computed on first use, without gradients: every row's
        prefix is run with all its positions visible (a pad only ever follows the real
        tokens of its row, so the real tokens' keys and values are exact and no row is
        fully masked), and then masked in the suffix pass."""
        if self.prefix["input_ids"].shape[1] == 0:
            return self.suffix | {"use_cache": False}
        if self._cache is None:
            self._cache = DynamicCache(config=lm.model.config)
            with torch.no_grad():
                final_hidden(
                    lm,
                    input_ids=self.prefix["input_ids"],
                    use_cache=True,
                    **{self.cache_arg: self._cache},
                )
        mask = torch.cat([self.prefix["attention_mask"], self.suffix["attention_mask"]], 1)
        return {
            "input_ids": self.suffix["input_ids"],
            "position_ids": self.suffix["position_ids"],
            "attention_mask": mask,
            "use_cache": True,
            self.cache_arg: copy.deepcopy(self._cache),
        }


def _length_cuts(lengths: list[int], max_parts: int) -> list[int]:
    """Upper lengths of ≤ ``max_parts`` groups of the sorted ``lengths`` that minimise the
    padded tokens Σ_groups (rows × longest row), by dynamic programming over split points
    (a group never splits rows of equal length)."""
    n = len(lengths)
    ends = [i for i in range(1, n + 1) if i == n or lengths[i] != lengths[i - 1]]
    best = {0: (0, [])}  # rows covered → (padded tokens, cut lengths)
    for _ in range(max_parts):
        nxt = dict(best)
        for start, (cost, cuts) in best.items():
            for end in ends:
                if end <= start:
                    continue
                c = cost + (end - start) * lengths[end - 1]
                if end not in nxt or c < nxt[end][0]:
                    nxt[end] = (c, cuts + [lengths[end - 1]])
        best = nxt
    return best[n][1]


def optimise_delta(
    lm: LM,
    requests: list[EditRequest],
    module: tuple[str, int],
    hp,
    templates: list[str],
    prefix_cache: bool = True,
) -> list[ValueResult]:
    """δ for each request: added to the output of ``module`` (``("mlp", L)`` for ROME,
    ``("layer", L)`` for MEMIT) at the lookup token of every row, optimised as in Eq. 4.

    Requests are optimised together (one δ each; the loss is a sum over requests, so one
    backward pass serves all); a request that reaches ``early_stop_loss`` is frozen and
    its rows leave the batch, so the passes shrink as requests finish. The rows go
    through the model in a few groups of similar length (:meth:`_RowIndex.by_length`)
    rather than one batch padded to the longest row, and only from the lookup token on:
    the tokens before it are run once and kept as a key/value cache (``prefix_cache``;
    turning it off gives the same δ up to rounding, in about twice the time).
    """
    kind, layer = module
    if templates[0] != "{}":
        raise ValueError('templates[0] must be the plain prompt "{}"')
    rows, owner, lookup, kl_rows, plain_rows = [], [], [], [], []
    for i, r in enumerate(requests):
        plain_rows.append(len(rows))
        for prompt_ids, target_ids, idx in _rows(lm, r, templates, hp.fact_token):
            rows.append(prompt_ids + target_ids[:-1])
            owner.append(i)
            lookup.append((idx, len(prompt_ids), target_ids))
        kl_template = "{} is a"
        kl_ids = lm.tokenizer(kl_template.replace("{}", r.subject))["input_ids"]
        kl_idx = (
            len(kl_ids) - 1
            if hp.fact_token == "last"
            else subject_span(lm, kl_template, r.subject)[1] - 1
        )
        kl_rows.append(len(rows))
        rows.append(kl_ids)
        owner.append(i)
        lookup.append((kl_idx, len(kl_ids), None))
    dev = lm.device
    n_req = len(requests)
    look = [idx for idx, _, _ in lookup]
    if not prefix_cache:
        look = [0] * len(rows)
    batch = _batch(lm, rows)
    suffix = _batch(lm, [row[a:] for row, a in zip(rows, look)])
    suffix["position_ids"] = (
        torch.arange(suffix["input_ids"].shape[1], device=dev)[None]
        + torch.tensor(look, device=dev)[:, None]
    )
    owner_t = torch.tensor(owner, device=dev)
    # where the loss reads the logits: every target token of the rewriting rows ...
    tgt_rows, tgt_pos, tgt_ids = [], [], []
    for r, (_, n_prompt, target_ids) in enumerate(lookup):
        for j, t in enumerate(target_ids or []):
            tgt_rows.append(r)
            tgt_pos.append(n_prompt - 1 + j - look[r])
            tgt_ids.append(t)
    tgt_rows_t = torch.tensor(tgt_rows, device=dev)
    # ... and the next token after "{subject} is a"
    kl_rows_t = torch.tensor(kl_rows, device=dev)
    plain_rows_t = torch.tensor(plain_rows, device=dev)
    # each request's rows weigh equally: mean over its target tokens, then over its rows
    tokens_per_row = torch.zeros(len(rows), device=dev).index_add_(
        0, tgt_rows_t, torch.ones(len(tgt_rows), device=dev)
    )
    rows_per_req = torch.zeros(n_req, device=dev).index_add_(
        0, owner_t[tgt_rows_t], 1.0 / tokens_per_row[tgt_rows_t]
    )
    hidden = layer_input(lm, batch, layer)  # the stream below the edited layer, fixed
    if hidden is not None:
        at = (suffix["position_ids"]).clamp(max=hidden.shape[1] - 1)
        hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[2]))
    full = _RowIndex(
        suffix=suffix,
        prefix=_batch(lm, [row[:a] for row, a in zip(rows, look)]),
        hidden=hidden,
        rows=torch.arange(len(rows), device=dev),
        # the lookup token of each row, in the suffix (0 unless prefix_cache is off)
        lookup=torch.tensor([idx - a for (idx, _, _), a in zip(lookup, look)], device=dev),
        owner=owner_t,
        tgt_rows=tgt_rows_t,
        tgt_pos=torch.tensor(tgt_pos, device=dev),
        tgt_ids=torch.tensor(tgt_ids, device=dev),
        tgt_weight=1.0 / tokens_per_row[tgt_rows_t],
        kl_rows=kl_rows_t,
        kl_pos=suffix["attention_mask"][kl_rows_t].sum(1) - 1,
        requests=torch.arange(n_req, device=dev),
        cache_arg=cache_keyword(lm),
    )
    parts = full.by_length()

    d = lm.d_model
    at = lm.device_of(kind, layer)  # δ lives where the edited module's output does
    delta = torch.zeros(n_req, d, device=at, dtype=torch.float32, requires_grad=True)
    init = torch.zeros(len(rows), d, device=at)  # each row's output at the lookup token
    unembed = lm.module("unembed")
    kl_init = torch.zeros(n_req, unembed.weight.shape[0], device=dev)

    def run(part: _RowIndex, first: bool):
        """One pass over ``part`` with δ added: (target token NLLs, KL rows' log-probs)."""

        def add_delta(out):
            here = out.device
            rows = torch.arange(len(part.rows), device=here)
            where = part.lookup.to(here)
            if first:
                init[part.rows.to(init.device)] = out[rows, where].detach().float().to(init.device)
            out = out.clone()
            out[rows, where] = out[rows, where] + delta[part.owner.to(delta.device)].to(out)
            return out

        inputs = part.inputs(lm)  # (the prefix cache runs the whole model: outside the hooks)
        with Hooks() as h, replay_layers(lm, layer, part.hidden):
            h.edit_output(lm.module(kind, layer), add_delta)
            final = final_hidden(lm, detach=False, **inputs)
        final = final.to(dev)  # the final norm may sit on another device than the inputs
        logp = torch.log_softmax(unembed(final[part.tgt_rows, part.tgt_pos]).float().to(dev), -1)
        tok_nll = -logp.gather(1, part.tgt_ids[:, None])[:, 0] * part.tgt_weight
        kl_logp = torch.log_softmax(unembed(final[part.kl_rows, part.kl_pos]).float().to(dev), -1)
        return tok_nll, kl_logp

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    active = torch.ones(n_req, dtype=torch.bool, device=dev)
    histories: list[list[dict]] = [[] for _ in range(n_req)]
    v_init = None
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad(set_to_none=True)
        nll = torch.zeros(n_req, device=dev)
        kl = torch.zeros(n_req, device=dev)
        for part in parts:
            tok_nll, kl_logp = run(part, first=step == 0)
            nll = nll.index_add(0, part.owner[part.tgt_rows], tok_nll)
            if step == 0:
                kl_init[part.requests] = kl_logp.detach()
            # KL(edited ‖ original) on the next token after "{subject} is a"
            kl_now = (kl_logp.exp() * (kl_logp - kl_init[part.requests])).sum(-1)
            kl = kl.index_add(0, part.requests, kl_now)
        nll = nll / rows_per_req
        if v_init is None:
            v_init = init[plain_rows_t.to(init.device)]  # m: the output at the plain prompt
        wd = (delta.norm(dim=1) / v_init.norm(dim=1) ** 2).to(dev)
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * wd
        values = torch.stack([loss, nll, kl, wd]).detach().tolist()
        for i in torch.nonzero(active).flatten().tolist():
            histories[i].append(
                {
                    "step": step,
                    "loss": values[0][i],
                    "nll": values[1][i],
                    "kl": values[2][i],
                    "weight_decay": values[3][i],
                    "p_target": math.exp(-values[1][i]),
                }
            )
        watched = nll if hp.early_stop_term == "nll" else loss
        still = active & (watched.detach() >= hp.early_stop_loss)
        if not still.any() or step == hp.v_num_grad_steps - 1:
            break
        (loss * still).sum().backward()
        frozen = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            still_at = still.to(at)
            delta[~still_at] = frozen[~still_at]
            max_norm = hp.clamp_norm_factor * v_init.norm(dim=1)
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
            delta.mul_(scale[:, None])
        if not torch.equal(still, active):  # finished requests leave the batch
            active = still
            parts = full.select(active).by_length()
    return [
        ValueResult(delta[i].detach().clone(), v_init[i].clone(), histories[i])
        for i in range(n_req)
    ]


def compute_value(
    lm: LM, request: EditRequest, layer: int, hp: LocateHParams, templates: list[str]
) -> ValueResult:
    """v* = m + δ at the MLP output of ``layer`` for one request (Eq. 4)."""
    return optimise_delta(lm, [request], ("mlp", layer), hp, templates)[0]


# -- step 3: the update ------------------------------------------------------------------
def rank_one_update(
    W: torch.Tensor,
    C: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    k_insert: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW of ROME's Eq. 2: the change of W (out × in) with the smallest effect on the keys
    summarised by C (in × in) such that (W + ΔW) k_insert = v.

        ΔW = (v − W k_insert) (C⁻¹ k)ᵀ / ((C⁻¹ k)ᵀ k_insert),   k_insert = k by default.

    ``C=None`` uses the identity. ``k_insert ≠ k`` is the original implementation's form
    (direction from the averaged key, constraint on the plain prompt's key).
    """
    k_insert = k if k_insert is None else k_insert
    W64, k64, ki64, v64 = (x.double().to(W.device) for x in (W, k, k_insert, v))
    u = k64 if C is None else torch.linalg.solve(C.double().to(W.device), k64)
    residual = v64 - W64 @ ki64
    return torch.outer(residual, u) / (u @ ki64)


def insert_tolerance(dtype: torch.dtype) -> float:
    """The largest share of a written update the cast into ``dtype`` may lose: 16 units
    of rounding of the dtype (bf16 0.125, fp16 0.016), at least 1e-4 (float32)."""
    return max(1e-4, 16 * float(torch.finfo(dtype).eps))


@torch.no_grad()
def add_update(W: torch.Tensor, upd: torch.Tensor, keys: torch.Tensor) -> dict:
    """``W += upd`` in W's dtype and on W's device, then the check that the stored
    matrix Ŵ still writes what the float64 solve wrote at the inserted keys (ROME's
    Ŵ k* ≈ v*): ``insert_error`` = max_i ‖(Ŵ − W) k_i − ΔW k_i‖ / ‖ΔW k_i‖, the share
    of the change at key k_i (a column of ``keys``, or one key) lost to rounding, with
    ``insert_tolerance`` (:func:`insert_tolerance`) and ``insert_ok``. In bf16 a ΔW
    smaller than half a unit of rounding of W's entries vanishes: the error is then ≈ 1."""
    before = W.detach().to(torch.float64, copy=True)  # a copy also when W is float64
    W += upd.to(W)
    K = keys.to(before)
    K = K[:, None] if K.dim() == 1 else K
    written = upd.to(before) @ K
    got = (W.detach().double() - before) @ K
    lost = (got - written).norm(dim=0) / written.norm(dim=0).clamp_min(1e-300)
    err, tol = float(lost.max()), insert_tolerance(W.dtype)
    return {"insert_error": err, "insert_tolerance": tol, "insert_ok": err <= tol}


def warn_insertion(method: str, layer: int, check: dict, dtype: torch.dtype) -> None:
    """A warning when :func:`add_update`'s check failed."""
    if not check["insert_ok"]:
        warnings.warn(
            f"{method}: after the cast to {dtype} the update of layer {layer} keeps only "
            f"{1 - check['insert_error']:.0%} of its change at the inserted key (lost "
            f"{check['insert_error']:.3g} > tolerance {check['insert_tolerance']:.3g}); "
            "the edit may not hold. Compute in float32, or use larger updates.",
            RuntimeWarning,
            stacklevel=3,
        )


def key_stats(lm: LM, layer: int, hp) -> torch.Tensor | None:
    if not hp.mom2_adjustment:
        return None
    stats = second_moment(
        lm, layer, hp.mom2_corpus, hp.mom2_n_samples, max_length=hp.mom2_max_length
    )
    return stats.mom2


def whitened_keys(K: torch.Tensor, C: torch.Tensor | None, lam: float) -> torch.Tensor:
    """(λC + K Kᵀ)⁻¹ K (float64, d_in × n): the keys as MEMIT's Eq. 14 and DAMA's
    whitening use them (C the identity when None)."""
    K64 = K.double()
    d = K64.shape[0]
    C64 = torch.eye(d, dtype=torch.float64, device=K.device) if C is None else C.to(K64)
    return torch.linalg.solve(lam * C64 + K64 @ K64.T, K64)  # symmetric A: Aᵀ = A


def least_squares_update(
    K: torch.Tensor, R: torch.Tensor, C: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (MEMIT Eq. 14): K is d_in × n keys, R is d_out × n
    residuals, C the d_in × d_in second moment (identity when None)."""
    return R.double() @ whitened_keys(K, C, lam).T


def spread_update(
    lm: LM,
    requests: list[EditRequest],
    layers: Sequence[int],
    zs: torch.Tensor,
    templates: list[str],
    fact_token: str,
    stats: dict | None,
    lam: float,
    key_groups: Sequence[int] | None = None,
    checks: dict | None = None,
) -> dict[int, float]:
    """MEMIT's Alg. 1, step 2, in place: for each layer l of ``layers`` (lowest first),
    the keys at the lookup token (averaged over ``templates``, flat or by ``key_groups``:
    :func:`average_keys`; with the layers below already updated), the residual still
    missing at the top layer's output r_i = z_i − h_i (current weights) divided by the
    number of layers left, and the
    update ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (:func:`least_squares_update`), added in the model's
    dtype and checked at the layer's keys (:func:`add_update`; the checks go into
    ``checks``, per layer, when given). Returns ‖ΔW‖ per layer.
    """
    z_layer = layers[-1]
    norms = {}
    checks = {} if checks is None else checks
    for i, layer in enumerate(layers):
        keys = lookup_states(lm, requests, ("mlp_out", layer), templates, fact_token)
        K = average_keys(keys, key_groups).T  # d_mlp × n, on this layer's device
        cur = lookup_states(lm, requests, ("layer", z_layer), ["{}"], fact_token, output=True)[:, 0]
        R = (zs.to(cur.device) - cur).T / (len(layers) - i)  # d_model × n
        C = stats[layer].mom2 if stats is not None else None
        upd = least_squares_update(K, R.to(K.device), C, lam)
        W = lm.weight_out_in("mlp_out", layer)
        checks[layer] = add_update(W, upd, K)
        warn_insertion("MEMIT", layer, checks[layer], W.dtype)
        norms[layer] = float(upd.norm())
    return norms
