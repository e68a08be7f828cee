"""Models: loading (embedded default, HF dirs/ids, GGUF), the LanguageModel scoring engine, neuron sites."""
from .lm import ContinuationScore, LanguageModel
from .fingerprint import weights_fingerprint
from .loading import DEFAULT_MODEL, EMBEDDED, list_models, load_model

__all__ = ["ContinuationScore", "LanguageModel", "DEFAULT_MODEL", "EMBEDDED", "list_models", "load_model",
           "weights_fingerprint"]
