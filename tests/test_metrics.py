import math

import pytest
import torch

from medit_lite.metrics import (
    METRIC_KEYS,
    encode_pair,
    ngram_entropy,
    rome_generation_entropy,
    sampled_generations,
    score_requests,
    score_targets,
    summarize,
    target_text,
)
from medit_lite.requests import EditRequest


def test_target_text_spacing():
    assert target_text("The capital is", "Paris") == " Paris"
    assert target_text("Answer: ", "Paris") == "Paris"


def test_batched_scores_match_one_sequence_at_a_time(lm):
    prompts = ["The capital of France is", "Apple was founded by", "Hi"]
    targets = ["Paris", "Steve Jobs and Steve Wozniak", "there friend"]
    batched = score_targets(lm, prompts, targets, batch_size=3)
    for prompt, target, s in zip(prompts, targets, batched):
        p, t = encode_pair(lm, prompt, target)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([p + t])).logits[0]
        logp = torch.log_softmax(logits[len(p) - 1 : len(p) + len(t) - 1], -1)
        expected = logp[torch.arange(len(t)), torch.tensor(t)]
        assert len(s.logprobs) == len(t)  # multi-token targets score every token
        assert torch.allclose(s.logprobs, expected, atol=1e-4)
        assert torch.equal(s.predicted, logp.argmax(-1))
        assert math.isclose(s.prob, math.exp(expected.mean().item()), rel_tol=1e-4)


def test_ngram_entropy():
    assert ngram_entropy("a a a a a a") == 0.0
    # 4 distinct bigrams and 3 distinct trigrams, each once: H2 = 2, H3 = log2(3)
    expected = (2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2
    assert math.isclose(ngram_entropy("a b c d e"), expected)


def test_unedited_model_on_known_facts(lm, facts):
    from medit_lite.metrics import locality_reference

    reqs = facts[:10]
    rows = score_requests(lm, reqs, locality_reference(lm, reqs), generation_tokens=10)
    m = summarize(rows)
    assert set(m) == set(METRIC_KEYS) - {"portability"}
    assert m["ES"] == 0.0 and m["reliability"] < 0.2  # the model prefers the true facts
    assert m["locality"] == 1.0  # nothing edited: identical predictions
    assert m["NS"] > 0.8 and m["EM"] < 0 and m["NM"] > 0
    # locality compares with the reference it is given: another fact's predictions differ
    shifted = locality_reference(lm, reqs[1:] + reqs[:1])
    assert summarize(score_requests(lm, reqs, shifted))["locality"] < 0.5
    # the model's continuations are far less repetitive than a looping text
    assert m["GE"] > ngram_entropy("is a city in the city of the city of the city of") + 0.5


def test_keys_absent_where_data_cannot_give_them(lm):
    r = EditRequest("{} is located in", "Angola", "Antarctica")
    row = score_requests(lm, [r])[0]
    assert set(row) == {"reliability"}
    assert summarize([row, {"ES": 1.0, "reliability": 0.0}]) == {
        "ES": 1.0,
        "reliability": 0.0 + row["reliability"] / 2,
    }


def test_score_targets_rejects_mismatched_lengths(lm):
    with pytest.raises(ValueError, match="same length"):
        score_targets(lm, ["a"], ["b", "c"])


def test_rome_ge_protocol_samples_seeded_to_100_tokens_in_all(lm):
    prompts = ["The Eiffel Tower is", "My favourite food is a bowl of"]
    state = torch.get_rng_state()
    a = sampled_generations(lm, prompts, max_out_len=24, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert a == sampled_generations(lm, prompts, max_out_len=24, seed=3)
    assert a != sampled_generations(lm, prompts, max_out_len=24, seed=4)
    for prompt, text in zip(prompts, a):
        assert text.startswith(prompt)  # ROME scores the prompt's words too
        n = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        # at most 24 tokens in all (end-of-text tokens are sampled past, then dropped)
        assert len(text) > len(prompt) + 10 and n <= 24 + 3, (n, text)
    ge = rome_generation_entropy(lm, prompts, max_out_len=24, seed=3)
    assert ge == pytest.approx(sum(ngram_entropy(t, lowercase=False) for t in a) / 2)
    # case is kept in the paper's protocol, folded in the cheap one
    assert ngram_entropy("A a A a b", lowercase=False) != ngram_entropy("A a A a b")
    r = EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris",
                    generation_prompts=tuple(prompts))  # fmt: skip
    again = [score_requests(lm, [r], generation_tokens=24, generation_protocol="rome")[0]["GE"]
             for _ in range(2)]  # fmt: skip
    assert again[0] == again[1]
    with pytest.raises(ValueError, match="generation_protocol"):
        score_requests(lm, [r], generation_tokens=24, generation_protocol="nucleus")
