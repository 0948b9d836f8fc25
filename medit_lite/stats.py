"""Second-moment statistics of MLP keys: C = E[k kᵀ], computed once and cached on disk.

ROME (Meng et al., 2022, Eq. 2) inserts a new key-value pair into an MLP output matrix
W while disturbing the keys the layer already stores as little as possible. Those stored
keys are summarised by their uncentred second moment

    C = K Kᵀ / n = (1/n) Σ_j k_j k_jᵀ,

the average over n token positions of real text of the key vector k (the input of the
layer's ``mlp_out`` matrix, d_mlp numbers). The papers estimate C from 100,000 Wikipedia
articles, which takes hours on large models; MEMIT (Meng et al., 2023, Eq. 14) uses the
same statistic, weighted by λ. C only has to be estimated well enough to be inverted, so
a few multiples of d_mlp key vectors already give usable edits (chapter 4 measures this).

Corpora (``corpus=``):

* ``"offline"`` (default, needs no network): the Wikipedia-style biography passages and
  the news snippets in ``../shared/data/hallucination_edit.json`` (the WikiBio data of
  SelfCheckGPT, packaged for editing by GRACE/WISE), topped up with text sampled from the
  model itself with a fixed seed when more tokens are asked for than they hold (or when
  ../shared/data is absent). Encyclopedic prose is the closest offline match to the
  papers' Wikipedia; the model's own samples are, by construction, text the model
  produces keys for. The CounterFact files are left out, so the statistic never sees
  the evaluation prompts.
* ``"sampled"``: only the model's own seeded samples.
* ``"wikitext"`` / ``"wikipedia"``: wikitext-103 or Wikipedia through ``datasets``
  (online).
* a list of strings: your own text.

Statistics are cached under ``cache_dir()/stats/<model>/<corpus>/`` keyed by model,
layer, corpus, number of key vectors and sequence length. Compute them on the unedited
model: a cached C describes the model it was computed on.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .hooks import Hooks
from .models import LM, cache_dir
from .progress import progress
from .requests import shared_data

NAMED_CORPORA = ("offline", "sampled", "wikitext", "wikipedia")
#: Openings of the seeded samples (a spread of registers: narrative, encyclopedic, news).
SAMPLE_OPENERS = (
    "The",
    "In",
    "A",
    "It",
    "He",
    "She",
    "This",
    "After",
    "According to",
    "During the",
    "There are",
    "One of the",
    "When",
    "Many",
    "Today,",
    "History",
)


@dataclass
class KeyStats:
    """C = E[k kᵀ] of one layer's MLP keys, and where it came from."""

    mom2: torch.Tensor  # [d_mlp, d_mlp], float32 on the model's device
    n: int  # number of key vectors (token positions) averaged
    layer: int
    corpus: str
    model: str
    max_length: int
    seconds: float  # time spent computing it now (0.0 when loaded from the cache)
    path: Path | None  # the cache file, if any

    @property
    def cached(self) -> bool:
        return self.seconds == 0.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def corpus_name(corpus: str | Sequence[str]) -> str:
    """The name a corpus is cached under (a hash for a list of texts)."""
    if isinstance(corpus, str):
        if corpus not in NAMED_CORPORA:
            raise ValueError(f"unknown corpus {corpus!r}; use one of {NAMED_CORPORA} or texts")
        return corpus
    texts = list(corpus)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("a custom corpus must be a non-empty list of strings")
    digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:12]
    return f"custom-{digest}"


def stats_path(lm: LM, layer: int, corpus: str, n: int, max_length: int) -> Path:
    """Cache file of one layer's statistics."""
    return (
        cache_dir()
        / "stats"
        / _slug(lm.name)
        / _slug(corpus)
        / f"layer{layer:02d}_mlp-key_mom2_n{n}_len{max_length}.pt"
    )


# -- text ----------------------------------------------------------------------------------
def shared_texts() -> list[str]:
    """Natural text from ../shared/data that is not evaluation data: the biography
    passages and news snippets of hallucination_edit.json (empty when absent)."""
    path = shared_data("hallucination_edit.json")
    if path is None:
        return []
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    texts = []
    for r in records:
        texts.append(r["prompt"])
        texts.append(r["target_new"])
        if r.get("locality_prompt"):  # a news snippet cut mid-word: the answer continues it
            texts.append(r["locality_prompt"] + r.get("locality_ground_truth", ""))
    return [t for t in texts if t.strip()]


@torch.no_grad()
def sampled_texts(
    lm: LM, n_texts: int, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 32
) -> list[str]:
    """``n_texts`` continuations sampled from the model (seeded), cached on disk."""
    path = cache_dir() / "stats" / _slug(lm.name) / f"samples_seed{seed}_len{max_new_tokens}.json"
    texts: list[str] = []
    if path.exists():
        texts = json.loads(path.read_text("utf-8"))
    if len(texts) >= n_texts:
        return texts[:n_texts]
    tok = lm.tokenizer
    side = tok.padding_side
    start = len(texts)
    bar = progress(total=n_texts - start, desc="sampling text from the model")
    try:
        tok.padding_side = "left"
        while len(texts) < n_texts:
            k = len(texts)
            prompts = [SAMPLE_OPENERS[(k + i) % len(SAMPLE_OPENERS)] for i in range(batch_size)]
            torch.manual_seed(seed * 1_000_003 + k)  # batch-wise seeding: extendable
            batch = lm.tokenize(prompts)
            out = lm.model.generate(
                **batch,
                do_sample=True,
                top_p=0.95,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
            texts += tok.batch_decode(out, skip_special_tokens=True)
            bar.update(batch_size)
    finally:
        tok.padding_side = side
        bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(texts), "utf-8")
    tmp.replace(path)
    return texts[:n_texts]


def _dataset_texts(name: str) -> Iterator[str]:
    import datasets

    if name == "wikitext":
        ds = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train", streaming=True)
    else:
        ds = datasets.load_dataset(
            "wikimedia/wikipedia", "20231101.en", split="train", streaming=True
        )
    for row in ds:
        text = row["text"].strip()
        if len(text) > 100 and not text.startswith("="):
            yield text


def corpus_texts(
    lm: LM, corpus: str | Sequence[str], n_tokens: int, max_length: int = 128
) -> Iterator[str]:
    """Texts of a corpus, enough for ``n_tokens`` positions at ``max_length`` per text."""
    if not isinstance(corpus, str):
        yield from corpus
        return
    if corpus in ("wikitext", "wikipedia"):
        yield from _dataset_texts(corpus)
        return
    given = 0
    if corpus == "offline":
        for text in shared_texts():
            given += 1
            yield text
    # top up with the model's samples; each gives at most max_length tokens
    n_samples = 16
    while True:
        texts = sampled_texts(lm, n_samples, max_new_tokens=max_length)
        yield from texts[n_samples // 2 if n_samples > 16 else 0 :]
        n_samples *= 2


# -- statistics ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last needed layer is reached."""


def _token_batches(lm: LM, texts: Iterator[str], n_tokens: int, max_length: int, batch_size: int):
    """Right-padded batches whose unmasked positions add up to exactly ``n_tokens``."""
    remaining = n_tokens
    buffer: list[str] = []
    for text in texts:
        buffer.append(text)
        if len(buffer) < batch_size:
            continue
        batch = lm.tokenizer(
            buffer, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        buffer = []
        mask = batch["attention_mask"]
        counts = mask.sum(1)
        keep = torch.cumsum(counts, 0) <= remaining
        if not keep.all():  # the batch crosses n_tokens: cut the first row that overflows
            first = int((~keep).nonzero()[0])
            room = remaining - int(counts[:first].sum())
            mask = mask[: first + 1].clone()
            mask[first, room:] = 0
            batch = {k: v[: first + 1] for k, v in batch.items()}
        used = int(mask.sum())
        remaining -= used
        yield {k: v.to(lm.device) for k, v in batch.items()}, mask.to(lm.device), used
        if remaining <= 0:
            return
    raise ValueError(f"the corpus ran out of text {remaining} tokens short of {n_tokens}")


@torch.no_grad()
def second_moments(
    lm: LM,
    layers: Sequence[int],
    corpus: str | Sequence[str] = "offline",
    n_tokens: int = 20_000,
    *,
    max_length: int = 128,
    batch_size: int = 16,
    cache: bool = True,
) -> dict[int, KeyStats]:
    """C = E[k kᵀ] of the MLP keys of each layer in ``layers`` over ``n_tokens`` positions.

    One pass over the text serves every layer, and the forward pass stops after the
    highest of them. Each layer's result is cached on its own (see :func:`stats_path`).
    """
    layers = sorted({int(l) % lm.n_layers for l in _check_layers(lm, layers)})
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer of at least 2, got {max_length!r}")
    name = corpus_name(corpus)
    out: dict[int, KeyStats] = {}
    todo = []
    for layer in layers:
        path = stats_path(lm, layer, name, n_tokens, max_length)
        if cache and path.exists():
            saved = torch.load(path, map_location=lm.device)
            out[layer] = KeyStats(
                saved["mom2"].to(lm.device), saved["n"], layer, name, lm.name, max_length, 0.0, path
            )
        else:
            todo.append(layer)
    if not todo:
        return out

    start = time.perf_counter()
    d = lm.d_mlp
    sums = {l: torch.zeros(d, d, dtype=torch.float64, device=lm.device) for l in todo}
    texts = corpus_texts(lm, corpus, n_tokens, max_length)
    bar = progress(total=n_tokens, desc=f"key statistics, layers {todo}", unit="tok")
    try:
        for batch, mask, used in _token_batches(lm, texts, n_tokens, max_length, batch_size):
            with Hooks() as h:
                boxes = {l: h.capture_input(lm.module("mlp_out", l)) for l in todo}
                h.edit_input(lm.module("mlp_out", todo[-1]), _raise_stop)
                try:
                    lm.model(**batch, use_cache=False)
                except _Stop:
                    pass
            flat = mask.bool()
            for l in todo:
                keys = boxes[l].value[flat].float()
                sums[l] += (keys.T @ keys).double()
            bar.update(used)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    for l in todo:
        mom2 = (sums[l] / n_tokens).float()
        path = stats_path(lm, l, name, n_tokens, max_length) if cache else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"mom2": mom2.cpu(), "n": n_tokens, "model": lm.name, "corpus": name}, tmp)
            tmp.replace(path)
        out[l] = KeyStats(mom2, n_tokens, l, name, lm.name, max_length, seconds, path)
    return out


def second_moment(
    lm: LM,
    layer: int,
    corpus: str | Sequence[str] = "offline",
    n_tokens: int = 20_000,
    **kwargs,
) -> KeyStats:
    """C = E[k kᵀ] of one layer's MLP keys (see :func:`second_moments`)."""
    return second_moments(lm, [layer], corpus, n_tokens, **kwargs)[int(layer) % lm.n_layers]


def _raise_stop(x):
    raise _Stop


def _check_layers(lm: LM, layers) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < lm.n_layers:
            raise ValueError(f"layer {l!r} is outside the model's {lm.n_layers} layers")
    return layers
