"""Tiny random models of every family users bring, built from configs in the test (no download): the model
zoo of the family contract suite (tests/test_families.py)."""
from __future__ import annotations

import torch

from conftest import default_tokenizer

WINDOW = 8   # the sliding window of the families that have one: short, so a test sequence exceeds it


def _common(tok):
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def make(family: str, seed: int = 0):
    import transformers as T

    tok = default_tokenizer()
    c = _common(tok)
    dec = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, **c)
    cfgs = {
        "llama": lambda: T.LlamaConfig(**dec, tie_word_embeddings=True),
        "qwen2": lambda: T.Qwen2Config(**dec, use_sliding_window=False),
        "qwen3": lambda: T.Qwen3Config(**dec, head_dim=8),
        "mistral": lambda: T.MistralConfig(**dec, sliding_window=WINDOW, head_dim=8),
        "gemma2": lambda: T.Gemma2Config(**dec, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=50.0,
                                         final_logit_softcapping=30.0, query_pre_attn_scalar=8),
        "gemma3": lambda: T.Gemma3TextConfig(**{**dec, "num_hidden_layers": 3}, head_dim=8, sliding_window=WINDOW,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                             query_pre_attn_scalar=8),
        "phi3": lambda: T.Phi3Config(**dec),
        "mixtral": lambda: T.MixtralConfig(**dec, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**dec, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=48, decoder_sparse_step=1),
        "olmoe": lambda: T.OlmoeConfig(**dec, num_experts=4, num_experts_per_tok=2),   # tests/test_moe.py only
        "phimoe": lambda: T.PhimoeConfig(**dec, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**dec, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                              shared_expert_intermediate_size=40, decoder_sparse_step=1),
        "deepseek_v3": lambda: T.DeepseekV3Config(**{**dec, "num_key_value_heads": 4}, n_routed_experts=4,
                                                  num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24,
                                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                                                  topk_group=1),
        "deepseek_v2": lambda: T.DeepseekV2Config(**{**dec, "num_key_value_heads": 4}, n_routed_experts=4,
                                                  num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24,
                                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                                                  topk_group=1),
        "qwen3_moe_dense0": lambda: T.Qwen3MoeConfig(**dec, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=24, mlp_only_layers=[0]),   # layer 0 dense
        "cohere": lambda: T.CohereConfig(**dec, logit_scale=0.0625),      # AFTER_HEAD only: × logit_scale
        "granite": lambda: T.GraniteConfig(**dec, logits_scaling=8.0),    # AFTER_HEAD only: ÷ logits_scaling
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **c),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=256, **c),
        "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=32, max_position_embeddings=256, **c),
    }
    cfg = cfgs[family]()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    return model, tok


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "gpt2",
            "gpt_neox", "opt")

MOE = ("mixtral", "qwen3_moe")   # mixture-of-experts: fused experts, FFN sites per expert (models.experts)
# more MoE layouts, in tests/test_moe.py (not the whole family suite)
MOE_ONLY = ("olmoe", "phimoe", "qwen2_moe", "qwen3_moe_dense0", "deepseek_v2", "deepseek_v3")
ALL_MOE = MOE + MOE_ONLY

AFTER_HEAD = ("cohere", "granite", "gemma2")   # a step after the head: × scale, ÷ scale, soft-cap (models.head.after_head)


def make_doubling_llama():
    """The tiny llama with its logits doubled after the head inside its forward: a step after the head that
    biaslab does not know (models.head.after_head)."""
    import transformers as T

    class DoublingLlama(T.LlamaForCausalLM):
        def forward(self, input_ids=None, logits_to_keep=0, **k):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **k)
            out.logits = out.logits * 2
            return out

    llama, tok = make("llama")
    model = DoublingLlama(llama.config).eval()
    model.load_state_dict(llama.state_dict())
    return model, tok


STAMP_EXPORTS = ("llama", "gpt2", "gpt_neox")   # families whose MLP can hold a stamp exactly (biased MLP, own act)


def stamp_export_outcome(family: str, out) -> str:
    """Fit-free check that a stamp with the family's own MLP activation (and random, non-zero weights) exports to a
    plain transformers model with the stamped model's logits: "yes", or "no: <the one-line reason>"."""
    from biaslab.errors import BiaslabError
    from biaslab.methods.fast.stamp import MODEL_ACTIVATION, StampFFN, StampPatch
    from biaslab.models import LanguageModel

    model, tok = make(family)
    lm = LanguageModel(model, tok, spec=f"tiny-{family}", chat_template=False, progress=False)
    cfg = model.config
    act = MODEL_ACTIVATION.get(str(getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
                                   or getattr(cfg, "activation_function", None)), "relu")
    torch.manual_seed(0)
    st = StampFFN(cfg.hidden_size, 4, act)
    with torch.no_grad():
        st.w2.weight.normal_(0, 0.2)
        st.w2.bias.normal_(0, 0.2)
    patch = StampPatch.from_stamp(lm, st, layer=1, activation=act)
    try:
        patch.export(lm, out)    # verifies the reloaded model's logits against the stamped model
    except BiaslabError as e:
        return f"no: {e}"
    return "yes"


def upcycle(dense, n_experts: int = 4, top_k: int = 2, seed: int = 0):
    """A Mixtral made from a Llama model by sparse upcycling: every expert a copy of its layer's FFN, a random
    router, the rest copied. The router's top-k weights sum to 1, so it computes the dense model's function, and
    a dense neuron's attribution (summed over positions) is the sum of its copies' — a check on the MoE sites
    with a real model's weights (experiments/moe/upcycled.py)."""
    import transformers as T

    c = dense.config
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")
    cfg = T.MixtralConfig(**{k: getattr(c, k) for k in keep if getattr(c, k, None) is not None},
                          num_local_experts=n_experts, num_experts_per_tok=top_k, sliding_window=None)
    torch.manual_seed(seed)
    moe = T.MixtralForCausalLM(cfg).to(dense.dtype).eval()
    own = dense.state_dict()
    with torch.no_grad():
        for k, v in moe.state_dict().items():
            if k in own:
                v.copy_(own[k])
        for layer, mixed in zip(dense.model.layers, moe.model.layers):
            mlp, ex = layer.mlp, mixed.mlp.experts
            ex.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).expand_as(ex.gate_up_proj))
            ex.down_proj.copy_(mlp.down_proj.weight.expand_as(ex.down_proj))
    return moe
