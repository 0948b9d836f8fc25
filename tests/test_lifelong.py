"""The lifelong-editing harness: numbers checked against hand counts on a tiny stream.

A fake editor registered here makes the counts deterministic on the real default model:
it is a lookup table that forces the target's tokens after an exact prompt (a GRACE with
radius zero), with a capacity (the oldest entry is forgotten beyond it), a list of
subjects it fails on, and a list of subjects whose neighbors it also overwrites.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from medit_lite import weights_fingerprint
from medit_lite.editing import METHODS, register
from medit_lite.evaluate import evaluate
from medit_lite.lifelong import default_locality_probes, exact_matches, lifelong
from medit_lite.metrics import encode_pair

PARAMS_PER_ENTRY = 3  # each stored edit adds a 3-element parameter


@dataclass(frozen=True)
class LookupHParams:
    capacity: int = 100
    fail: tuple[str, ...] = ()  # subjects not stored
    break_neighbors: tuple[str, ...] = ()  # subjects whose neighbor prompts also get the target

    @classmethod
    def for_model(cls, lm):
        return cls()


class Table(nn.Module):
    """Entries (token prefix, target ids); one small parameter per stored edit."""

    def __init__(self, lm):
        super().__init__()
        self.entries: list[tuple[list[int], list[int], str]] = []
        self.sizes = nn.ParameterDict()
        self._ids = None
        self._handles = [
            lm.module("embed").register_forward_pre_hook(self._remember),
            lm.model.register_forward_hook(self._force),
        ]

    def _remember(self, module, inputs):
        self._ids = inputs[0]

    @torch.no_grad()
    def _force(self, module, inputs, output):
        logits = output.logits
        for b, row in enumerate(self._ids.tolist()):
            for prompt, target, _ in self.entries:
                for j, token in enumerate(target):
                    prefix = prompt + target[:j]
                    if row[: len(prefix)] == prefix:
                        logits[b, len(prefix) - 1, token] = logits[b, len(prefix) - 1].max() + 10
        return output

    def remove(self):
        for h in self._handles:
            h.remove()


def _table(lm, create=False):
    table = getattr(lm.model, "lookup_table", None)
    if table is None and create:
        table = Table(lm)
        lm.model.lookup_table = table
    return table


@pytest.fixture(scope="module", autouse=True)
def lookup_method():
    @register("test-lookup", LookupHParams, lambda lm, hp: [])
    def apply(lm, requests, hp):
        table = _table(lm, create=True)
        entries, sizes = list(table.entries), dict(table.sizes)
        for r in requests:
            if r.subject in hp.fail:
                continue
            prompt, target = encode_pair(lm, r.text, r.target_new)
            table.entries.append((prompt, target, r.case_id))
            table.sizes[r.case_id] = nn.Parameter(torch.zeros(PARAMS_PER_ENTRY))
            for para in r.paraphrases:
                table.entries.append((*encode_pair(lm, para, r.target_new), r.case_id))
            if r.subject in hp.break_neighbors:
                for probe in r.neighborhood:
                    table.entries.append((*encode_pair(lm, probe.prompt, r.target_new), r.case_id))
            stored = list(dict.fromkeys(e[2] for e in table.entries))
            for old in stored[: max(0, len(stored) - hp.capacity)]:  # forget the oldest
                table.entries = [e for e in table.entries if e[2] != old]
                del table.sizes[old]

        def undo():
            table.entries = entries
            for key in list(table.sizes):
                if key not in sizes:
                    del table.sizes[key]
            for key, p in sizes.items():
                table.sizes[key] = p
            if not table.entries:
                table.remove()
                del lm.model.lookup_table

        return {"undo": undo}

    yield
    del METHODS["test-lookup"]


@pytest.fixture(scope="module")
def stream(facts):
    # six facts of six different relations: 3 paraphrases and 6 neighbors each
    return [facts[i] for i in (0, 6, 12, 19, 23, 29)]


def test_harness_counts_match_hand_counts(lm, stream):
    fingerprint = weights_fingerprint(lm)
    n_params = sum(p.numel() for p in lm.model.parameters())
    probes = default_locality_probes(stream)
    broken = stream[4].neighborhood
    # the hand count below needs: 36 distinct probes, none of them edited, all wrong before
    assert len(probes) == 36 and all(p in probes for p in broken)
    texts = [r.text for r in stream] + [p for r in stream for p in r.paraphrases]
    targets = [r.target_new for r in stream] + [r.target_new for r in stream for _ in range(3)]
    assert not any(exact_matches(lm, texts, targets))

    result = lifelong(
        lm,
        stream,
        "test-lookup",
        every=2,
        capacity=3,
        fail=(stream[1].subject,),
        break_neighbors=(stream[4].subject,),
    )
    # table after each edit: e0 [0] | e1 fails [0] | e2 [0,2] | e3 [0,2,3] | e4 [2,3,4] | e5 [3,4,5]
    assert result["success"] == [True, False, True, True, True, True]
    assert [c["n_edits"] for c in result["curve"]] == [2, 4, 6]
    curve = {k: [c[k] for c in result["curve"]] for k in ("SR", "ER", "GR", "locality")}
    assert curve["SR"] == pytest.approx([1 / 2, 3 / 4, 5 / 6])
    assert curve["ER"] == pytest.approx([1 / 2, 3 / 4, 3 / 6])
    assert curve["GR"] == pytest.approx([3 / 6, 9 / 12, 9 / 18])
    assert curve["locality"] == pytest.approx([1.0, 1.0, 1 - 6 / 36])
    assert [c["added_params"] for c in result["curve"]] == [3, 9, 9]
    assert all(c["changed_params"] == 0 and c["seconds_per_edit"] > 0 for c in result["curve"])
    assert result["final"] == result["curve"][-1] and result["already_correct"] == 0
    assert result["locality_probes"] == 36 and len(result["seconds"]) == 6
    # restored exactly
    assert weights_fingerprint(lm) == fingerprint
    assert sum(p.numel() for p in lm.model.parameters()) == n_params
    assert not hasattr(lm.model, "lookup_table")


def test_evaluate_sequential_uses_the_harness(lm, stream):
    out = evaluate(lm, stream[:2], "test-lookup", sequential=True, every=1, check_restore=True)
    assert out["sequential"] and [c["ER"] for c in out["lifelong"]["curve"]] == [1.0] * 2
    assert out["metrics"]["reliability"] == 1.0 and out["metrics"]["ES"] == 1.0


def test_checkpoints_at_given_counts_with_scores(lm, stream):
    seen = []

    def at_checkpoint(model, n):
        seen.append(n)
        return {"n": n}

    result = lifelong(
        lm, stream[:5], "test-lookup", checkpoints=[1, 3], at_checkpoint=at_checkpoint
    )
    # the last edit always gets a checkpoint; the callback sees each one
    assert result["checkpoints"] == [1, 3, 5] and seen == [1, 3, 5]
    assert [c["n_edits"] for c in result["curve"]] == [1, 3, 5]
    assert [c["extra"] for c in result["curve"]] == [{"n": 1}, {"n": 3}, {"n": 5}]
    # the lookup table holds every edit and its paraphrases: each prefix scores perfectly
    out = evaluate(lm, stream[:3], "test-lookup", sequential=True, checkpoints=[2],
                   score_checkpoints=True, check_restore=True)  # fmt: skip
    curve = out["lifelong"]["curve"]
    assert [c["n_edits"] for c in curve] == [2, 3]
    assert all(c["extra"]["ES"] == 1.0 and c["extra"]["PS"] == 1.0 for c in curve)
    for bad in ([0], [6], [1.5], [True]):
        with pytest.raises(ValueError, match="checkpoints"):
            lifelong(lm, stream[:5], "test-lookup", checkpoints=bad)


@pytest.mark.parametrize("method", ["ft-l", "tpatcher"])
def test_real_methods_on_a_short_stream(lm, stream, method):
    fingerprint = weights_fingerprint(lm)
    overrides = {"steps": 10} if method == "ft-l" else {}  # short: only the bookkeeping counts
    result = lifelong(lm, stream[:2], method, every=1, **overrides)
    final = result["final"]
    assert [c["n_edits"] for c in result["curve"]] == [1, 2]
    for key in ("SR", "GR", "ER", "locality"):
        assert 0.0 <= final[key] <= 1.0
    if method == "tpatcher":
        d = lm.d_model
        assert final["SR"] == 1.0 and final["ER"] == 1.0 and final["changed_params"] == 0
        assert final["added_params"] > 0 and final["added_params"] % (2 * d + 1) == 0
        assert final["added_bytes"] == 4 * final["added_params"]
    else:
        assert final["added_params"] == 0 and final["changed_params"] > 0
    assert weights_fingerprint(lm) == fingerprint


def test_bad_input_errors_and_changes_nothing(lm, stream):
    fingerprint = weights_fingerprint(lm)
    with pytest.raises(ValueError):
        lifelong(lm, [], "ft-l")
    with pytest.raises(ValueError):
        lifelong(lm, stream[:2], "ft-l", every=0)
    with pytest.raises(ValueError):
        lifelong(lm, stream[:2], "no-such-method")
    with pytest.raises(TypeError):
        lifelong(lm, stream[:2], "tpatcher", no_such_hparam=1)
    assert weights_fingerprint(lm) == fingerprint
