"""ROME, MEMIT and the second-moment statistics on the real default model.

Statistics use a small sample count (``N``) so the first run stays short; the edits cache
them under ``$MEDIT_CACHE`` like every other run's (the cache test uses a temporary one).
"""

import math

import pytest
import torch

from medit_lite import edit, weights_fingerprint
from medit_lite.methods.memit import memit_update
from medit_lite.methods.rome import ROMEHParams, rank_one_update
from medit_lite.metrics import locality_reference, score_requests, summarize
from medit_lite.stats import second_moment, second_moments

N = 4000  # key vectors in C for the tests (the default is 20,000)
FAST = dict(mom2_n_samples=N)


# -- statistics ---------------------------------------------------------------------------
def test_second_moment_is_symmetric_psd_and_cached(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))  # never the user's cache
    layer = ROMEHParams.for_model(lm).layers[0]
    first = second_moment(lm, layer, n_tokens=N)
    C = first.mom2
    assert C.shape == (lm.d_mlp, lm.d_mlp) and first.n == N
    assert torch.allclose(C, C.T, atol=1e-5)
    assert float(torch.linalg.eigvalsh(C.double()).min()) > -1e-6
    again = second_moment(lm, layer, n_tokens=N)
    assert again.cached and first.path == again.path and torch.equal(again.mom2, C)
    assert f"n{N}" in again.path.name and f"layer{layer:02d}" in again.path.name


def test_second_moment_matches_a_direct_average(lm):
    texts = ["The Eiffel Tower is in Paris.", "Water boils at one hundred degrees."]
    n = sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    stats = second_moments(
        lm, [1], texts * 8, n_tokens=n, batch_size=2, cache=False, allow_singular=True
    )[1]
    from medit_lite.hooks import Hooks

    keys = []
    for t in texts:
        with Hooks() as h:
            box = h.capture_input(lm.module("mlp_out", 1))
            lm.model(**lm.tokenize([t]))
        keys.append(box.value[0])
    K = torch.cat(keys).double()
    assert torch.allclose(stats.mom2.double(), K.T @ K / n, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_tokens=0), "n_tokens"),
        (dict(corpus="nonsense"), "unknown corpus"),
        (dict(layers=[99]), "outside"),
        (dict(layers=[]), "at least one"),
        (dict(n_tokens=10), "singular"),
    ],
)
def test_second_moment_bad_input(lm, kwargs, match):
    args = dict(layers=[0], corpus="offline", n_tokens=2000) | kwargs
    with pytest.raises(ValueError, match=match):
        second_moments(lm, args.pop("layers"), **args)


# -- the closed form ----------------------------------------------------------------------
def _constrained_lstsq(W, K, k, v):
    """min ‖(W+Δ)K − WK‖²  s.t. (W+Δ)k = v, solved row by row from the KKT system."""
    d_in = K.shape[0]
    A = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
    A[:d_in, :d_in] = 2 * K @ K.T
    A[:d_in, d_in] = k
    A[d_in, :d_in] = k
    rhs = torch.zeros(d_in + 1, W.shape[0], dtype=torch.float64)
    rhs[d_in] = v - W @ k
    return torch.linalg.solve(A, rhs)[:d_in].T


def test_rank_one_update_is_the_constrained_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n = 6, 9, 40
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    k = torch.randn(d_in, generator=g, dtype=torch.float64)
    v = torch.randn(d_out, generator=g, dtype=torch.float64)
    C = K @ K.T / n
    delta = rank_one_update(W, C, k, v)
    assert torch.allclose((W + delta) @ k, v, atol=1e-9)  # the new fact is stored
    assert torch.linalg.matrix_rank(delta) == 1
    assert torch.allclose(delta, _constrained_lstsq(W, K, k, v), atol=1e-8)
    # any other feasible change disturbs the old keys more
    E = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    E -= torch.outer(E @ k, k) / (k @ k)  # E k = 0: still stores the fact
    assert ((delta + 0.1 * E) @ K).norm() > (delta @ K).norm()
    # identity statistics: the minimum-norm (plain projection) update
    plain = rank_one_update(W, None, k, v)
    assert torch.allclose(plain, torch.outer(v - W @ k, k) / (k @ k))


def test_original_key_form_inserts_at_the_plain_key():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 5, generator=g, dtype=torch.float64)
    C = torch.eye(5, dtype=torch.float64) + 0.1
    k_star, k_p, v = (torch.randn(n, generator=g, dtype=torch.float64) for n in (5, 5, 4))
    delta = rank_one_update(W, C, k_star, v, k_insert=k_p)
    assert torch.allclose((W + delta) @ k_p, v, atol=1e-9)
    assert not torch.allclose((W + delta) @ k_star, v, atol=1e-3)


def test_three_key_forms_write_what_their_code_writes(lm):
    """k-star: W k* + δ at k*; r-ROME (Gupta et al.'s code): m + δ at k*, m = W k_p, so the
    inserted residual is δ + W (k_p − k*); original (Meng et al.'s code): m + δ at k_p."""
    from types import SimpleNamespace

    from medit_lite.methods.rome import insertion, rome_delta

    layer = 4
    g = torch.Generator().manual_seed(3)
    W = lm.weight_out_in("mlp_out", layer).detach().double()
    k_star, k_p = (torch.randn(lm.d_mlp, generator=g, dtype=torch.float64) for _ in range(2))
    delta = torch.randn(lm.d_model, generator=g, dtype=torch.float64)
    vectors = {"k_star": k_star, "k_plain": k_p, "value": SimpleNamespace(delta=delta)}
    C = torch.eye(lm.d_mlp, dtype=torch.float64)
    for form, key, residual in (
        ("k-star", k_star, delta),
        ("r-rome", k_star, delta + W @ (k_p - k_star)),
        ("original", k_p, delta),
    ):
        k_ins, v = insertion(lm, layer, vectors, form)
        assert torch.equal(k_ins, key)
        dW = rome_delta(lm, layer, vectors, C, form)
        assert torch.allclose(dW @ key, residual, atol=1e-8 * float(residual.norm()))
        assert torch.allclose((W + dW) @ key, v, atol=1e-6)
    with pytest.raises(ValueError, match="key_form"):
        insertion(lm, layer, vectors, "sideways")


def test_memit_update_solves_its_normal_equations():
    g = torch.Generator().manual_seed(2)
    d_out, d_in, n = 5, 8, 3
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    K0 = torch.randn(d_in, 50, generator=g, dtype=torch.float64)
    C, lam = K0 @ K0.T / 50, 2.0
    delta = memit_update(K, R, C, lam)
    # ΔW minimises λ‖ΔW K0‖²/50 + ‖ΔW K − R‖²: gradient zero
    grad = lam * delta @ C + (delta @ K - R) @ K.T
    assert grad.abs().max() < 1e-9
    # with λ → 0 the new facts are written exactly
    assert torch.allclose(memit_update(K, R, C, 1e-9) @ K, R, atol=1e-5)


# -- on the model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rome_edit(lm, facts, fingerprint):
    """One ROME edit of the first built-in fact, scored before and after, then restored."""
    request = facts[0]
    reference = locality_reference(lm, [request])
    before = score_requests(lm, [request], reference)[0]
    result = edit(lm, request, "rome", **FAST)
    after = score_requests(lm, [request], reference)[0]
    text = lm.generate(request.text, 3)
    result.restore()
    return dict(request=request, before=before, after=after, result=result, text=text)


def test_rome_flips_a_fact_and_its_paraphrases(rome_edit):
    before, after = rome_edit["before"], rome_edit["after"]
    assert before["ES"] == 0.0 and after["ES"] == 1.0
    assert after["PS"] >= 2 / 3
    assert after["NS"] >= 0.6 and after["NS"] >= before["NS"] - 0.34
    assert rome_edit["text"].strip().startswith(rome_edit["request"].target_new.split()[0])


def test_rome_changes_one_matrix_by_rank_one_and_restores_exactly(lm, rome_edit, fingerprint):
    result = rome_edit["result"]
    layer = result.hparams.layers[0]
    assert result.changed == [lm.module_name("mlp_out", layer) + ".weight"]
    info = result.info[0]
    assert info["layer"] == layer and info["key_form"] == "k-star" and info["steps"] >= 1
    assert info["losses"][-1]["p_target"] > info["losses"][0]["p_target"]
    assert weights_fingerprint(lm) == fingerprint


def test_rome_update_is_rank_one_on_the_model(lm, facts, unchanged):
    name = lm.module_name("mlp_out", ROMEHParams.for_model(lm).layers[0]) + ".weight"
    w0 = lm.model.get_parameter(name).detach().clone()
    with edit(lm, facts[5], "rome", v_num_grad_steps=2, **FAST) as result:
        delta = (lm.model.get_parameter(name) - w0).double()
        s = torch.linalg.svdvals(delta)
        assert s[1] < 1e-4 * s[0]
        assert math.isclose(result.delta_norms()[name], float(s[0]), rel_tol=1e-3)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(layers=(3, 4)), ValueError, "one layer"),
        (dict(layers=(99,)), ValueError, "outside"),
        (dict(key_form="sideways"), ValueError, "key_form"),
        (dict(fact_token="first"), ValueError, "fact_token"),
        (dict(v_lr=float("nan")), ValueError, "finite"),
        (dict(mom2_corpus="nowhere"), ValueError, "mom2_corpus"),
        (dict(context_templates=((5, 0),)), ValueError, "context_templates"),
        (dict(early_stop_term="kl"), ValueError, "early_stop_term"),
        (dict(no_such_knob=1), TypeError, "unknown hyperparameter"),
    ],
)
def test_rome_bad_input_changes_nothing(lm, facts, overrides, error, match, unchanged):
    with pytest.raises(error, match=match):
        edit(lm, facts[0], "rome", **overrides)


def test_rome_failure_inside_the_method_restores(lm, facts, unchanged, monkeypatch):
    from medit_lite.methods import rome

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rome, "rome_delta", boom)
    with pytest.raises(RuntimeError, match="boom"):
        edit(lm, facts[0], "rome", v_num_grad_steps=1, **FAST)


def test_batched_values_match_one_at_a_time_when_requests_stop_early(lm, facts):
    """Requests optimised together give the δ each gets alone: rows of different requests
    never mix, and a request that stops early leaves the batch without disturbing the rest."""
    from dataclasses import replace

    from medit_lite.methods.rome import context_templates, optimise_delta

    hp = replace(ROMEHParams.for_model(lm), context_templates=((5, 2),), v_num_grad_steps=8,
                 v_lr=2.0, early_stop_term="nll", early_stop_loss=0.7)  # fmt: skip
    templates = context_templates(lm, hp.context_templates, hp.seed)
    requests = [facts[0], facts[20], facts[40]]
    module = ("mlp", hp.layers[0])
    together = optimise_delta(lm, requests, module, hp, templates)
    alone = [optimise_delta(lm, [r], module, hp, templates)[0] for r in requests]
    steps = [len(v.losses) for v in together]
    assert len(set(steps)) > 1, f"all requests took {steps} steps: the test needs early stops"
    for t, a in zip(together, alone):
        assert len(t.losses) == len(a.losses)
        assert torch.allclose(t.delta, a.delta, rtol=1e-3, atol=1e-3 * float(a.delta.norm()))


def test_memit_batch_flips_most_facts_and_restores_exactly(lm, facts, unchanged):
    requests = facts[:40:4]  # 10 facts over several relations
    reference = locality_reference(lm, requests)
    before = summarize(score_requests(lm, requests, reference))
    with edit(lm, requests, "memit", context_templates=((5, 2),), **FAST) as result:
        after = summarize(score_requests(lm, requests, reference))
        assert sorted(result.changed) == sorted(
            lm.module_name("mlp_out", layer) + ".weight" for layer in result.hparams.layers
        )
    assert after["ES"] >= 0.8 and after["ES"] > before["ES"]
    assert after["NS"] >= before["NS"] - 0.2


def test_memit_bad_layers(lm, facts, unchanged):
    with pytest.raises(ValueError, match="increasing"):
        edit(lm, facts[0], "memit", layers=(5, 3))


@pytest.mark.parametrize("module", [("mlp", 4), ("layer", 6)])
def test_prefix_cache_gives_the_values_of_full_passes(lm, facts, module):
    """Running only the suffixes on top of the prefixes' key/value cache is an optimisation:
    the same δ (up to rounding), the same steps, and the same initial values m as running
    every row whole, for ROME's MLP output and MEMIT's residual stream, with requests
    whose subject is the first token of the KL row (empty prefix) among them."""
    from dataclasses import replace

    from medit_lite.methods.rome import context_templates, optimise_delta

    hp = replace(ROMEHParams.for_model(lm), context_templates=((5, 2),), v_num_grad_steps=4)
    templates = context_templates(lm, hp.context_templates, hp.seed)
    requests = [facts[0], facts[20], facts[40]]
    cached = optimise_delta(lm, requests, module, hp, templates)
    whole = optimise_delta(lm, requests, module, hp, templates, prefix_cache=False)
    for c, w in zip(cached, whole):
        assert [h["step"] for h in c.losses] == [h["step"] for h in w.losses]
        assert torch.allclose(c.v_init, w.v_init, atol=1e-4)
        assert torch.allclose(c.delta, w.delta, rtol=1e-3, atol=1e-3 * float(w.delta.norm()))
        assert c.losses[-1]["nll"] == pytest.approx(w.losses[-1]["nll"], rel=1e-3, abs=1e-4)


def test_length_groups_pad_fewest_tokens():
    from medit_lite.methods.rome import _length_cuts

    lengths = [3, 3, 4, 10, 10, 11, 20]
    assert _length_cuts(lengths, 1) == [20]
    # three groups {3,3,4} {10,10,11} {20}: 3*4 + 3*11 + 20 = 65 padded tokens
    assert _length_cuts(lengths, 3) == [4, 11, 20]
    assert _length_cuts([5, 5, 5], 3) == [5]  # equal lengths are never split


def test_memit_reference_key_average_weighs_the_plain_prompt_half():
    """kmeng01/memit compute_ks: the mean of the plain prompt's key and of the prefixes'
    mean key; the flat average weighs every context alike."""
    from medit_lite.methods.locate_edit import average_keys, template_groups

    g = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)  # plain + 5 prefixes
    groups = template_groups(((10, 5),))
    assert groups == [1, 5]
    grouped = average_keys(keys, groups)
    assert torch.allclose(grouped, 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(1))
    assert torch.allclose(average_keys(keys, None), keys.mean(1))
    assert not torch.allclose(grouped, keys.mean(1))
    with pytest.raises(ValueError, match="add up"):
        average_keys(keys, [1, 4])


def test_memit_released_configurations_are_the_released_files():
    """hparams/MEMIT/gpt2-xl.json and EleutherAI_gpt-j-6B.json of kmeng01/memit."""
    from medit_lite.methods.memit import PAPER_DEFAULTS

    xl, gptj = PAPER_DEFAULTS["gpt2-xl"], PAPER_DEFAULTS["gpt-j-6b"]
    assert xl.layers == (13, 14, 15, 16, 17) and gptj.layers == (3, 4, 5, 6, 7, 8)
    assert (xl.v_num_grad_steps, gptj.v_num_grad_steps) == (20, 25)
    assert (xl.mom2_update_weight, gptj.mom2_update_weight) == (20_000, 15_000)
    assert xl.mom2_n_samples == gptj.mom2_n_samples == 100_000
    for hp in (xl, gptj):
        assert (hp.clamp_norm_factor, hp.v_lr, hp.v_weight_decay, hp.kl_factor) == (
            0.75,
            0.5,
            0.5,
            0.0625,
        )
        assert hp.key_averaging == "groups" and hp.context_templates == ((10, 5),)
        assert hp.context_openers == ("The", "Therefore", "Because", "I", "You")


def test_context_openers_start_the_sampled_prefixes(lm):
    from medit_lite.methods.locate_edit import context_templates

    openers = ("The", "Therefore", "Because", "I", "You")
    templates = context_templates(lm, ((4, 5),), 0, openers)
    assert templates[0] == "{}" and len(templates) == 6
    assert all(t.startswith(o) for t, o in zip(templates[1:], openers))
    assert all(t.endswith(". {}") for t in templates[1:])
    assert context_templates(lm, ((4, 2),), 0) == context_templates(lm, ((4, 2),), 0, ("The",))
