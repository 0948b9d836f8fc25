"""The MLP as a key-value memory, and projections of vectors into the vocabulary.

Geva et al. (2021) read a transformer MLP, ``m = W_out σ(W_in x)``, as a memory: the
hidden activation ``k = σ(W_in x)`` (d_mlp numbers) says how strongly each of the d_mlp
*keys* (rows of W_in) matches the input, and the output is the sum of the *values*
(columns of W_out) weighted by those coefficients, ``m = Σ_i k_i W_out[:, i]``. ROME
(Meng et al., 2022, §3) takes the whole vector k at the subject's last token as the key
of a fact and ``m`` as its value. Geva et al. (2022) project value vectors into the
vocabulary with the unembedding to see which tokens they promote; applying the final
norm first is the "logit lens".

Here the *key* is the input of the adapter's ``mlp_out`` module (for Llama-style gated
MLPs, ``act(gate x) * (up x)``), the *value* the output of the ``mlp`` module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Hooks
from ..models import LM
from ..positions import subject_span


@dataclass
class KeyValue:
    """The MLP key and value of one layer at one token of a prompt."""

    prompt: str
    layer: int
    position: int
    token: str
    key: torch.Tensor  # [d_mlp]
    value: torch.Tensor  # [d_model]


@torch.no_grad()
def mlp_key_value(
    lm: LM, prompt: str, layer: int, subject: str | None = None, position: int | None = None
) -> KeyValue:
    """Key and value of ``layer``'s MLP at the subject's last token (or at ``position``).

    ``prompt`` is a full prompt or a template with ``{}`` (then ``subject`` fills it).
    Without ``subject`` and ``position``, the last token is used.
    """
    if subject is not None:
        template = prompt if "{}" in prompt else prompt.replace(subject, "{}", 1)
        if "{}" not in template:
            raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
        text = template.replace("{}", subject, 1)
        default = subject_span(lm, template, subject)[1] - 1
    else:
        text = prompt
        default = -1
    batch = lm.tokenize([text])
    n = batch["input_ids"].shape[1]
    pos = default if position is None else position
    if not -n <= pos < n:
        raise ValueError(f"position {pos} is outside the prompt's {n} tokens")
    pos %= n
    with Hooks() as h:
        key = h.capture_input(lm.module("mlp_out", layer))
        value = h.capture_output(lm.module("mlp", layer))
        lm.model(**batch, use_cache=False, logits_to_keep=1)
    token = lm.tokenizer.decode([int(batch["input_ids"][0, pos])])
    return KeyValue(text, layer % lm.n_layers, pos, token, key.value[0, pos], value.value[0, pos])


@torch.no_grad()
def logit_lens(
    lm: LM, vector: torch.Tensor, k: int = 10, norm: bool = True
) -> list[tuple[str, float]]:
    """The ``k`` tokens a d_model vector promotes most: top entries of
    ``unembed(final_norm(v))`` (``norm=False``: of ``unembed(v)``, as Geva et al. 2022)."""
    if vector.shape[-1] != lm.d_model:
        raise ValueError(f"vector must have {lm.d_model} entries, got {tuple(vector.shape)}")
    v = vector.to(device=lm.device, dtype=lm.dtype).reshape(1, -1)
    if norm:
        v = lm.module("final_norm")(v)
    logits = lm.module("unembed")(v)[0].float()
    top = logits.topk(k)
    return [(lm.tokenizer.decode([i]), float(s)) for s, i in zip(top.values, top.indices.tolist())]


@torch.no_grad()
def top_memories(lm: LM, key: torch.Tensor, layer: int, k: int = 5, tokens: int = 5) -> list[dict]:
    """The ``k`` memory slots with the largest contribution |k_i|·‖W_out[:, i]‖ to the
    MLP output, each with its coefficient and the tokens its value vector promotes."""
    w = lm.weight_out_in("mlp_out", layer)
    if key.shape[-1] != w.shape[1]:
        raise ValueError(f"key must have {w.shape[1]} entries, got {tuple(key.shape)}")
    contrib = key.abs().to(w.device) * w.norm(dim=0)
    out = []
    for i in contrib.topk(k).indices.tolist():
        out.append(
            {
                "slot": i,
                "coefficient": float(key[i]),
                "promotes": [t for t, _ in logit_lens(lm, w[:, i] * key[i].sign(), tokens, False)],
            }
        )
    return out
