#!/usr/bin/env bash
# BBQ on the default model under the letter, option-loglik and generate protocols, side by side, on the same 220
# items (seeded, stratified over the 11 categories × 2 context conditions; 3 instructions). Seven categories are the
# upstream files; SES, Race_ethnicity, Race_x_SES and Race_x_gender are regenerated from the authors' templates
# (`biaslab bbq-generate`), and the per-category table says which is which.
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
extra = {p: json.load(open(f"runs/default/bbq-{p}/results.json"))["benchmarks"]["bbq"]["extra"] for p in rows}
src = extra["letter"]["sources"]
per = ["| category (source) | items | accuracy: letter | option-loglik | generate | s_DIS: letter | option-loglik | generate |",
       "|---|---|---|---|---|---|---|---|"]
g = lambda d, m: "–" if d.get(m) is None or d[m] != d[m] else f"{d[m]:.2f}"
for row in sorted(extra["letter"]["by_category_and_label_type"]):
    cat = row.split(" (")[0]
    cells = [extra[p]["by_category_and_label_type"].get(row, {}) for p in rows]
    label = "regenerated" if src[cat]["label"].startswith("regenerated") else "upstream"
    per.append(f"| {row} ({label}) | {cells[0].get('n_items', 0)} | " + " | ".join(g(c, "accuracy") for c in cells)
               + " | " + " | ".join(g(c, "bias_score_disambig") for c in cells) + " |")
head = ("BBQ, default model, 220 items × 3 instructions, all 11 categories (`bash experiments/bbq_protocols.sh`); "
        "intervals: 95 % paired cluster bootstrap over items\n\n")
tail = ("\n\nPer category and label type (the paper's rows; ~10 items each, so these are small-n: the mean over "
        "the 3 instructions, no interval; s_DIS × 100, – where undefined)\n\n")
open("experiments/bbq_protocols.md", "w").write(head + "\n".join(out) + tail + "\n".join(per) + "\n")
print("\n".join(out)); print("\n".join(per))
PY
