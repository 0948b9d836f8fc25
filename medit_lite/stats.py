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

Statistics are cached under ``cache_dir()/stats/`` (:func:`stats_path`), keyed by what
they depend on (:func:`stats_key`): a fingerprint of the *weights* that feed the layer's
keys (the embeddings, the layers below and the layer itself up to its MLP, not the name:
every wrapped model is called "custom"), their dtype, the tokenizer, the layer, the
corpus *contents* (the offline corpus differs with and without ../shared, and its
samples come from the model), the number of key vectors and the sequence length. A
cached C thus always describes the weights it was computed on; when any of these
change, the key changes and C is computed again. A stream of edits that changes the
weights below an edited layer (sequential MEMIT) would then recompute C at every edit;
inside :func:`reuse_statistics` (which :func:`medit_lite.lifelong.lifelong` enters) each
layer keeps the key it was first looked up under, as the reference code keeps the
unedited model's C in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

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
    key: dict | None = None  # what it was computed from (:func:`stats_key`)

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


# -- cache keys -------------------------------------------------------------------------
_DIGESTS = WeakIdKeyDictionary()  # tensor or tokenizer -> (stamp, digest)
_TOKEN_COUNTS: dict[tuple, int] = {}
_PINNED: list[dict] = []  # stack of reuse_statistics() blocks: pin -> key


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes, remembered per tensor object until it
    changes (every in-place change bumps a tensor's version counter)."""
    stamp = (t._version, t.data_ptr(), tuple(t.shape), t.dtype)
    memo = _DIGESTS.get(t)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    _DIGESTS[t] = (stamp, h.hexdigest())
    return _DIGESTS[t][1]


def weights_digest(params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hash of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, p in params:
        h.update(name.encode())
        h.update(tensor_digest(p).encode())
    return h.hexdigest()[:16]


def feeding_parameters(lm: LM, layer: int) -> list[tuple[str, torch.Tensor]]:
    """The parameters the keys of ``layer`` (the input of its ``mlp_out``) depend on:
    everything below the final norm and unembedding except the layers above ``layer``
    and ``layer``'s own ``mlp_out`` (so ROME's edits of that matrix keep its C)."""
    stack = lm.adapter.layers + "."
    skip = tuple(
        lm.module_name(*k) + "." for k in (("mlp_out", layer), ("final_norm",), ("unembed",))
    )
    out = []
    for name, p in lm.model.named_parameters():
        if name.startswith(stack) and int(name[len(stack) :].split(".")[0]) > layer:
            continue
        if not name.startswith(skip):
            out.append((name, p))
    return out


def layer_fingerprint(lm: LM, layer: int) -> str:
    """Fingerprint of the weights that feed ``layer``'s MLP keys (:func:`feeding_parameters`).

    The first call hashes every byte (0.8 s for layer 4 of the default model; a few
    seconds per GB on larger ones); later calls rehash only the tensors that changed."""
    return weights_digest(feeding_parameters(lm, layer))


def model_fingerprint(lm: LM) -> str:
    """Fingerprint of all of the model's weights (what its sampled text depends on)."""
    return weights_digest(lm.model.named_parameters())


def tokenizer_digest(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens (remembered per object)."""
    memo = _DIGESTS.get(tokenizer)
    if memo is None:
        blob = json.dumps([sorted(tokenizer.get_vocab().items()), str(tokenizer.bos_token)])
        memo = (None, hashlib.sha256(blob.encode()).hexdigest()[:12])
        _DIGESTS[tokenizer] = memo
    return memo[1]


def _texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:12]


def _n_tokens(lm: LM, texts: list[str], max_length: int) -> int:
    """Key vectors the texts give at ``max_length`` tokens per text (remembered)."""
    memo = (tokenizer_digest(lm.tokenizer), _texts_digest(texts), max_length)
    if memo not in _TOKEN_COUNTS:
        ids = lm.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        _TOKEN_COUNTS[memo] = sum(map(len, ids))
    return _TOKEN_COUNTS[memo]


def corpus_key(lm: LM, corpus: str | Sequence[str], n_tokens: int, max_length: int) -> str:
    """What the text of ``corpus`` depends on, as a name: a list's own hash; for
    ``"offline"`` the hash of the ../shared texts (``noshared`` without them), plus,
    when they hold fewer than ``n_tokens`` key vectors, the model's fingerprint (the top-up
    is sampled from the model); for ``"sampled"`` the model's fingerprint."""
    name = corpus_name(corpus)
    if name not in ("offline", "sampled"):
        return name  # custom-<hash>, or a fixed online dataset
    parts = [name]
    if name == "offline":
        texts = shared_texts()
        parts.append(_texts_digest(texts) if texts else "noshared")
        if texts and _n_tokens(lm, texts, max_length) >= n_tokens:
            return "-".join(parts)
    return "-".join(parts + ["samples" + model_fingerprint(lm)])


def stats_key(lm: LM, layer: int, corpus: str | Sequence[str], n: int, max_length: int) -> dict:
    """Everything one layer's C depends on (the cache file is named after it).

    Inside :func:`reuse_statistics` a layer keeps the key it was first looked up under."""
    pin = (id(lm.model), layer, corpus_name(corpus), n, max_length)
    if _PINNED and pin in _PINNED[-1]:
        return _PINNED[-1][pin]
    key = {
        "weights": layer_fingerprint(lm, layer),
        "dtype": str(lm.module("mlp_out", layer).weight.dtype).removeprefix("torch."),
        "tokenizer": tokenizer_digest(lm.tokenizer),
        "layer": layer,
        "corpus": corpus_key(lm, corpus, n, max_length),
        "n": n,
        "max_length": max_length,
    }
    if _PINNED:
        _PINNED[-1][pin] = key
    return key


def stats_path(lm: LM, layer: int, corpus: str | Sequence[str], n: int, max_length: int) -> Path:
    """Cache file of one layer's statistics, named after its :func:`stats_key`."""
    return _key_path(lm, stats_key(lm, layer, corpus, n, max_length))


def _key_path(lm: LM, key: dict) -> Path:
    model = f"{_slug(lm.name)}-w{key['weights']}-t{key['tokenizer']}"
    name = (
        f"layer{key['layer']:02d}_mlp-key_mom2_{key['dtype']}_n{key['n']}_len{key['max_length']}.pt"
    )
    return cache_dir() / "stats" / model / _slug(key["corpus"]) / name


@contextmanager
def reuse_statistics():
    """Within the block, each layer's statistics keep the cache key they were first
    looked up under, also after edits change the weights that feed the layer.

    This is the reference code's behaviour in a stream of edits (kmeng01/memit keeps the
    first C of each layer in memory: the unedited model's). The C itself is still
    computed on the weights its key names, so the disk cache stays truthful. Nested
    blocks share the outermost block's keys."""
    _PINNED.append(_PINNED[-1] if _PINNED else {})
    try:
        yield
    finally:
        _PINNED.pop()


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
    folder = (
        cache_dir()
        / "stats"
        / "samples"
        / (f"{_slug(lm.name)}-{model_fingerprint(lm)}-t{tokenizer_digest(lm.tokenizer)}")
    )
    path = folder / f"samples_seed{seed}_len{max_new_tokens}.json"
    texts: list[str] = []
    if path.exists():
        texts = json.loads(path.read_text("utf-8"))
    if len(texts) >= n_texts:
        return texts[:n_texts]
    tok = lm.tokenizer
    start = len(texts)
    bar = progress(total=n_texts - start, desc="sampling text from the model")
    try:
        while len(texts) < n_texts:
            k = len(texts)
            prompts = [SAMPLE_OPENERS[(k + i) % len(SAMPLE_OPENERS)] for i in range(batch_size)]
            torch.manual_seed(seed * 1_000_003 + k)  # batch-wise seeding: extendable
            batch = lm.tokenize(prompts, padding_side="left")
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
        bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
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
    if corpus == "offline":
        texts = shared_texts()
        yield from texts
        if texts and _n_tokens(lm, texts, max_length) >= n_tokens:
            return  # enough: sample nothing (the cache key says so too, corpus_key)
    # top up with the model's samples; each gives at most max_length tokens
    n_samples = 16
    new_tokens = min(max_length, lm.max_length - 8)  # the opener's tokens fit too
    while True:
        texts = sampled_texts(lm, n_samples, max_new_tokens=new_tokens)
        yield from texts[n_samples // 2 if n_samples > 16 else 0 :]
        n_samples *= 2


# -- statistics ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last needed layer is reached."""


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of ``size`` texts, the last one shorter (a corpus smaller than one batch
    makes one short batch)."""
    buffer: list[str] = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def _token_batches(lm: LM, texts: Iterator[str], n_tokens: int, max_length: int, batch_size: int):
    """Right-padded batches whose unmasked positions add up to exactly ``n_tokens``."""
    remaining = n_tokens
    for chunk in _chunks(texts, batch_size):
        batch = lm.tokenizer(
            chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
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
        yield {k: v.to(lm.device) for k, v in batch.items()}, mask, used
        if remaining <= 0:
            return
    raise ValueError(f"the corpus ran out of text {remaining} tokens short of {n_tokens}")


def check_n_tokens(lm: LM, n_tokens, allow_singular: bool = False) -> None:
    """A ValueError unless ``n_tokens`` is an integer of at least d_mlp: C = K Kᵀ / n of
    fewer key vectors than d_mlp has rank below d_mlp, and ROME and MEMIT invert it
    (``allow_singular`` accepts any positive count)."""
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if n_tokens < lm.d_mlp and not allow_singular:
        raise ValueError(
            f"{n_tokens} key vectors give a singular C (rank ≤ {n_tokens} < d_mlp = "
            f"{lm.d_mlp}): use at least {lm.d_mlp}, better a few multiples of it"
        )


def _load(lm: LM, layer: int, path: Path, key: dict, name: str, max_length: int):
    """The cached statistics at ``path`` if they were saved under ``key`` (else None)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu")
    if saved.get("key") != key:
        return None
    mom2 = saved["mom2"].to(lm.device_of("mlp_out", layer))
    return KeyStats(mom2, saved["n"], layer, name, lm.name, max_length, 0.0, path, key)


def _save(path: Path, mom2: torch.Tensor, key: dict, name: str, model: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    payload = {"mom2": mom2.cpu(), "n": key["n"], "model": model, "corpus": name, "key": key}
    torch.save(payload, tmp)
    tmp.replace(path)


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
    allow_singular: bool = False,
) -> dict[int, KeyStats]:
    """C = E[k kᵀ] of the MLP keys of each layer in ``layers`` over ``n_tokens`` positions.

    One pass over the text serves every layer, and the forward pass stops after the
    highest of them. Each layer's result is cached on its own (see :func:`stats_path`).
    ``n_tokens`` below d_mlp (a singular C) is an error unless ``allow_singular``.
    """
    layers = sorted({int(l) % lm.n_layers for l in _check_layers(lm, layers)})
    name = corpus_name(corpus)
    check_n_tokens(lm, n_tokens, allow_singular)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer of at least 2, got {max_length!r}")
    out: dict[int, KeyStats] = {}
    todo, keys = [], {}
    for layer in layers:
        keys[layer] = stats_key(lm, layer, corpus, n_tokens, max_length)
        path = _key_path(lm, keys[layer])
        found = _load(lm, layer, path, keys[layer], name, max_length) if cache else None
        if found is not None:
            out[layer] = found
        else:
            todo.append(layer)
    if not todo:
        return out

    start = time.perf_counter()
    d = lm.d_mlp
    devices = {l: lm.device_of("mlp_out", l) for l in todo}
    sums = {l: torch.zeros(d, d, dtype=torch.float64, device=devices[l]) for l in todo}
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
            for l in todo:
                value = boxes[l].value
                keys_l = value[mask.bool().to(value.device)].float()
                sums[l] += (keys_l.T @ keys_l).double().to(devices[l])
            bar.update(used)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    for l in todo:
        mom2 = (sums[l] / n_tokens).float()
        path = _key_path(lm, keys[l]) if cache else None
        if path is not None:
            _save(path, mom2, keys[l], name, lm.name)
        out[l] = KeyStats(mom2, n_tokens, l, name, lm.name, max_length, seconds, path, keys[l])
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
