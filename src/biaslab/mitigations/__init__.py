"""Mitigations: methods that fit a Patch (CRISPR, FAST, SR_LLM); see DESIGN.md."""
from __future__ import annotations

from ..registry import LazyRegistry

# name -> "module:fit"; each fit(lm, data, config) returns a Patch. Imported lazily (no eager method imports).
MITIGATIONS = LazyRegistry("mitigation", {
    "crispr": "biaslab.mitigations.crispr:fit",
    "fast": "biaslab.mitigations.fast:fit",
    "srllm": "biaslab.mitigations.srllm:fit",
})
