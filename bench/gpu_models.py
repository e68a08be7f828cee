"""Models the GPU check builds on the GPU machine itself (issue 16): nothing there can be downloaded, and what
travels to it is capped (64 MiB with the repository), so the default model's 94 MB GGUF cannot go.

* :func:`random_like` — a random-weight checkpoint with a real model's config, tokenizer and chat template
  (``bench/gpu_prepare.py`` copies those small files, no weights, into ``.gpu/smollm2-shape``). The kernels, the
  scoring modes, the memory and the throughput are those of the default model's shape; its predictions are a
  random model's, so "same prediction share" compares near-random choices (stated in the results).
* :func:`attribution_7b` — a random Llama-2-7B-shaped model built directly on the GPU in bf16, and CRISPR's
  attribution (``bias_scores``) over real BBQ instances with each memory switch: the measurement
  ``bench/attribution_7b.py`` could only extrapolate on the CPU.
* :func:`moe_check` — a random Mixtral-shaped model built on the GPU: the MoE path (``models/experts.py``) in bf16
  on the model's own CUDA experts kernel.
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


def split_map(lm, first) -> dict:
    """A device map with the embeddings, the LM head (tied to them) and the first half of the layers on ``first``,
    the second half and the final norm on the CPU: on a one-GPU machine, a model spread over two devices."""
    n = lm.model.config.num_hidden_layers
    dm = {"model.embed_tokens": first, "model.rotary_emb": first, "lm_head": first, "model.norm": "cpu"}
    dm.update({f"model.layers.{i}": first if i < n // 2 else "cpu" for i in range(n)})
    return dm


def split_device_check(spec: str, dev: str, reqs: list, owner: list, inst: list) -> dict:
    """The cross-device paths of ``--device-map`` (tests/test_device_map.py checks the pieces on CPU): the same
    model in float32 on one device and split between the GPU and the CPU (:func:`split_map`) — scoring in each mode
    (and which mode the self-check picks), CRISPR attribution, and a FAST stamp on a layer of the second device."""
    import json

    import torch

    from biaslab.methods import METHODS
    from biaslab.methods.crispr.scores import bias_scores
    from biaslab.methods.fast.stamp import StampFFN, attach_stamp, stamp_device
    from biaslab.models import load_model

    one = load_model(spec, device=dev, dtype="float32")
    dm = split_map(one, 0 if dev == "cuda" else "cpu")
    split = load_model(spec, dtype="float32", device_map=json.dumps(dm))
    from gpu_check import argmax_per_item, score_mode   # the check's own scoring helpers (imported when it runs)

    out = {"device_map": {"first_half": dm["model.layers.0"], "second_half": "cpu"},
           "placed": sorted({str(p.device) for p in split.model.parameters()}),
           "auto_scoring_mode": split.scoring_mode(), "modes": []}
    for mode in ("tree", "dense", "padded"):
        got = {}
        for name, lm in (("one", one), ("split", split)):
            try:
                got[name] = score_mode(lm, reqs, mode)
            except Exception as e:   # reported, not hidden
                got[name] = f"{type(e).__name__}: {e}"[:300]
        row = {"mode": mode}
        if all(isinstance(v, list) for v in got.values()):
            row.update(max_abs_dlogprob=max(abs(x - y) for x, y in zip(got["one"], got["split"])),
                       same_predictions=argmax_per_item(owner, got["one"]) == argmax_per_item(owner, got["split"]))
        else:
            row["errors"] = {k: v for k, v in got.items() if isinstance(v, str)}
        out["modes"].append(row)
    for lm in (one, split):
        lm.packing, lm.tree_attention, lm._mode_checked = None, None, {}
    cfg = METHODS.get("crispr")().make_config({"neurons": 3, "instructions": 1})
    try:
        a, _ = bias_scores(one, inst, [0], cfg)
        b, _ = bias_scores(split, inst, [0], cfg)
        rel = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in a)
        top = lambda s: set(torch.cat(list(s.values())).topk(10).indices.tolist())  # noqa: E731
        out["attribution"] = {"max_rel_diff": rel, "top10_overlap": len(top(a) & top(b))}
    except Exception as e:
        out["attribution"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    layer = one.model.config.num_hidden_layers - 1   # on the CPU in the split model
    torch.manual_seed(0)
    stamp = StampFFN(one.model.config.hidden_size, 4, "relu", "normal")
    torch.nn.init.normal_(stamp.w2.weight, std=0.05)
    lps = {}
    for name, lm in (("one", one), ("split", split)):
        h = attach_stamp(lm, layer, stamp.to(stamp_device(lm, layer)))
        try:
            lps[name] = [r.logprob for r in lm.loglikelihood(reqs[:32], desc=f"stamp {name}")]
        except Exception as e:
            lps[name] = f"{type(e).__name__}: {e}"[:300]
        finally:
            h.remove()
    out["stamp"] = ({"layer_device": str(stamp_device(split, layer)),
                     "max_abs_dlogprob": max(abs(x - y) for x, y in zip(lps["one"], lps["split"]))}
                    if all(isinstance(v, list) for v in lps.values()) else {"errors": lps})
    return out


def plan_check(spec: str, dev: str) -> dict:
    """``biaslab env --model``'s placement plan against the load it plans: the model (float32) capped to about half
    its weights on the GPU (the rest on the CPU, ``sequential``), planned on the meta device, then loaded with the
    same map and caps — bytes per device in each. On the CPU smoke: ``auto``, all on the CPU."""
    import itertools

    from biaslab.models import load_model
    from biaslab.models.plan import plan_placement

    kw = {"device_map": "auto"}
    if dev == "cuda":
        full = plan_placement(spec, dtype="float32")["weights_bytes"]
        kw = {"device_map": "sequential", "max_memory": f"0={full // 2},cpu=64GiB"}
    out = {"args": kw}
    try:
        plan = plan_placement(spec, dtype="float32", **kw)
        lm = load_model(spec, dtype="float32", **kw)
        placed: dict[str, int] = {}
        for _, t in itertools.chain(lm.model.named_parameters(), lm.model.named_buffers()):
            placed[str(t.device)] = placed.get(str(t.device), 0) + t.numel() * t.element_size()
        out.update(planned={d: v["bytes"] for d, v in plan["devices"].items()}, loaded=placed, fits=plan["fits"])
        out["same_devices"] = set(out["planned"]) == set(placed)
        out["max_rel_diff"] = max(abs(out["planned"].get(d, 0) - b) / b for d, b in placed.items())
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def moe_check(dev: str, tok_dir: Path, reqs: list, owner: list, inst: list, smoke: bool) -> dict:
    """A random Mixtral-shaped model built on the device (the carried tokenizer's vocabulary): bf16 tree-attention
    scoring against float32 padded, biaslab's recomputation of the fused experts against the model's own kernel in
    bf16 (the check attribution makes once per layer, tolerance 5 % of the output's scale), and CRISPR's
    attribution over every expert's neurons — seconds per instance and peak memory, with and without checkpointing."""
    import copy

    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from biaslab.methods import METHODS
    from biaslab.methods.crispr.scores import bias_scores
    from biaslab.models import LanguageModel
    from biaslab.models.experts import recompute

    from gpu_check import argmax_per_item, score_mode, sync   # the check's own helpers

    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    shape = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4) if smoke else
             dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16))
    cfg = MixtralConfig(vocab_size=len(tok), num_key_value_heads=shape["num_attention_heads"], num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(dev):
        ref_model = MixtralForCausalLM(cfg).eval()
    model = copy.deepcopy(ref_model).to(torch.bfloat16)
    out = {"shape": shape | {"experts": 8, "top_k": 2, "vocab": len(tok)},
           "experts_implementation": model.config._experts_implementation,
           "weights": "random (seed 0): the kernels' and memory's check, not a real model's predictions"}
    sub = [k for k in range(len(reqs)) if owner[k] < 40]
    ref = score_mode(LanguageModel(ref_model, tok, spec="moe-fp32", fingerprint="sha256:moe"),
                     [reqs[k] for k in sub], "padded")
    del ref_model
    lm = LanguageModel(model, tok, spec="random-mixtral-shape", fingerprint="sha256:random-mixtral-shape")
    got = score_mode(lm, [reqs[k] for k in sub], "tree")
    sync()
    own = [owner[k] for k in sub]
    out["scoring_bf16_tree_vs_fp32_padded"] = {
        "requests": len(sub), "scoring_mode": lm.scoring_mode(),
        "same_prediction_share": sum(p == q for p, q in zip(argmax_per_item(own, got), argmax_per_item(own, ref)))
        / len(set(own)), "max_abs_dlogprob": max(abs(x - y) for x, y in zip(got, ref))}
    seen = {}
    mod = model.model.layers[0].mlp.experts
    hk = mod.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o))
    with torch.no_grad():
        model(torch.tensor([lm.encode("The nurse told the doctor that the results were ready.")], device=dev))
    hk.remove()
    with torch.no_grad():
        mine = recompute(mod, *seen["args"])
    out["recompute_rel_error_bf16"] = float((mine - seen["out"]).abs().max() / seen["out"].abs().max())
    m = METHODS.get("crispr")()
    out["attribution"] = []
    for ckpt in (False, True):
        cfgc = m.make_config({"neurons": 3, "instructions": 1, "checkpoint_layers": ckpt})
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            bias_scores(lm, inst, [0], cfgc)
        except Exception as e:   # noqa: BLE001 - reported, not hidden
            out["attribution"].append({"checkpoint_layers": ckpt, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        sync()
        out["attribution"].append({"checkpoint_layers": ckpt, "instances": len(inst),
                                   "s_per_instance": round((time.perf_counter() - t) / len(inst), 4),
                                   "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                   if dev == "cuda" else None})
    return out
