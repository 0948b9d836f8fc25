"""Integrated-gradients attribution of FFN neurons (Dai et al., 2022, Eq. 3-4)."""

from __future__ import annotations

import pytest
import torch

from medit_lite.analysis.attribution import neuron_attributions
from medit_lite.hooks import Hooks
from medit_lite.metrics import encode_pair

PROMPT = "The Eiffel Tower is located in the city of"


def _patched_prob(lm, ids, layer, activation, target_id):
    """Slow reference: P(target) from a full-prompt pass with the last position's FFN
    activations of ``layer`` replaced by ``activation`` (a leaf that may require grad)."""

    def patch(x):
        return torch.cat([x[:, :-1], activation[None, None].to(x.dtype)], dim=1)

    with Hooks() as h:
        h.edit_input(lm.module("mlp_out", layer), patch)
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1]
    return torch.softmax(logits.float(), -1)[target_id]


def _clean_activation(lm, ids, layer):
    with torch.no_grad(), Hooks() as h:
        box = h.capture_input(lm.module("mlp_out", layer))
        lm.model(input_ids=torch.tensor([ids], device=lm.device))
    return box.value[0, -1].float()


def _slow_ig(lm, ids, layer, target_id, steps):
    """One forward and backward pass per Riemann step, on the whole prompt."""
    w = _clean_activation(lm, ids, layer)
    total = torch.zeros_like(w)
    for k in range(1, steps + 1):
        x = (k / steps * w).requires_grad_(True)
        with torch.enable_grad():
            p = _patched_prob(lm, ids, layer, x, target_id)
            (g,) = torch.autograd.grad(p, x)
        total += g
    return w * total / steps


def test_batched_equals_slow_loop(lm, unchanged):
    """Per token of a two-token target (teacher forcing), at three layers."""
    target = "Paris, France"
    prompt_ids, target_ids = encode_pair(lm, PROMPT, target)
    assert len(target_ids) >= 2
    layers = [0, 14, 29]
    fast = neuron_attributions(lm, [PROMPT], [target], layers=layers, steps=4, per_token=True)[0]
    assert fast.shape == (len(target_ids), 3, lm.d_mlp)
    for t in (0, 1):
        ids = prompt_ids + target_ids[:t]
        for j, layer in enumerate(layers):
            slow = _slow_ig(lm, ids, layer, target_ids[t], steps=4).cpu()
            # float32 sums in another order (batched rows, cached keys): agree to 0.1% of
            # the layer's largest score, whatever the thread count
            scale = float(slow.abs().max())
            torch.testing.assert_close(fast[t, j], slow, atol=max(1e-3 * scale, 1e-7), rtol=2e-3)
    summed = neuron_attributions(lm, [PROMPT], [target], layers=layers, steps=4)[0]
    torch.testing.assert_close(summed, fast.sum(0), atol=1e-6, rtol=1e-5)


def test_completeness(lm, unchanged):
    """The attributions of one layer sum to P(w) - P(0) (Sundararajan et al., 2017)."""
    prompt_ids, target_ids = encode_pair(lm, PROMPT, "Paris")
    layers = [20, 29]
    scores = neuron_attributions(lm, [PROMPT], ["Paris"], layers=layers, steps=64)[0]
    for j, layer in enumerate(layers):
        w = _clean_activation(lm, prompt_ids, layer)
        with torch.no_grad():
            full = _patched_prob(lm, prompt_ids, layer, w, target_ids[0])
            zero = _patched_prob(lm, prompt_ids, layer, torch.zeros_like(w), target_ids[0])
        gap = float(full - zero)
        assert abs(gap) > 0.01  # the test means something only if the layer matters
        assert float(scores[j].sum()) == pytest.approx(gap, abs=0.1 * abs(gap))


def test_all_layers_default_and_several_pairs(lm, unchanged):
    out = neuron_attributions(lm, [PROMPT, "Japan's capital is"], ["Paris", "Tokyo"], steps=2)
    assert len(out) == 2
    assert all(o.shape == (lm.n_layers, lm.d_mlp) for o in out)
    assert all(torch.isfinite(o).all() for o in out)
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"prompts": [PROMPT], "targets": []}, ValueError),
        ({"prompts": [PROMPT], "targets": [" "]}, ValueError),
        ({"prompts": PROMPT, "targets": "Paris"}, TypeError),
        ({"prompts": [PROMPT], "targets": ["Paris"], "layers": [30]}, ValueError),
        ({"prompts": [PROMPT], "targets": ["Paris"], "layers": []}, ValueError),
        ({"prompts": [PROMPT], "targets": ["Paris"], "steps": 0}, ValueError),
    ],
)
def test_bad_input(lm, unchanged, kwargs, error):
    with pytest.raises(error):
        neuron_attributions(lm, **kwargs)
