"""Shared fixtures: a tiny random Llama built in the test (no download), and the real default model (cached)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("BIASLAB_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 32, ffn: int = 48, vocab_size: int | None = None):
    """A random-weight Llama with the real default model's tokenizer (so chat templates work)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = default_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


_TOK = None


def default_tokenizer():
    """The default model's tokenizer, loaded from the converted cache (converting once if needed)."""
    global _TOK
    if _TOK is None:
        from transformers import AutoTokenizer

        from biaslab.models.loading import embedded_model_dir

        _TOK = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m-instruct"))
    return _TOK


@pytest.fixture
def tiny_lm():
    from biaslab.models import LanguageModel

    model, tok = make_tiny_llama()
    return LanguageModel(model, tok, spec="tiny-llama")


@pytest.fixture(scope="session")
def real_lm():
    from biaslab.models import load_model

    return load_model("smollm2-135m-instruct")
