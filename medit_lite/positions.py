"""Where the subject sits in a tokenized prompt.

Locate-then-edit methods read and write hidden states *at the subject*: causal tracing
corrupts the subject's token embeddings, ROME and MEMIT read the MLP key at the subject's
last token (Meng et al., 2022, §3; the "subject_last" fact token of their code). The
subject is found by character offsets, so a subject that starts with a space-merged BPE
token (" Tower") or sits after a prefix is located exactly, and the first occurrence of
``{}`` in a template decides which occurrence of the subject is meant.
"""

from __future__ import annotations

import torch

from .models import LM


def subject_span(lm: LM, template: str, subject: str, prefix: str = "") -> tuple[int, int]:
    """Token range ``[start, end)`` of ``subject`` in ``prefix + template.format(subject)``.

    ``template`` holds one ``{}``; the ids are those of ``lm.tokenizer(text)`` (with the
    tokenizer's special tokens, as every forward pass in this package uses them).
    """
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    if not subject:
        raise ValueError("subject must not be empty")
    head, tail = template.split("{}")
    text = prefix + head + subject + tail
    char_start = len(prefix) + len(head)
    char_end = char_start + len(subject)
    tok = lm.tokenizer
    if getattr(tok, "is_fast", False):
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        inside = [
            i
            for i, (a, b) in enumerate(offsets)
            if b > a and a < char_end and b > char_start  # token overlaps the subject
        ]
        if not inside:
            raise ValueError(f"subject {subject!r} has no tokens in {text!r}")
        return inside[0], inside[-1] + 1
    # slow tokenizers: count the tokens of the text up to the subject's start and end
    before = len(tok(text[:char_start].rstrip(" "))["input_ids"])
    upto = len(tok(text[:char_end])["input_ids"])
    if not text[:char_start].strip():
        before = len(tok("")["input_ids"])
    return before, upto


def subject_last(lm: LM, template: str, subject: str, prefix: str = "") -> int:
    """Index of the subject's last token (the "subject_last" fact token of ROME/MEMIT)."""
    return subject_span(lm, template, subject, prefix)[1] - 1


def fill(template: str, subject: str) -> str:
    """``template`` with ``subject`` put where its ``{}`` is (no other brace handling)."""
    return template.replace("{}", subject, 1)


def after_first_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Every non-padding position of each text but its first: the first position's
    prediction is never scored or generated from, and in a causal LM its hidden state is
    an outlier (the attention sink), so memories of ordinary text leave it out (as
    T-Patcher's code does with ``[:, 1:]``)."""
    keep = attention_mask.bool()
    return keep & (keep.long().cumsum(-1) > 1)
