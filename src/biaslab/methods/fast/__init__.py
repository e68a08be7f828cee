"""FAST — a fairness stamp at the layer causal tracing finds (Chen et al., NAACL Findings 2025; docs/methods/fast.md).

Modules: :mod:`.config` (settings, tasks), :mod:`.pairs` (biased knowledge pairs, their split), :mod:`.eval_pairs`
(paraphrases, CrowS transfer, commonsense retention), :mod:`.stamp` (the stamp and its patch), :mod:`.kl_texts` (the
KL terms' texts), :mod:`.training` (losses, training, FT-L), :mod:`.biascope` (the BiaScope sets and their scorer),
:mod:`.method` (the registered method). Names are re-exported lazily.
"""
from __future__ import annotations

from ...registry import lazy_exports

_EXPORTS = {
    "config": ("FastConfig", "BIAS_TYPES", "TASKS", "METHOD_VERSION", "STAMP_INITS", "FAIRNESS_LOSSES",
               "ACTIVATION_NAMES", "CROWS_TYPES", "parse_task"),
    "pairs": ("KnowledgePair", "swap_group", "stereoset_clusters", "pair_from_cluster", "build_stereoset_pairs",
              "split_pairs", "COUNTERPARTS", "SUBJECT_TEMPLATES", "GENDER_SWAP"),
    "eval_pairs": ("paraphrase_prompts", "paraphrase_pair", "crows_pairs", "load_paraphrases", "load_crows_transfer",
                   "load_commonsense", "PARAPHRASE_FILE", "CROWS_FILE", "COMMONSENSE_FILE", "BIASCOPE_DIR", "WRAPPERS"),
    "stamp": ("StampFFN", "StampPatch", "attach_stamp", "ACTIVATIONS"),
    "kl_texts": ("wiki_windows", "subject_prompts", "make_kl_sets"),
    "training": ("pair_logprobs", "js_divergence", "fairness_terms",
                 "fairness_loss", "step_in_parts", "pair_preference_ss", "dev_stats", "TrainResult", "train", "ftl_patch", "choices"),
    "biascope": ("BiaScopeSet", "score_pairs", "attach_original", "PAIR_PROTOCOL", "PS_PROTOCOL", "CROWS_PROTOCOL",
                 "RS_PROTOCOL"),
    "method": ("Fast", "build_eval_sets", "split_of", "spec_from_def"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
