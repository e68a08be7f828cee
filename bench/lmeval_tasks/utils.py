"""lm-evaluation-harness's own BBQ and CrowS-Pairs task functions, re-exported for the local task configs.

Nothing is re-implemented here: the local YAMLs must score and aggregate exactly as lm-eval's built-in tasks do.
"""
from lm_eval.tasks.bbq.utils import (  # noqa: F401
    agg_accuracy_amb,
    agg_accuracy_disamb,
    agg_amb_bias_scores,
    agg_disamb_bias_scores,
    doc_to_choice,
    doc_to_target,
    process_docs,
    process_results_multiple_choice,
)
from lm_eval.tasks.crows_pairs.utils import doc_to_choice as crows_doc_to_choice  # noqa: F401
from lm_eval.tasks.crows_pairs.utils import process_results as crows_process_results  # noqa: F401
