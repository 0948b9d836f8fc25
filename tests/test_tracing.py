"""Causal tracing, the subject span, replay and the key-value view on the default model."""

import pytest
import torch

from medit_lite.analysis import known_facts, logit_lens, mlp_key_value, top_memories, trace
from medit_lite.analysis.tracing import window_layers
from medit_lite.hooks import Hooks
from medit_lite.positions import subject_span
from medit_lite.replay import final_hidden, layer_input, replay_layers

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
SAMPLES = 2


@pytest.fixture(scope="module")
def eiffel(lm):
    return trace(
        lm,
        PROMPT,
        SUBJECT,
        kinds=("layer", "mlp"),
        samples=SAMPLES,
        layers=range(0, 30, 5),
        show_progress=False,
    )


def test_subject_span_finds_the_subject_tokens(lm):
    start, end = subject_span(lm, "{} is located in the city of", SUBJECT)
    ids = lm.tokenizer(PROMPT)["input_ids"]
    assert lm.tokenizer.decode(ids[start:end]).strip() == SUBJECT
    start, end = subject_span(lm, "Today, {} is big", "Paris", prefix="Hello. ")
    ids = lm.tokenizer("Hello. Today, Paris is big")["input_ids"]
    assert lm.tokenizer.decode(ids[start:end]).strip() == "Paris"
    with pytest.raises(ValueError):
        subject_span(lm, "no braces", "x")


def test_replay_gives_the_same_logits(lm):
    batch = lm.tokenize([PROMPT, "The capital of France is"])
    with torch.no_grad():
        full = lm.model(**batch).logits
        hidden = layer_input(lm, batch, 7)
        with replay_layers(lm, 7, hidden):
            replayed = lm.model(**batch).logits
    assert torch.allclose(full, replayed, atol=1e-4)
    assert all(type(m).__name__ != "_Replay" for m in lm.model.modules())


def test_trace_of_a_known_fact_peaks_on_the_subject_or_last_token(lm, eiffel):
    res = eiffel["layer"]
    assert res.answer.strip() == "Paris" and res.clean > 0.3
    assert res.corrupted < 0.5 * res.clean  # the noise destroys the recall
    token, layer = res.argmax()
    assert layer in res.extra["layers"]  # a layer index, not a column of the grid
    start, end = res.subject_range
    assert start <= token < end or token == len(res.tokens) - 1
    assert float(res.indirect_effect.max()) > 0.3 * (res.clean - res.corrupted)
    # restoring the stream at the last token late in the network brings the answer back
    assert float(res.scores[-1, -1]) > 0.5 * res.clean
    # tokens before the subject are not affected by the noise: no effect there
    assert torch.all(res.scores[:start] == res.corrupted)
    mlp = eiffel["mlp"]
    assert mlp.scores.shape == res.scores.shape and mlp.window == 10


def test_trace_restoration_matches_a_single_manual_run(lm, eiffel):
    """One cell of the batched trace equals an unbatched corrupted-with-restoration run."""
    res = eiffel["layer"]
    start, end = res.subject_range
    layer = 10
    col = res.extra["layers"].index(layer)
    noise = res.noise
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(SAMPLES, end - start, lm.d_model, generator=gen) * noise
    ids = lm.tokenize([PROMPT])["input_ids"]
    with torch.no_grad(), Hooks() as h:
        clean = h.capture_output(lm.module("layer", layer))
        lm.model(input_ids=ids)
    probs = []
    for s in range(SAMPLES):
        with torch.no_grad(), Hooks() as h:
            h.edit_output(lm.module("embed"), lambda x, s=s: _add_at(x, start, end, eps[s]))
            h.edit_output(lm.module("layer", layer), lambda x: _put(x, end - 1, clean))
            logits = lm.model(input_ids=ids).logits[0, -1]
        probs.append(float(torch.softmax(logits, -1)[res.answer_id]))
    row = res.positions.index(end - 1)
    assert abs(sum(probs) / SAMPLES - float(res.scores[row, col])) < 1e-4


def test_prefix_cache_and_staggered_rows_give_the_scores_of_full_rows(lm):
    """Rows that run only from their restored token on (prefix keys and values from the
    corrupted run) and share passes across start layers score as whole-prompt rows."""
    prompt, subject = "In the middle of Paris, the Eiffel Tower is located in", "the Eiffel Tower"
    kw = dict(samples=2, layers=[0, 4, 12, 20, 29], window=6, show_progress=False)
    fast = trace(lm, prompt, subject, **kw)
    full = trace(lm, prompt, subject, prefix_cache=False, **kw)
    for kind in fast:
        assert torch.allclose(fast[kind].scores, full[kind].scores, atol=1e-5)
        assert fast[kind].corrupted == full[kind].corrupted
    assert all(type(m).__name__ not in ("_Block", "_Replay") for m in lm.model.modules())


def test_window_restoration_matches_a_single_manual_run(lm):
    """An MLP cell with its window, at a token after the subject (a row whose prefix comes
    from the cache), equals a hand-made corrupted run with those outputs put back."""
    positions = ["first_after", "last"]
    res = trace(lm, PROMPT, SUBJECT, kinds="mlp", samples=SAMPLES, layers=[8],
                positions=positions, window=4, show_progress=False)["mlp"]  # fmt: skip
    start, end = res.subject_range
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(SAMPLES, end - start, lm.d_model, generator=gen) * res.noise
    ids = lm.tokenize([PROMPT])["input_ids"]
    layers = window_layers(8, 4, lm.n_layers)
    with torch.no_grad(), Hooks() as h:
        clean = {j: h.capture_output(lm.module("mlp", j)) for j in layers}
        lm.model(input_ids=ids)
    for row, token in enumerate(res.positions):
        probs = []
        for s in range(SAMPLES):
            with torch.no_grad(), Hooks() as h:
                h.edit_output(lm.module("embed"), lambda x, s=s: _add_at(x, start, end, eps[s]))
                for j in layers:
                    h.edit_output(lm.module("mlp", j), lambda x, j=j, t=token: _put(x, t, clean[j]))
                logits = lm.model(input_ids=ids).logits[0, -1]
            probs.append(float(torch.softmax(logits, -1)[res.answer_id]))
        assert abs(sum(probs) / SAMPLES - float(res.scores[row, 0])) < 1e-4


def _add_at(x, start, end, noise):
    x = x.clone()
    x[:, start:end] += noise
    return x


def _put(x, token, clean):
    x = x.clone()
    x[:, token] = clean.value[:, token]
    return x


def test_final_hidden_gives_the_models_logits(lm):
    batch = lm.tokenize([PROMPT, "The capital of France is"])
    with torch.no_grad():
        logits = lm.model(**batch).logits
        normed = final_hidden(lm, **batch)
    assert torch.allclose(lm.module("unembed")(normed), logits, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(subject="Big Ben"), "does not occur"),
        (dict(kinds=("neurons",)), "unknown kind"),
        (dict(samples=0), "samples"),
        (dict(window=0), "window"),
        (dict(noise=float("inf")), "noise"),
        (dict(layers=[30]), "outside"),
        (dict(positions=["middle"]), "unknown position"),
        (dict(prompt=""), "prompt"),
    ],
)
def test_trace_bad_input(lm, kwargs, match):
    args = dict(prompt=PROMPT, subject=SUBJECT) | kwargs
    with pytest.raises(ValueError, match=match):
        trace(lm, args.pop("prompt"), args.pop("subject"), **args)


def test_window_layers_clip_at_the_ends():
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(15, 10, 30)) == list(range(10, 20))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(4, 1, 30)) == [4]


def test_known_facts_keeps_what_the_model_answers(lm):
    records = [
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Paris"},
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Tokyo"},
    ]
    assert [r["attribute"] for r in known_facts(lm, records)] == ["Paris"]


def test_key_value_and_logit_lens(lm):
    kv = mlp_key_value(lm, PROMPT, 4, subject=SUBJECT)
    assert kv.key.shape == (lm.d_mlp,) and kv.value.shape == (lm.d_model,)
    assert kv.token.strip() == "Tower"
    w = lm.weight_out_in("mlp_out", 4)
    assert torch.allclose(w @ kv.key, kv.value, atol=1e-4)  # value = W_out key
    top = logit_lens(lm, lm.module("embed").weight[lm.tokenizer(" Paris")["input_ids"][0]], k=3)
    assert len(top) == 3 and all(isinstance(t, str) for t, _ in top)
    mem = top_memories(lm, kv.key, 4, k=3, tokens=2)
    assert len(mem) == 3 and len(mem[0]["promotes"]) == 2
    with pytest.raises(ValueError):
        logit_lens(lm, torch.zeros(3))


def test_cli_trace_draws_a_heatmap(tmp_path, capsys):
    from medit_lite.cli import main

    png = tmp_path / "trace.png"
    rc = main(["trace", "--prompt", "Paris is the capital of", "--subject", "Paris",
               "--kind", "layer", "--samples", "1", "--png", str(png)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and png.stat().st_size > 1000
    assert "largest indirect effect" in out and "layer" in out


def test_default_noise_is_three_sigma_of_the_known_subjects_embeddings(lm):
    """The authors' rule: 3 × the std of the embedding-layer outputs of every subject of
    the known facts, concatenated (``collect_embedding_std``), not of the whole matrix."""
    from medit_lite.analysis import tracing

    subjects, source = tracing.known_subjects()
    outputs = []
    with torch.no_grad():
        for s in subjects:
            ids = lm.tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"]
            outputs.append(lm.module("embed")(ids)[0].float())
    by_hand = 3 * float(torch.cat(outputs).std())
    assert abs(tracing.default_noise(lm) - by_hand) < 1e-4 * by_hand
    assert abs(tracing.default_noise(lm) - 3 * tracing.embedding_std(lm)) > 0.01
    if source == "known_1000.json":
        assert len(subjects) >= 1000
