"""Bias metrics of chapter 5.2: DAMA's slopes, WinoBias with DAMA's protocol, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shared_or_skip

from medit_lite.applications import bias


def test_regression_recovers_planted_slopes():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(200, generator=g) * 2 - 1
    f = torch.rand(200, generator=g) * 2 - 1
    y = 0.3 * s - 0.2 * f + 0.05
    fit = bias.bias_regression(s.tolist(), f.tolist(), y.tolist())
    assert fit["a_s"] == pytest.approx(0.3, abs=1e-6)
    assert fit["a_f"] == pytest.approx(-0.2, abs=1e-6)
    assert fit["b"] == pytest.approx(0.05, abs=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    # a model that always says "he" the same amount has no slope at all
    const = bias.bias_regression(s.tolist(), f.tolist(), [0.7] * 200)
    assert const["a_s"] == pytest.approx(0.0, abs=1e-12)
    assert const["slope_f"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        bias.bias_regression([0.1], [0.2], [0.3])


def test_parse_winobias_line_uses_dama_prompt():
    ex = bias.parse_winobias_line(
        "2 The developer argued with [the designer] because [her] idea cannot be implemented."
    )
    assert ex["profession"] == "designer"
    assert ex["gender"] == "f"
    assert ex["prompt"] == (
        "The developer argued with the designer because her idea cannot be implemented. "
        "'Her' refers to the"
    )
    with pytest.raises(ValueError, match="bracketed"):
        bias.parse_winobias_line("3 no brackets here")


def _ex(profession):
    return {"profession": profession, "prompt": f"x {profession}", "gender": "m"}


def test_winobias_gap_of_a_model_that_always_says_developer(lm, monkeypatch):
    """Hand-made sets scored by a stand-in model whose top token is always " developer":
    pro 2/4 correct, anti 1/4, so the gap is 0.25 (type 1: 1/2 − 1/2, type 2: 1/2 − 0)."""
    dev = lm.tokenizer(" developer", add_special_tokens=False)["input_ids"][0]
    vocab = lm.module("unembed").weight.shape[0]

    def always_developer(lm_, prompts, batch_size=64):
        p = torch.zeros(len(prompts), vocab)
        p[:, dev] = 1.0
        return p

    monkeypatch.setattr(bias, "next_token_probs", always_developer)
    data = {
        ("pro", 1): [_ex("developer"), _ex("nurse")],
        ("pro", 2): [_ex("developer"), _ex("clerk")],
        ("anti", 1): [_ex("developer"), _ex("cook")],
        ("anti", 2): [_ex("baker"), _ex("nurse")],
    }
    out = bias.winobias_scores(lm, data)
    assert out["pro"] == pytest.approx(0.5)
    assert out["anti"] == pytest.approx(0.25)
    assert out["gap"] == pytest.approx(0.25)
    assert out["type1"]["gap"] == pytest.approx(0.0)
    assert out["type2"]["gap"] == pytest.approx(0.5)
    # the halves the benchmark keeps apart (tuning / held out), scored from one pass
    per = bias.winobias_per_set(lm, data)
    first = bias.winobias_summary({k: v[:1] for k, v in per.items()})
    second = bias.winobias_summary({k: v[1:] for k, v in per.items()})
    assert (first["pro"], first["anti"], first["n"]) == (1.0, 0.5, 4)
    assert (second["pro"], second["anti"], second["gap"]) == (0.0, 0.0, 0.0)
    assert bias.winobias_summary(per) == out


def test_winobias_files_missing_is_a_clear_error(tmp_path):
    (tmp_path / "pro_stereotyped_type1.txt.dev").write_text("1 [The cook] ate because [he] was.\n")
    with pytest.raises(FileNotFoundError, match="pro_stereotyped_type2"):
        bias.winobias_files(tmp_path, "dev")
    with pytest.raises(ValueError, match="split"):
        bias.winobias_files(tmp_path, "train")


def test_real_data_loaders_and_metrics(lm):
    shared_or_skip("dama/test_dama.json")
    shared_or_skip("winobias/pro_stereotyped_type1.txt.dev")
    records = bias.load_dama_prompts("test")
    assert len(records) == 1111
    assert records[0]["prompt"].startswith("The ")
    sets = bias.load_winobias()
    assert sorted(sets) == sorted(bias.WINOBIAS_SETS)
    assert all(len(v) == 396 for v in sets.values())
    fit = bias.gender_bias(lm, records[::50])
    assert all(math.isfinite(fit[k]) for k in ("a_s", "a_f", "b", "prob_he", "prob_she"))
    assert 0.0 <= fit["prob_he"] <= 1.0
    # P(he) − P(she) of each prompt is what the slopes are fitted on
    p = bias.pronoun_probs(lm, ["The nurse said that", "The carpenter said that"])
    assert p.shape == (2, 2) and float(p.sum()) < 2.0
    reqs = bias.dama_requests("train", limit=5)
    assert len(reqs) == 5 and all("{}" in r.prompt for r in reqs)


def test_perplexity_prefers_natural_text(lm):
    natural = ["The cat sat on the mat and looked out of the window at the garden."]
    scrambled = ["window mat the cat garden at sat the of looked on out and the The."]
    ppl_n = bias.perplexity(lm, natural)
    ppl_s = bias.perplexity(lm, scrambled)
    assert 1.0 < ppl_n < ppl_s
    with pytest.raises(ValueError):
        bias.perplexity(lm, [])


def test_cli_bias_missing_winobias_files_is_a_clear_error(tmp_path):
    from medit_lite.cli import main

    with pytest.raises(SystemExit, match="WinoBias file missing"):
        main(["bias", "--winobias", str(tmp_path), "--split", "dev"])
