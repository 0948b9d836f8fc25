import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from medit_lite.hooks import Hooks
from medit_lite.models import ADAPTERS, adapter_for, wrap

D, MLP, LAYERS = 32, 64, 3

TINY_CONFIGS = {
    "gpt2": GPT2Config(n_embd=D, n_inner=MLP, n_layer=LAYERS, n_head=4, n_positions=128),
    "gptj": GPTJConfig(
        n_embd=D, n_inner=MLP, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=128
    ),
    "gpt_neox": GPTNeoXConfig(
        hidden_size=D,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=128,
    ),
    "llama": LlamaConfig(
        hidden_size=D,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "mistral": MistralConfig(
        hidden_size=D,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "qwen2": Qwen2Config(
        hidden_size=D,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
}


@pytest.fixture(scope="module")
def tokenizer(lm):
    return lm.tokenizer


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_adapter_on_tiny_random_model(family, tokenizer):
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]
    config.vocab_size = len(tokenizer)
    tiny = wrap(AutoModelForCausalLM.from_config(config), tokenizer, name=f"tiny-{family}")
    assert tiny.adapter.family == family
    assert (tiny.n_layers, tiny.d_model, tiny.d_mlp) == (LAYERS, D, MLP)
    assert tiny.weight_out_in("mlp_out", 1).shape == (D, MLP)
    assert tiny.weight_out_in("mlp_in", 1).shape == (MLP, D)
    assert tiny.weight_out_in("attn_out", 1).shape == (D, D)
    assert tiny.module("unembed").weight.shape == (len(tokenizer), D)
    batch = tiny.tokenize(["The capital of France is", "Hi"])
    with Hooks() as h:
        keys = h.capture_input(tiny.module("mlp_out", 1))
        values = h.capture_output(tiny.module("mlp_out", 1))
        mlp_in = h.capture_output(tiny.module("mlp_in", 1))
        attn = h.capture_output(tiny.module("attn_out", 2))
        resid = h.capture_output(tiny.module("layer", 0))
        embed = h.capture_output(tiny.module("embed"))
        normed = h.capture_output(tiny.module("final_norm"))
        logits = tiny.model(**batch).logits
    seq = batch["input_ids"].shape
    assert keys.value.shape == (*seq, MLP)
    assert mlp_in.value.shape == (*seq, MLP)
    for box in (values, attn, resid, embed, normed):
        assert box.value.shape == (*seq, D)
    # the unembedding applied to the final-norm output gives the logits
    assert torch.allclose(tiny.module("unembed")(normed.value), logits, atol=1e-5)
    # overwriting the residual stream after layer 0 changes the output
    with Hooks() as h:
        h.edit_output(tiny.module("layer", 0), lambda x: x * 0)
        changed = tiny.model(**batch).logits
    assert not torch.allclose(changed, logits)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_fast_trace_paths_work_on_every_family(family, tokenizer):
    """Causal tracing's shortcuts (prefix keys/values handed to the blocks, rows starting at
    different layers in one pass, the unembedding after the final norm) rely on how each
    family's blocks take their cache: the scores must equal whole-prompt rows."""
    from medit_lite.analysis import trace

    config = TINY_CONFIGS[family]
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    tiny = wrap(AutoModelForCausalLM.from_config(config), tokenizer, name=f"tiny-{family}")
    kw = dict(samples=2, window=2, answer="Paris", show_progress=False)
    prompt, subject = "In the end, the Eiffel Tower is located in", "the Eiffel Tower"
    fast = trace(tiny, prompt, subject, **kw)
    full = trace(tiny, prompt, subject, prefix_cache=False, **kw)
    for kind in fast:
        assert torch.allclose(fast[kind].scores, full[kind].scores, rtol=1e-4, atol=1e-10)
        assert not torch.all(fast[kind].scores == fast[kind].corrupted)  # restorations act


def test_gpt2_weight_view_is_transposed_and_live(tokenizer):
    config = TINY_CONFIGS["gpt2"]
    config.vocab_size = len(tokenizer)
    tiny = wrap(AutoModelForCausalLM.from_config(config), tokenizer)
    view = tiny.weight_out_in("mlp_out", 0)
    assert view.shape == (D, MLP) and tiny.module("mlp_out", 0).weight.shape == (MLP, D)
    with torch.no_grad():
        view[0, 1] = 123.0
    assert tiny.module("mlp_out", 0).weight[1, 0] == 123.0


def test_unknown_architecture_is_a_clear_error(tokenizer):
    config = OPTConfig(
        hidden_size=D,
        ffn_dim=MLP,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=D,
        vocab_size=len(tokenizer),
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="unknown architecture 'opt'"):
        adapter_for(model)
    with pytest.raises(ValueError, match="llama"):
        wrap(model, tokenizer)


def test_bad_module_requests(lm):
    with pytest.raises(ValueError, match="needs a layer"):
        lm.module("mlp_out")
    with pytest.raises(ValueError, match="out of range"):
        lm.module("mlp_out", 30)
    with pytest.raises(ValueError, match="unknown module kind"):
        lm.module("ffn", 1)


def test_default_model_is_smollm2_and_knows_easy_facts(lm):
    assert lm.adapter.family == "llama" and lm.adapter is ADAPTERS["llama"]
    assert (lm.n_layers, lm.d_model, lm.d_mlp) == (30, 576, 1536)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    out = lm.generate(["The Eiffel Tower is located in the city of", "The capital of Japan is"], 4)
    assert "Paris" in out[0] and "Tokyo" in out[1]
    assert lm.module_name("mlp_out", 17) == "model.layers.17.mlp.down_proj"


def test_default_model_is_cached_as_safetensors(lm):
    from medit_lite.models import default_model_path

    path = default_model_path()
    assert (path / "config.json").exists() and list(path.glob("*.safetensors"))
