"""CRISPR — bias neuron elimination (Yang et al., ACL 2024, arXiv 2311.09627; docs/methods/crispr.md).

Modules: :mod:`.config` (settings), :mod:`.scores` (attribution), :mod:`.selection` (splits, top/random units,
the n search), :mod:`.fitting` (the fit and its patch), :mod:`.metrics` (task metrics), :mod:`.method` (the registered
method). Names are re-exported lazily, so ``from biaslab.methods import crispr as C; C.fit_details`` works without
importing torch for the CLI's option list.
"""
from __future__ import annotations

from ...registry import lazy_exports

_EXPORTS = {
    "config": ("CrisprConfig", "DEFAULT_RETENTION", "PROMPT_LAYOUT", "METHOD_ID", "SEARCH_OBJECTIVES", "ATTRIBUTION_PROTOCOLS",
               "resolve_instructions", "fit_settings"),
    "scores": ("AttributionStats", "bias_scores", "trial_scores"),
    "selection": ("check_task_items", "split_dev_test", "sample_items", "strata_key", "ids_hash", "top_units",
                  "random_units", "golden_section_search", "choose_n", "accuracy_mean", "gold_prob_mean",
                  "condition_hmean", "search_objective_value"),
    "fitting": ("make_patch", "CrisprFit", "fit_details", "fit"),
    "metrics": ("task_metrics", "per_instruction", "metric_values", "constant_answer"),
    "method": ("Crispr",),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
