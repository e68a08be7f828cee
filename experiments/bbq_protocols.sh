#!/usr/bin/env bash
# BBQ on the default model under the letter, option-loglik and generate protocols, side by side, on the same 220
# items (seeded, stratified; 3 instructions). Only the 7 vendored categories exist (the 4 regenerated from the
# authors' templates are not built yet), so `--bench bbq` covers 7, not 11.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-.venv/bin/biaslab}
for p in letter option-loglik generate; do
  $B audit --bench bbq --protocol bbq=$p --limit 220 --out runs/default/bbq-$p --format csv -q > /tmp/bbq-$p.csv
done
.venv/bin/python - <<'PY'
import csv, json
rows = {}
for p in ("letter", "option-loglik", "generate"):
    res = json.load(open(f"runs/default/bbq-{p}/results.json"))["benchmarks"]["bbq"]
    rows[p] = {m: (v["value"], v.get("ci95")) for m, v in res["metrics"].items()}
    rows[p]["n"] = res["n_items"]
metrics = ["accuracy", "accuracy_ambig", "accuracy_disambig", "bias_score_ambig", "bias_score_disambig", "unmatched_rate"]
f = lambda v: "–" if v is None else (f"{v[0]:.3f} [{v[1][0]:.3f}, {v[1][1]:.3f}]" if v[1] else f"{v[0]:.3f}")
out = ["| metric | letter (bbq.letter.v2) | option-loglik (bbq.option-loglik.v2) | generate (bbq.generate.v1) |",
       "|---|---|---|---|"]
for m in metrics:
    out.append(f"| {m} | " + " | ".join(f(rows[p].get(m)) if m in rows[p] else "0 (scoring protocol)" for p in rows) + " |")
open("experiments/bbq_protocols.md", "w").write("BBQ, default model, 220 items × 3 instructions, 7 categories\n\n" + "\n".join(out) + "\n")
print("\n".join(out))
PY
