"""Analysis tools: causal tracing (where a fact is recalled) and the key-value view of
MLP layers with projections into the vocabulary (how it is stored)."""

from .attribution import neuron_attributions
from .keyvalue import logit_lens, mlp_key_value, top_memories
from .tracing import (
    KINDS,
    AverageTrace,
    TraceResult,
    average_trace,
    embedding_std,
    known_facts,
    load_known_facts,
    trace,
)

__all__ = [
    "KINDS",
    "TraceResult",
    "AverageTrace",
    "trace",
    "average_trace",
    "embedding_std",
    "known_facts",
    "load_known_facts",
    "mlp_key_value",
    "logit_lens",
    "top_memories",
    "neuron_attributions",
]
