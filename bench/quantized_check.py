"""What biaslab does with a pre-quantized checkpoint (bitsandbytes 4-bit nf4), on this CPU — the facts behind
docs/SCALE.md "A quantized checkpoint" and ``biaslab.models.quantized``.

    python bench/quantized_check.py --bnb DIR [--out bench/results/quantized_cpu.json]

DIR holds bitsandbytes (biaslab does not depend on it; e.g. ``pip install --no-deps --target DIR
bitsandbytes==0.50.2``). The script writes a random-weight Qwen2 checkpoint (no download; the default model's
tokenizer), quantizes it with bitsandbytes 4-bit and saves it, then records:

1. ``biaslab audit`` on it with and without bitsandbytes importable (scores, or one line naming the library);
2. ``biaslab mitigate crispr`` on it (refused in one line before the weights load);
3. biaslab's activation × gradient called directly on the loaded quantized model, past that refusal: what the
   library does with gradients on (the reason for the refusal).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM
from biaslab.models.loading import embedded_model_dir
src, dst = sys.argv[1:3]
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m-instruct"))
tok.save_pretrained(src)
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, device_map="cpu")
print(type(m.model.layers[0].mlp.down_proj).__name__)
m.save_pretrained(dst)
tok.save_pretrained(dst)
"""

ATTRIBUTE = r"""
import sys
from biaslab.attribution import activation_x_gradient
from biaslab.models import load_model
lm = load_model(sys.argv[1], progress=False)
ids = lm.tokenizer("The nurse said that", add_special_tokens=False)["input_ids"]
try:
    s = activation_x_gradient(lm, [ids], [ids[-1]], sites="ffn")
    print("attribution ran:", {k: tuple(v.shape) for k, v in list(s.items())[:1]})
except Exception as e:
    print("attribution failed:", type(e).__name__, str(e).splitlines()[0][:200])
"""


def run(cmd, env) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    err = [x for x in p.stderr.splitlines() if x.strip()]
    return {"rc": p.returncode, "stdout_tail": p.stdout.strip().splitlines()[-3:], "stderr_last": err[-1:] if err else []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bnb", required=True, help="a directory holding bitsandbytes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantized_cpu.json"))
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="biaslab-quant-"))
    base = {**os.environ, "BIASLAB_CACHE": str(tmp / "cache"), "BIASLAB_PROGRESS": "0"}
    with_bnb = {**base, "PYTHONPATH": os.pathsep.join([a.bnb, base.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    py, q = sys.executable, tmp / "q4"
    made = run([py, "-c", MAKE, str(tmp / "bf16"), str(q)], with_bnb)
    version = subprocess.run([py, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"], env=with_bnb,
                             capture_output=True, text=True).stdout.strip()
    audit = [py, "-m", "biaslab", "audit", "--model", str(q), "--bench", "crows", "--limit", "20", "--format", "json",
             "-q"]
    res = {"bitsandbytes": version, "checkpoint": made,
           "audit_with_bitsandbytes": run(audit + ["--out", str(tmp / "a1")], with_bnb),
           "audit_without_bitsandbytes": run(audit + ["--out", str(tmp / "a2")], base),
           "mitigate_crispr": run([py, "-m", "biaslab", "mitigate", "crispr", "--model", str(q), "--task",
                                   "bbq:Gender_identity", "--neurons", "2", "--limit", "20", "--out", str(tmp / "m")],
                                  with_bnb),
           "attribution_past_the_refusal": run([py, "-c", ATTRIBUTE, str(q)], with_bnb)}
    results = tmp / "a1" / "results.json"
    if results.is_file():   # the scores, with their intervals
        res["audit_with_bitsandbytes"]["crows"] = json.loads(results.read_text())["benchmarks"]["crows"]["metrics"]
    manifest = tmp / "a1" / "manifest.json"
    if manifest.is_file():
        res["manifest_model"] = {k: v for k, v in json.loads(manifest.read_text())["model"].items()
                                 if k in ("quantization", "fingerprint_kind", "dtype", "architecture")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1).replace(str(tmp), "TMP")   # the scratch directory's name varies
    Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
