"""Models: loading (embedded default, HF dirs/ids, GGUF), the LanguageModel scoring engine, neuron sites."""
from .lm import ContinuationScore, LanguageModel
from .loading import DEFAULT_MODEL, EMBEDDED, list_models, load_model, weights_fingerprint

__all__ = ["ContinuationScore", "LanguageModel", "DEFAULT_MODEL", "EMBEDDED", "list_models", "load_model",
           "weights_fingerprint"]
