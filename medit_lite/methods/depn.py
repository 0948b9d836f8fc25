"""DEPN: detecting and editing privacy neurons (Wu et al., 2023).

A model that memorised a secret ("Ann Lee's phone number is 8 7 7 ...") can be made to
forget it without retraining by switching off the few FFN neurons that carry it.
DEPN has three steps, each following the authors' code (``flamewei123/DEPN``, ``src/``):

1. **Privacy-neuron detector** (§3.1, Eq. 3-4; ``1_calculate_attribution.py``): the
   integrated gradient of every FFN intermediate neuron of every layer for the
   probability of each of the secret's tokens, at the position that predicts it
   (baseline 0, ``m = 20`` Riemann steps: its ``--batch_size 20 --num_batch 1``), summed
   over the secret's digits. The attribution itself is
   :func:`medit_lite.analysis.attribution.neuron_attributions` (shared with knowledge
   neurons). DEPN, written for BERT, masks one digit at a time; in a causal LM the digit
   is predicted from the text and the digits before it, so each digit's prompt is the
   text up to that digit (teacher forcing).
2. **Privacy-neuron aggregator** (§3.2; ``convert_to_triplet_ig`` and
   ``2_filter_privacy_neurons.py``): per secret, the neurons whose score is at least
   ``threshold × max`` (0.1, the value its detector applies); a neuron's *frequency* is
   the number of secrets that keep it. The aggregator's ``mode_ratio_bag`` (0.5) keeps
   neurons kept by at least that share of secrets, but the editor
   (``3_edit_privacy_neurons.py``) ranks the per-secret sets by frequency directly
   (``Counter.most_common(erase_kn_num)``), so ``min_share`` defaults to 0 here as in the
   code that produced the paper's numbers; set it to 0.5 for the aggregator's filter.
   Ties in frequency are broken by the summed relative score (``Counter`` keeps first-seen
   order, an accident of the file layout).
3. **Privacy editor** (§3.3): the ``z`` most frequent neurons are deactivated by zeroing
   their columns of the MLP output matrix, ``W_out[:, i] = 0`` (what the code does for
   phone numbers; its ``erase_kn_num`` is 20 in ``3_run_editor.sh``, 10-200 recommended
   for phone numbers in its README). ``random=True`` is the code's ``do_random_kn``
   control: as many neurons, in the same layers, at random positions.

**A variant of this project** (off by default: ``contrast=0`` is DEPN as published):
``contrast=k`` also attributes, for each secret, ``k`` *control* secrets, the same text
with the secret's digits replaced by seeded random digits (:func:`control_requests`), and
ranks neurons by how many secrets keep them *minus* how many controls keep them, keeping
only those ahead (> 0). A neuron that scores high for every number after that prefix
carries the format ("a phone number comes next"), not this secret; zeroing it costs
perplexity on any text with numbers without erasing more of the secret.
``benchmarks/bench_privacy.py`` measures both on the same canaries.

``restore()`` brings back the columns bit for bit (``edit()`` backs up the MLP output
matrices of the searched layers). A request is ``EditRequest(prompt="{}",
subject=<text before the secret>, target_new=<secret>)``, see :func:`secret_request`;
a target that is not digits and spaces is attributed over all its tokens.
"""

from __future__ import annotations

import random as _random
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from ..analysis.attribution import neuron_attributions
from ..editing import register
from ..metrics import encode_pair, target_text
from ..models import LM
from ..requests import EditRequest


@dataclass(frozen=True)
class DEPNHParams:
    """DEPN's hyperparameters (defaults from the authors' scripts, see the module doc)."""

    layers: tuple[int, ...] = ()  # searched layers; for_model: every layer (DEPN)
    steps: int = 20  # Riemann steps of the integrated gradient
    threshold: float = 0.1  # keep a neuron for a secret when score >= threshold * max
    min_share: float = 0.0  # keep neurons kept by at least this share of the secrets
    neurons: int = 20  # z: how many neurons to deactivate (erase_kn_num)
    random: bool = False  # the control: as many random neurons in the same layers
    seed: int = 42
    #: this project's variant: control secrets per secret whose kept neurons are discounted
    #: (0 = DEPN as published; see the module docstring)
    contrast: int = 0

    @classmethod
    def for_model(cls, lm: LM) -> DEPNHParams:
        """DEPN's detector searches every layer (its loop over ``num_hidden_layers``)."""
        return cls(layers=tuple(range(lm.n_layers)))

    def validate(self, lm: LM) -> None:
        if self.steps < 1:
            raise ValueError("hyperparameter steps must be at least 1")
        if not 0 < self.threshold <= 1:
            raise ValueError("hyperparameter threshold must lie in (0, 1]")
        if not 0 <= self.min_share <= 1:
            raise ValueError("hyperparameter min_share must lie in [0, 1]")
        if self.neurons < 1:
            raise ValueError("hyperparameter neurons must be at least 1")
        if self.contrast < 0:
            raise ValueError("hyperparameter contrast must be 0 (DEPN) or a positive count")

    def searched(self, lm: LM) -> list[int]:
        return sorted(self.layers) if self.layers else list(range(lm.n_layers))


def secret_request(text: str, secret: str) -> EditRequest:
    """The request that asks DEPN to erase ``secret`` from its ``text``: the prompt is
    the text before the secret."""
    from ..applications.privacy import check_secret

    secret = check_secret(text, secret)
    prefix = text[: text.index(secret)]
    return EditRequest(prompt="{}", subject=prefix, target_new=secret)


def _digit_pairs(lm: LM, prompt: str, secret: str) -> list[tuple[str, str]] | None:
    """(prompt up to a digit, the digit) for each digit of a digit secret, when the
    tokenizer reads them exactly as in the whole text; else None."""
    if not re.fullmatch(r"[0-9 ]+", secret) or not re.search(r"[0-9]", secret):
        return None
    text = prompt + target_text(prompt, secret)
    full = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    start = len(text) - len(secret)
    pairs = []
    for i, ch in enumerate(secret):
        if not ch.isdigit():
            continue
        p = text[: start + i]
        p_ids, t_ids = encode_pair(lm, p, ch)
        ids = p_ids + t_ids
        if len(t_ids) != 1 or full[: len(ids)] != ids:
            return None
        pairs.append((p, ch))
    return pairs


def attribute(lm: LM, requests: Sequence[EditRequest], hp: DEPNHParams) -> list[torch.Tensor]:
    """Step 1: one ``[len(layers), d_mlp]`` score map per request, summed over the
    secret's digits (or over all target tokens for other targets)."""
    layers = hp.searched(lm)
    out = []
    for r in requests:
        pairs = _digit_pairs(lm, r.text, r.target_new)
        if pairs is None:
            pairs = [(r.text, r.target_new)]
        scores = neuron_attributions(
            lm, [p for p, _ in pairs], [t for _, t in pairs], layers=layers, steps=hp.steps
        )
        out.append(torch.stack(scores).sum(0))
    return out


def kept_counts(
    scores: Sequence[torch.Tensor], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron: in how many score maps it scores >= ``threshold`` × that map's max, and
    the summed relative score of those (the tie-break)."""
    count = torch.zeros_like(scores[0])
    weight = torch.zeros_like(scores[0])
    for s in scores:
        top = float(s.max())
        if top <= 0:
            continue
        kept = s >= threshold * top
        count += kept
        weight += torch.where(kept, s / top, 0.0)
    return count, weight


def aggregate(
    scores: Sequence[torch.Tensor],
    layers: Sequence[int],
    hp: DEPNHParams,
    controls: Sequence[torch.Tensor] = (),
) -> list[tuple[int, int]]:
    """Step 2: per secret the neurons with score >= threshold × that secret's max, counted
    across secrets; those kept by >= ``min_share`` of the secrets, the ``neurons`` most
    frequent first. Returns (layer, neuron) pairs.

    ``controls`` (the ``contrast`` variant): score maps of control secrets; a neuron's
    frequency among them is subtracted, and only neurons left ahead (> 0) are eligible."""
    count, weight = kept_counts(scores, hp.threshold)
    need = max(1e-9, hp.min_share * len(scores))
    eligible = count >= need
    if controls:
        control_count, _ = kept_counts(controls, hp.threshold)
        count = count - control_count * (len(scores) / len(controls))
        eligible &= count > 0
    key = torch.where(eligible, count * 1e6 + weight, -float("inf")).flatten()
    n = min(hp.neurons, int(eligible.sum()))
    idx = torch.argsort(key, descending=True, stable=True)[:n]
    d = scores[0].shape[1]
    return [(layers[int(i) // d], int(i) % d) for i in idx]


def control_requests(requests: Sequence[EditRequest], per_request: int, seed: int):
    """For each request, ``per_request`` copies whose secret's digits are replaced by seeded
    random digits (the same text, the same format, another number)."""
    rng = _random.Random(seed)
    out = []
    for r in requests:
        for _ in range(per_request):
            digits = "".join(str(rng.randrange(10)) if ch.isdigit() else ch for ch in r.target_new)
            out.append(replace(r, target_new=digits))
    return out


def random_neurons(lm: LM, chosen: Sequence[tuple[int, int]], seed: int) -> list[tuple[int, int]]:
    """DEPN's control (``do_random_kn``): for each chosen neuron a random neuron of the
    same layer (never one of the chosen), seeded."""
    rng = _random.Random(seed)
    taken = set(chosen)
    out = []
    for layer, _ in chosen:
        while True:
            cand = (layer, rng.randrange(lm.d_mlp))
            if cand not in taken:
                taken.add(cand)
                out.append(cand)
                break
    return out


def erase(lm: LM, neurons: Sequence[tuple[int, int]]) -> None:
    """Step 3: deactivate neurons by zeroing their columns of the MLP output matrix."""
    with torch.no_grad():
        for layer, i in neurons:
            lm.weight_out_in("mlp_out", layer)[:, i] = 0


@contextmanager
def erased(lm: LM, neurons: Sequence[tuple[int, int]]):
    """Within the block the neurons are deactivated; their columns come back bit for bit
    on exit (for sweeps over z that reuse one detection)."""
    saved = {(la, i): lm.weight_out_in("mlp_out", la)[:, i].clone() for la, i in neurons}
    try:
        erase(lm, neurons)
        yield
    finally:
        with torch.no_grad():
            for (layer, i), column in saved.items():
                lm.weight_out_in("mlp_out", layer)[:, i] = column


def _weights(lm: LM, hp: DEPNHParams) -> list[str]:
    return [lm.module_name("mlp_out", layer) + ".weight" for layer in hp.searched(lm)]


@register("depn", DEPNHParams, _weights)
def apply_depn(lm: LM, requests: list[EditRequest], hp: DEPNHParams) -> dict:
    """DEPN: erase memorised secrets by zeroing their privacy neurons (Wu et al., 2023)."""
    layers = hp.searched(lm)
    controls = []
    if hp.contrast:
        controls = attribute(lm, control_requests(requests, hp.contrast, hp.seed), hp)
    chosen = aggregate(attribute(lm, requests, hp), layers, hp, controls)
    if hp.random:
        chosen = random_neurons(lm, chosen, hp.seed)
    erase(lm, chosen)
    return {"neurons": chosen}
