"""Devices and dtypes without a GPU: no host tensor meets a model tensor (checked by
:mod:`device_check`, a CPU stand-in for CUDA's device rule), patches are counted at their
own dtype, and models placed by a device map (accelerate's hooks, one entry per layer)
edit, trace and restore, with every layer's device asked for."""

from __future__ import annotations

import pytest
import torch
from device_check import DeviceCheck

from medit_lite import edit, weights_fingerprint
from medit_lite.analysis.tracing import trace
from medit_lite.hooks import Hooks
from medit_lite.lifelong import lifelong
from medit_lite.models import LM, load_model
from medit_lite.stats import second_moment

REQUEST = {
    "prompt": "{} is located in",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "paraphrases": ["Where is The Eiffel Tower? It is in"],
    "neighborhood": [{"prompt": "The Louvre is located in", "answer": "Paris"}],
}
STATS = dict(mom2_n_samples=300)  # over TEXTS, the stand-in for ../shared (no sampling)
TEXTS = ["The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars."] * 30
#: (name, what to run on a tiny model): tracing and an edit of each kind, on layer 0
RUNS = {
    "trace": lambda lm: trace(lm, "{} is located in", "The Eiffel Tower", samples=2, noise=0.1),
    "rome": lambda lm: edit(lm, REQUEST, "rome", layers=(0,), **STATS).restore(),
    # z at a layer below the last (a δ in the last layer never reaches the prediction)
    "memit": lambda lm: edit(
        lm, REQUEST, "memit", layers=tuple(range(lm.n_layers - 1)), **STATS
    ).restore(),
    "ft-l": lambda lm: edit(lm, REQUEST, "ft-l", layers=(0,)).restore(),
    "tpatcher": lambda lm: edit(lm, REQUEST, "tpatcher").restore(),
    "grace": lambda lm: edit(lm, REQUEST, "grace").restore(),
    "kn": lambda lm: edit(lm, REQUEST, "kn").restore(),
}


@pytest.fixture(autouse=True)
def temp_cache(tmp_path, monkeypatch):
    """A temporary cache, and TEXTS as the offline corpus."""
    monkeypatch.setenv("MEDIT_CACHE", str(tmp_path))
    monkeypatch.setattr("medit_lite.stats.shared_texts", lambda: list(TEXTS))


# -- host tensors and dtypes -------------------------------------------------------------
def _run_with(lm, hook) -> DeviceCheck:
    """One forward pass with ``hook`` on layer 0's MLP output, under the check (the
    pass may fail: a promoted dtype stops the next bf16 layer)."""
    with DeviceCheck(lm.model) as check, Hooks() as h:
        h.edit_output(lm.module("mlp", 0), hook)
        try:
            lm.model(**lm.tokenize(["The Eiffel Tower is in"]))
        except RuntimeError:
            pass
    return check


def test_the_check_catches_a_host_tensor_and_a_promoted_dtype(make_tiny):
    """The stand-in itself: a hook adding ``torch.ones(d)`` (no device) to an activation
    is reported, so is a float32 tensor meeting a bf16 activation, and a tensor made on
    the activation's device and dtype is not."""
    lm = make_tiny(dtype=torch.bfloat16)
    host = _run_with(lm, lambda x: x + torch.ones(x.shape[-1], dtype=x.dtype))
    assert host.mixed and not host.promoted
    promoted = _run_with(lm, lambda x: x + x.new_ones(x.shape[-1]).float())
    assert promoted.promoted and not promoted.mixed
    fine = _run_with(lm, lambda x: x + torch.ones(x.shape[-1], dtype=x.dtype, device=x.device))
    assert not fine.mixed and not fine.promoted


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_no_host_tensor_meets_the_model(make_tiny, family, run):
    """Tracing and edits on a tiny bf16 model: every tensor that meets an activation or
    a weight was made on the model's (or the layer's) device and in a matching dtype."""
    lm = make_tiny(family=family, dtype=torch.bfloat16)
    before = weights_fingerprint(lm)
    with DeviceCheck(lm.model) as check:
        RUNS[run](lm)
    assert not check.mixed, sorted(set(check.mixed))
    assert not check.promoted, sorted(set(check.promoted))
    assert weights_fingerprint(lm) == before


def test_added_bytes_counts_each_patch_at_its_own_dtype(make_tiny):
    """T-Patcher keeps its patches in float32 on a bf16 model: 4 bytes a number, not the
    model's 2 (the old count multiplied by the model's element size)."""
    lm = make_tiny(dtype=torch.bfloat16)
    seen = {}

    def at_checkpoint(lm, n):
        start = {n for n, _ in lm.model.named_parameters() if ".tpatcher." not in n}
        new = [p for n, p in lm.model.named_parameters() if n not in start]
        seen["bytes"] = sum(p.numel() * p.element_size() for p in new)
        seen["dtypes"] = {p.dtype for p in new}

    result = lifelong(lm, [REQUEST], "tpatcher", every=1, at_checkpoint=at_checkpoint)
    final = result["final"]
    assert final["added_params"] > 0 and seen["dtypes"] == {torch.float32}
    assert final["added_bytes"] == seen["bytes"] == 4 * final["added_params"]


# -- device maps ----------------------------------------------------------------------------
def _per_layer_map(family: str, n_layers: int) -> dict:
    """One "cpu" entry per module a device map places: embeddings, each block, the end."""
    if family == "gpt2":
        ends = ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"]
        blocks = [f"transformer.h.{i}" for i in range(n_layers)]
    else:
        ends = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
        blocks = [f"model.layers.{i}" for i in range(n_layers)]
    return {name: "cpu" for name in ends[:-2] + blocks + ends[-2:]}


@pytest.fixture
def asked(monkeypatch):
    """The (kind, layer) pairs code asked ``LM.device_of`` about."""
    calls = []
    original = LM.device_of

    def spy(self, kind, layer=None):
        calls.append((kind, layer))
        return original(self, kind, layer)

    monkeypatch.setattr(LM, "device_of", spy)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_device_mapped_model_edits_and_restores(make_tiny, family, asked):
    """A tiny model dispatched by a per-layer device map (accelerate's hooks on every
    block): ROME, MEMIT and T-Patcher edit it and restore it bit-exactly, tracing runs,
    and each asks the device of the layers it works on."""
    lm = make_tiny(family=family, layers=3, device_map=_per_layer_map(family, 3))
    assert hasattr(lm.module("layer", 1), "_hf_hook"), "accelerate's hooks are missing"
    before = weights_fingerprint(lm)
    expected = {
        "rome": {("mlp_out", 0), ("mlp", 0)},
        "memit": {("mlp_out", 0), ("mlp_out", 1), ("layer", 1)},
        "tpatcher": {("mlp", 2)},
        "trace": {("embed", None)},
        "kn": set(),
        "grace": set(),
    }
    for run, wanted in expected.items():
        asked.clear()
        RUNS[run](lm)
        assert wanted <= set(asked), (run, sorted(set(asked), key=str))
        assert weights_fingerprint(lm) == before, run
    with edit(lm, REQUEST, "rome", layers=(0,), **STATS) as result:
        assert result.changed == [lm.module_name("mlp_out", 0) + ".weight"]
        assert result.info[0]["insert_ok"]
    assert weights_fingerprint(lm) == before


def test_statistics_of_a_device_mapped_model_match_the_plain_one(make_tiny, asked):
    plain = make_tiny(layers=3)
    mapped = make_tiny(layers=3, device_map=_per_layer_map("gpt2", 3))
    texts = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France."] * 8
    a = second_moment(plain, 1, texts, 100, cache=False)
    asked.clear()
    b = second_moment(mapped, 1, texts, 100, cache=False)
    assert ("mlp_out", 1) in asked
    assert torch.allclose(a.mom2, b.mom2, atol=1e-6)


def test_load_model_passes_a_device_map(make_tiny, tmp_path, monkeypatch):
    """``load_model(path, device_map=...)`` places the model with from_pretrained (which
    attaches accelerate's hooks when the map names more than one device)."""
    from transformers import AutoModelForCausalLM

    tiny = make_tiny(family="llama", layers=2)
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    device_map = _per_layer_map("llama", 2)
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(tmp_path / "tiny", device_map=device_map)
    assert seen["device_map"] == device_map
    assert weights_fingerprint(lm) == weights_fingerprint(tiny)
    with pytest.raises(ValueError, match="not both"):
        load_model(tmp_path / "tiny", device="cpu", device_map=device_map)
