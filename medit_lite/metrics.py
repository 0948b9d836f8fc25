"""How well an edit worked: two metric families, named apart.

**CounterFact family** (Meng et al., 2022, ROME §4.2 and Table 4). Each compares the
probabilities of the new and the true object. For a prompt ``p`` and a target ``o`` of
``T`` tokens, ``P(o|p) = exp(-(1/T) Σ_t log p(o_t | p, o_<t))`` (the token-averaged NLL,
as in ROME's evaluation code):

* ES, efficacy score: ``P(o*|p) > P(o^c|p)`` on the edit prompt; EM, the magnitude
  ``P(o*|p) - P(o^c|p)``.
* PS / PM: the same on paraphrases of the prompt (generality).
* NS / NM: on neighborhood prompts about other subjects, the true answer must keep
  beating the new object: ``P(o^c) > P(o*)``, magnitude ``P(o^c) - P(o*)`` (locality).
* GE, generation entropy: a weighted mean of bigram and trigram entropies of text
  generated from the subject (weights 2/3, 4/3, in bits); low means repetitive text.
  Two protocols, named apart (:data:`GE_PROTOCOLS`): ``"rome"``, the paper's (ROME's
  ``test_generation``: every generation prompt, top-5 sampling to 100 tokens in all,
  seeded here, the prompt's text included, case kept; :func:`rome_generation_entropy`),
  which the benchmark tables use, and ``"greedy"``, a cheap one for pages (greedy
  continuations of a few prompts, lower-cased words; :func:`generation_entropy`). Their
  values are not comparable with each other.

**EasyEdit family** (Wang et al., 2023; Zhang et al., 2024). Teacher-forced token
accuracy: the share of target tokens that are the argmax prediction given the prompt and
the gold previous tokens.

* reliability: on the edit prompt with ``target_new``;
* generalization: on paraphrases with ``target_new``;
* locality: on neighborhood prompts, the share of answer positions where the edited
  model predicts the same token as the unedited one (so it needs a reference taken
  before the edit, :func:`locality_reference`);
* portability: on portability questions with their answers.

Every score is batched over all prompts of all requests; values are fractions in [0, 1].
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .context_routing import prompt_lengths, router_of
from .models import LM
from .replay import final_hidden
from .requests import EditRequest

METRIC_KEYS = (
    "ES",
    "PS",
    "NS",
    "EM",
    "PM",
    "NM",
    "GE",
    "reliability",
    "generalization",
    "locality",
    "portability",
)


def target_text(prompt: str, target: str) -> str:
    """The text appended to ``prompt`` when scoring ``target`` (a space unless present)."""
    if prompt.endswith((" ", "\n")) or target.startswith(" "):
        return target
    return " " + target


def encode_pair(lm: LM, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its target continuation, tokenized separately."""
    tok = lm.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(target_text(prompt, target), add_special_tokens=False)["input_ids"]
    return prompt_ids, target_ids


@dataclass
class TokenScores:
    """Per-token results of scoring one target after one prompt."""

    logprobs: torch.Tensor  # log p(o_t | p, o_<t), shape [T]
    predicted: torch.Tensor  # argmax token at each target position, [T]
    target_ids: torch.Tensor  # [T]

    @property
    def mean_nll(self) -> float:
        return float(-self.logprobs.mean())

    @property
    def prob(self) -> float:
        """Token-averaged probability ``exp(-mean NLL)``."""
        return math.exp(-self.mean_nll)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.target_ids).float().mean())


def pair_logits(lm: LM, pairs: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Logits at the positions that predict each target token, one [T, V] tensor a pair.

    The batch is right-padded; gradients flow if enabled by the caller. Without a context
    router or a hook on the model's output, the vocabulary projection runs only at those
    positions (the final norm's output gathered, then ``lm.module("unembed")``): on a
    prompt of P tokens and a target of T, T rows of the [d_model, V] product instead of
    P + T. A routed model (SERAC, NL patches, IKE) mixes whole logit rows, and a hook may
    change them, so those get the model's full forward.
    """
    lengths = [len(p) + len(t) for p, t in pairs]
    pad = lm.tokenizer.pad_token_id
    width = max(lengths)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        ids[row, : lengths[row]] = torch.tensor(p + t)
        mask[row, : lengths[row]] = 1
    rows = torch.cat([torch.full((len(t),), i) for i, (_, t) in enumerate(pairs)])
    cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(t) - 1) for p, t in pairs])
    inputs = {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
    if _logits_of_the_modules_alone(lm):
        normed = final_hidden(lm, detach=False, use_cache=False, **inputs)
        flat = lm.module("unembed")(normed[rows.to(normed.device), cols.to(normed.device)])
    else:
        with prompt_lengths([len(p) for p, _ in pairs]):  # routes decide on prompts only
            logits = lm.model(**inputs).logits
        flat = logits[rows.to(logits.device), cols.to(logits.device)]
    return list(flat.split([len(t) for _, t in pairs]))


def _logits_of_the_modules_alone(lm: LM) -> bool:
    """True where the final norm and the unembedding give the model's logits: no context
    router and no hook on the whole model's output (which may change them)."""
    model = lm.model
    return router_of(lm) is None and not model._forward_hooks and "forward" not in vars(model)


@torch.no_grad()
def score_targets(
    lm: LM, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> list[TokenScores]:
    """Teacher-forced log-probabilities and argmax predictions of each target token."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must have the same length")
    pairs = [encode_pair(lm, p, t) for p, t in zip(prompts, targets)]
    out: list[TokenScores] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        for (_, t), logits in zip(chunk, pair_logits(lm, chunk)):
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(t, device=logp.device)
            out.append(
                TokenScores(
                    logprobs=logp.gather(1, target[:, None])[:, 0].cpu(),
                    predicted=logp.argmax(-1).cpu(),
                    target_ids=target.cpu(),
                )
            )
    return out


# -- the CounterFact family ------------------------------------------------------------
def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3), lowercase: bool = True) -> float:
    """Weighted mean of n-gram entropies (bits) of a text's words, as ROME's GE
    (``compute_n_gram_entropy``: words and punctuation marks as tokens; ROME's code uses
    NLTK's ``word_tokenize``, which also splits contractions, and keeps case)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower() if lowercase else text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


GE_PROTOCOLS = ("greedy", "rome")


def generation_entropy(lm: LM, prompts: Sequence[str], max_new_tokens: int = 40) -> float:
    """GE, the cheap protocol (``"greedy"``): mean n-gram entropy of greedy continuations
    of ``prompts`` (prompt included, words lower-cased). Not ROME's protocol:
    :func:`rome_generation_entropy` is."""
    texts = lm.generate(list(prompts), max_new_tokens=max_new_tokens)
    return sum(ngram_entropy(p + t) for p, t in zip(prompts, texts)) / len(prompts)


@torch.no_grad()
def sampled_generations(
    lm: LM, prompts: Sequence[str], max_out_len: int = 100, top_k: int = 5, seed: int = 0
) -> list[str]:
    """ROME's ``generate_fast``: per prompt, top-``top_k`` sampling (temperature 1) until
    the sequence, prompt included, holds ``max_out_len`` tokens (an end-of-text token does
    not stop it); the whole text decoded without special tokens, NFKD-normalised, blank
    lines joined. Seeded (the global RNG is left as it was), so an
    edited and an unedited model are compared on the same random draws."""
    tok = lm.tokenizer
    batch = lm.tokenize(list(prompts), padding_side="left")
    lengths = batch["attention_mask"].sum(1).tolist()
    new = max(1, max_out_len - min(lengths))
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = lm.model.generate(
            **batch, max_new_tokens=new, do_sample=True, top_k=top_k, top_p=1.0,
            temperature=1.0, pad_token_id=tok.pad_token_id,
            eos_token_id=None,  # generate_fast samples on past an end-of-text token
        )  # fmt: skip
    width = batch["input_ids"].shape[1]
    texts = []
    for row, n in zip(out, lengths):
        ids = row[width - n : width + max(0, max_out_len - n)]  # the prompt, then its new tokens
        text = unicodedata.normalize("NFKD", tok.decode(ids, skip_special_tokens=True))
        texts.append(text.replace("\n\n", " "))
    return texts


def rome_generation_entropy(
    lm: LM, prompts: Sequence[str], max_out_len: int = 100, top_k: int = 5, seed: int = 0
) -> float:
    """GE as ROME's evaluation computes it (``test_generation``, ``n_gram_entropy``): the
    arithmetic mean over ``prompts`` of the n-gram entropy of each sampled text
    (:func:`sampled_generations`), case kept."""
    texts = sampled_generations(lm, prompts, max_out_len, top_k, seed)
    return sum(ngram_entropy(t, lowercase=False) for t in texts) / len(texts)


# -- the plan: every (prompt, target) pair that any metric of any request needs --------
def _plan(requests: Sequence[EditRequest]) -> list[tuple[int, str, str, str]]:
    """(request index, role, prompt, target) for every pair that a metric needs."""
    plan = []
    for i, r in enumerate(requests):
        for role, prompt in [("edit", r.text)] + [("para", p) for p in r.paraphrases]:
            plan.append((i, role + "_new", prompt, r.target_new))
            if r.target_true is not None:
                plan.append((i, role + "_true", prompt, r.target_true))
        for probe in r.neighborhood:
            plan.append((i, "nb_answer", probe.prompt, probe.answer))
            plan.append((i, "nb_new", probe.prompt, r.target_new))
        for probe in r.portability:
            plan.append((i, "port", probe.prompt, probe.answer))
    return plan


def locality_reference(lm: LM, requests: Sequence[EditRequest]) -> list[list[torch.Tensor]]:
    """Argmax predictions of the *unedited* model on each neighborhood answer."""
    prompts = [p.prompt for r in requests for p in r.neighborhood]
    answers = [p.answer for r in requests for p in r.neighborhood]
    scores = iter(score_targets(lm, prompts, answers)) if prompts else iter(())
    return [[next(scores).predicted for _ in r.neighborhood] for r in requests]


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def score_requests(
    lm: LM,
    requests: Sequence[EditRequest],
    reference: list[list[torch.Tensor]] | None = None,
    generation_tokens: int = 0,
    generation_prompts: int = 2,
    generation_protocol: str = "greedy",
) -> list[dict[str, float]]:
    """Both metric families for each request; a key is absent where it cannot be computed.

    ``reference`` (from :func:`locality_reference` on the unedited model) enables the
    EasyEdit locality; ``generation_tokens > 0`` enables GE: with the ``"greedy"``
    protocol on the first ``generation_prompts`` generation prompts of each request,
    ``generation_tokens`` new tokens each; with ``"rome"`` (the paper's) on all of them,
    sampled to ``generation_tokens`` tokens in all (100 in the paper), seeded by the
    request's prompt.
    """
    if generation_protocol not in GE_PROTOCOLS:
        raise ValueError(f"generation_protocol must be one of {GE_PROTOCOLS}")
    plan = _plan(requests)
    scores = score_targets(lm, [p[2] for p in plan], [p[3] for p in plan])
    table: dict[tuple[int, str], list[TokenScores]] = {}
    for (i, role, _, _), s in zip(plan, scores):
        table.setdefault((i, role), []).append(s)
    rows = []
    for i, r in enumerate(requests):
        get = lambda role, i=i: table.get((i, role), [])  # noqa: E731
        row: dict[str, float] = {}
        if r.target_true is not None:
            edit = list(zip(get("edit_new"), get("edit_true")))
            row["ES"] = _mean(n.mean_nll < t.mean_nll for n, t in edit)
            row["EM"] = _mean(n.prob - t.prob for n, t in edit)
            para = list(zip(get("para_new"), get("para_true")))
            if para:
                row["PS"] = _mean(n.mean_nll < t.mean_nll for n, t in para)
                row["PM"] = _mean(n.prob - t.prob for n, t in para)
        nb = list(zip(get("nb_answer"), get("nb_new")))
        if nb:
            row["NS"] = _mean(a.mean_nll < n.mean_nll for a, n in nb)
            row["NM"] = _mean(a.prob - n.prob for a, n in nb)
        if generation_tokens and r.generation_prompts:
            if generation_protocol == "rome":
                seed = zlib.crc32(r.text.encode())  # the same draws before and after an edit
                row["GE"] = rome_generation_entropy(
                    lm, r.generation_prompts, generation_tokens, seed=seed
                )
            else:
                prompts = r.generation_prompts[:generation_prompts]
                row["GE"] = generation_entropy(lm, prompts, generation_tokens)
        row["reliability"] = _mean(s.accuracy for s in get("edit_new"))
        if r.paraphrases:
            row["generalization"] = _mean(s.accuracy for s in get("para_new"))
        if reference is not None and r.neighborhood:
            row["locality"] = _mean(
                float((a.predicted == ref).float().mean())
                for a, ref in zip(get("nb_answer"), reference[i])
            )
        if r.portability:
            row["portability"] = _mean(s.accuracy for s in get("port"))
        rows.append({k: float(v) for k, v in row.items()})
    return rows


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the requests that have it, in ``METRIC_KEYS`` order."""
    return {
        k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows)
        for k in METRIC_KEYS
        if any(k in r for r in rows)
    }


# -- scores on plain numbers (also the reference answers of chapter 1's exercises) -----
def efficacy_score(p_new: Sequence[float], p_true: Sequence[float]) -> float:
    """ES over a set of edits: share where the new object beats the true one."""
    if len(p_new) != len(p_true) or not len(p_new):
        raise ValueError("p_new and p_true must be non-empty and of equal length")
    return sum(n > t for n, t in zip(p_new, p_true)) / len(p_new)


def neighborhood_score(p_answer: Sequence[float], p_new: Sequence[float]) -> float:
    """NS over neighborhood prompts: share where the true answer still beats the new object."""
    if len(p_answer) != len(p_new) or not len(p_answer):
        raise ValueError("p_answer and p_new must be non-empty and of equal length")
    return sum(a > n for a, n in zip(p_answer, p_new)) / len(p_answer)
