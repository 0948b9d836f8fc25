"""medit_lite: model editing on real Hugging Face causal LMs, the companion of medit-book."""

from .editing import METHODS, EditResult, edit, weights_fingerprint
from .metrics import METRIC_KEYS, locality_reference, score_requests, summarize
from .models import LM, load_model
from .requests import (
    EditRequest,
    builtin_requests,
    load_counterfact,
    load_easyedit,
    load_requests,
    load_zsre,
    shared_data,
)

__all__ = [
    "LM",
    "load_model",
    "EditRequest",
    "builtin_requests",
    "load_requests",
    "load_counterfact",
    "load_zsre",
    "load_easyedit",
    "shared_data",
    "edit",
    "EditResult",
    "METHODS",
    "weights_fingerprint",
    "score_requests",
    "summarize",
    "locality_reference",
    "METRIC_KEYS",
]
__version__ = "0.1.0"
