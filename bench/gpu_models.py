"""Models the GPU check builds on the GPU machine itself (issue 16): nothing there can be downloaded, and what
travels to it is capped (64 MiB with the repository), so the default model's 94 MB GGUF cannot go.

* :func:`random_like` — a random-weight checkpoint with a real model's config, tokenizer and chat template
  (``bench/gpu_prepare.py`` copies those small files, no weights, into ``.gpu/smollm2-shape``). The kernels, the
  scoring modes, the memory and the throughput are those of the default model's shape; its predictions are a
  random model's, so "same prediction share" compares near-random choices (stated in the results).
* :func:`attribution_7b` — a random Llama-2-7B-shaped model built directly on the GPU in bf16, and CRISPR's
  attribution (``bias_scores``) over real BBQ instances with each memory switch: the measurement
  ``bench/attribution_7b.py`` could only extrapolate on the CPU.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


def random_like(shape_dir: Path, out: Path, seed: int = 0) -> Path:
    """A float32 random-weight checkpoint (seeded) in ``out`` with ``shape_dir``'s config and tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if out.exists():
        shutil.rmtree(out)
    cfg = AutoConfig.from_pretrained(shape_dir, trust_remote_code=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    model.save_pretrained(out)
    for name in SHAPE_FILES:
        if name != "config.json" and (shape_dir / name).is_file():
            shutil.copy2(shape_dir / name, out / name)
    return out


SETTINGS_7B = [("ffn", False, None), ("ffn", True, None), ("ffn", True, 1), ("linear", True, 1), ("linear", False, None)]


def attribution_7b(dev: str, tok_dir: Path, items: list, smoke: bool) -> dict:
    """Peak GPU memory above the weights and seconds per instance of CRISPR's attribution (letter protocol, the
    default token budget of 1,024 tokens per pass) on a random bf16 model of Llama-2-7B's layer shape (hidden
    4,096, FFN 11,008, 32 layers and heads; the carried tokenizer's vocabulary), with each memory switch. The
    ``linear`` sites without a switch come last: they may not fit, which is reported, not hidden."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from biaslab.methods import METHODS
    from biaslab.methods.crispr.scores import bias_scores
    from biaslab.models import LanguageModel

    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    shape = (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4) if smoke else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32))
    cfg = LlamaConfig(vocab_size=len(tok), num_key_value_heads=shape["num_attention_heads"],
                      max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    lm = LanguageModel(model, tok, spec="random-llama-7b-shape", fingerprint="sha256:random-llama-7b-shape")
    built_s = time.perf_counter() - t
    cuda = dev == "cuda"
    if cuda:
        torch.cuda.synchronize()
        weights_gb = torch.cuda.memory_allocated() / 2**30
    rows = []
    m = METHODS.get("crispr")()
    for sites, ckpt, per_pass in SETTINGS_7B:
        cfgc = m.make_config({"neurons": 3, "instructions": 1, "sites": sites, "checkpoint_layers": ckpt,
                              "layers_per_pass": per_pass})
        row = {"sites": sites, "checkpoint_layers": ckpt, "layers_per_pass": per_pass}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            bias_scores(lm, items, [0], cfgc)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            continue
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
            row.update(peak_gpu_mem_gb=round(peak, 2), above_weights_gb=round(peak - weights_gb, 2),
                       fits_80gb=peak < 80)
        row["s_per_instance"] = round((time.perf_counter() - t) / len(items), 4)
        rows.append(row)
        print(f"  7B attribution {row}", flush=True)
    return {"params": n_params, "built_s": round(built_s, 1), "dtype": "bfloat16", "instances": len(items),
            "weights_gpu_gb": round(weights_gb, 2) if cuda else None, "shape": shape | {"vocab": len(tok)},
            "weights": "random (seed 0): memory and time depend on the shape only", "rows": rows}
