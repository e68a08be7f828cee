"""SR_LLM — a LoRA instruction-tuned rewriter of biased text (Raza et al. 2024, arXiv 2404.01399;
docs/methods/srllm.md).

Modules: :mod:`.config` (settings, the prompt), :mod:`.data` (the rewrite pairs and their split), :mod:`.lora` (the
training format and the ``lora`` patch), :mod:`.training` (the fit and its data parallelism), :mod:`.rewriting`
(rewriting and its records), :mod:`.embedding` (the sentence embedder of content preservation), :mod:`.method` (the
registered method). Names are re-exported lazily.
"""
from __future__ import annotations

from ...registry import lazy_exports

_EXPORTS = {
    "config": ("SRLLMConfig", "SYSTEM_PROMPT", "INSTRUCTION", "PROTOCOL_ID"),
    "lora": ("build_prompt", "eos_id", "encode_example", "encode_pairs", "collate", "completion_loss", "inject_lora",
             "remove_lora", "lora_weights", "LoraPatch"),
    "training": ("validation_loss", "batch_gradients", "TrainResult", "train_lora"),
    "rewriting": ("RewriteOutput", "rewrite", "rewrite_shared", "evaluate_rewriter", "with_cosines"),
    "embedding": ("SentenceEmbedder", "embedding_model_dir"),
    "method": ("SRLLM", "rewrite_metrics", "RETENTION_BENCHES"),
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
