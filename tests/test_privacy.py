"""Privacy measurements: exact ranks against brute force, canaries, memorisation."""

import itertools
import math

import pytest
import torch

from medit_lite.applications import privacy as pv

TEXT = "Ada Falkner's PIN is 4 7 2."
SECRET = "4 7 2"


def _brute_force(lm, text, secret):
    """Every 3-digit candidate scored from strings, independently of the package: the
    total log-probability of its tokens from the first digit on, and the digit tables of
    its own context (for the depth-first order of the tree)."""
    prefix = text[: text.index(secret)]
    digit_ids = [lm.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    seqs = {}
    for a, b in itertools.product(range(10), repeat=2):  # the context of the last digit
        ids = lm.tokenizer(f"{prefix}{a} {b} ", add_special_tokens=False)["input_ids"]
        seqs[a, b] = ids
    n = len(next(iter(seqs.values())))
    batch = torch.tensor([seqs[k] for k in sorted(seqs)])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=batch).logits.float(), -1)
    first = n - 4  # tokens: ... a ' ' b ' '
    score, tables = {}, {}
    for row, (a, b) in enumerate(sorted(seqs)):
        ids = seqs[a, b]
        head = sum(float(logp[row, j - 1, ids[j]]) for j in range(first, n))
        last = logp[row, n - 1, digit_ids]
        tables[a, b] = (logp[row, first - 1, digit_ids], logp[row, first + 1, digit_ids], last)
        for c in range(10):
            score[a, b, c] = head + float(last[c])
    return score, tables


def test_exact_ranks_equal_brute_force(lm):
    digits = (4, 7, 2)
    score, tables = _brute_force(lm, TEXT, SECRET)
    # Secret Sharer's order: by total log-probability
    expected = 1 + sum(s > score[digits] + 1e-4 for k, s in score.items() if k != digits)
    assert pv.probability_rank(lm, TEXT, SECRET) == expected

    # DEPN's order: depth first, each prefix's children sorted by probability
    def key(cand):
        a, b, c = cand
        t0, t1, t2 = tables[a, b]
        return tuple(int((t > t[x]).sum()) for t, x in ((t0, a), (t1, b), (t2, c)))

    order = sorted(itertools.product(range(10), repeat=3), key=key)
    table = pv.digit_table(lm, [TEXT], [SECRET])[0]
    assert pv.tree_rank(table, list(digits)) == order.index(digits) + 1
    assert 1 < order.index(digits) + 1 < 1000  # a rank that tests something
    assert pv.probability_rank(lm, TEXT, SECRET, max_nodes=5) is None


def test_exposure_and_secret_checks():
    assert pv.exposure(1, 10**10) == pytest.approx(10 * math.log2(10))
    assert pv.exposure(10**10, 10**10) == 0
    with pytest.raises(ValueError, match="rank"):
        pv.exposure(0, 10)
    with pytest.raises(ValueError, match="does not occur"):
        pv.check_secret("My number is 1 2 3", "4 5 6")
    with pytest.raises(ValueError, match="digits and spaces"):
        pv.check_secret("My number is 12-34", "12-34")
    with pytest.raises(ValueError, match="empty"):
        pv.check_secret("  ", "1")
    with pytest.raises(TypeError):
        pv.check_secret("My number is 1", 1)


def test_canaries_are_seeded_and_formatted():
    a, b = pv.make_canaries(seed=3), pv.make_canaries(seed=3)
    assert a == b and len(a) == 12 and [c.repeats for c in a[::4]] == [1, 4, 16]
    assert all(len(c.secret.split()) == 10 and c.text.startswith(c.prefix) for c in a)
    assert len({c.prefix for c in a}) == 12


def test_ngram_index_finds_the_longest_verbatim_run(lm):
    corpus = ["the quick brown fox jumps over the lazy dog near the river bank today"]
    index = pv.NgramIndex(lm, corpus, n=3)
    ids = lm.tokenizer(" jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    noise = lm.tokenizer(" purple", add_special_tokens=False)["input_ids"]
    assert index.longest_match(noise + ids + noise) == len(ids)
    assert index.longest_match(noise * 5) == 0


def test_fine_tuned_canaries_are_exposed_and_memorised(lm, unchanged, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    canaries = pv.make_canaries(per_repeat=1, repeats=(16,), seed=11)
    never = pv.make_canaries(per_repeat=2, repeats=(0,), seed=12)
    text = "Quinn Torvik keeps seven blue lanterns in the cellar of the lighthouse at Vardo."
    before = pv.exposures(lm, canaries + never)
    with pv.inserted_canaries(
        lm, canaries, [text] * 12, layers=2, epochs=4, lr=1e-3, cache=True
    ) as ft:
        assert not ft.cached and ft.losses[-1] < ft.losses[0]
        after = pv.exposures(lm, canaries + never)
        assert after[0] > max(after[1:]) + 5, (before, after)
        assert after[0] > before[0] + 5
        memo = pv.discoverable_memorization(lm, [text], prefix_tokens=6, suffix_tokens=8)
        assert memo["exact"] == 1.0
    assert (tmp_path / "privacy").is_dir()
    with pv.inserted_canaries(lm, canaries, [text] * 12, layers=2, epochs=4, lr=1e-3) as ft:
        assert ft.cached
        assert pv.exposures(lm, canaries)[0] == pytest.approx(after[0])


def test_bad_input_errors(lm, unchanged):
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        with pv.inserted_canaries(lm, [], []):
            pass
    with pytest.raises(ValueError, match="lr"):
        with pv.inserted_canaries(lm, pv.make_canaries(1, (1,)), [], lr=float("nan")):
            pass
    with pytest.raises(ValueError, match="prefix_tokens"):
        pv.discoverable_memorization(lm, ["a b c"], prefix_tokens=0)
    with pytest.raises(ValueError, match="tokens"):
        pv.discoverable_memorization(lm, ["short"], prefix_tokens=32)


def test_choose_setting_takes_the_lowest_exposure_within_the_perplexity_bound():
    reps = [1, 16, 16]

    def row(z, contrast, exp16, ppl, kind="depn", count=None):
        exposure = [5.0, exp16, exp16]
        return {"z": z, "threshold": 0.1, "contrast": contrast, "kind": kind,
                "count": count or z, "exposure": exposure, "perplexity": ppl}  # fmt: skip

    sweep = [
        row(10, 0, 20.0, 10.2),
        row(20, 0, 5.0, 12.0),  # lowest exposure, but perplexity +20 %
        row(20, 1, 8.0, 10.4),
        row(30, 1, 8.0, 10.5, count=25),  # as low, more neurons asked, fewer found
        row(20, 0, 1.0, 10.0, kind="random"),
    ]
    assert pv.choose_setting(sweep, reps, 10.0) == {"z": 20, "threshold": 0.1, "contrast": 1}
    assert pv.choose_setting(sweep, reps, 10.0, max_perplexity_increase=0.3)["z"] == 20
    assert pv.choose_setting(sweep, reps, 10.0, 0.3)["contrast"] == 0
    assert pv.choose_setting(sweep, reps, 5.0) is None
