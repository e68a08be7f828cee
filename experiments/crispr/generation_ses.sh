#!/usr/bin/env bash
# CRISPR under the released code's default evaluation (--protocol generation: greedy ≤ 16 tokens, exact match,
# no match = wrong) on BBQ-SES — the paper's headline category, here regenerated from the authors' templates —
# on the default model. A fixed, small neuron count (no search) and one random-pruning control keep it to CPU
# minutes; it shows the protocol on a real model (how often the model's answer is an option verbatim), not a
# tuned result.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${B:-.venv/bin/biaslab}
$B mitigate crispr --task bbq:SES --protocol generation --neurons 4 --instructions 3 --dev-size 20 \
   --control-seeds 1 --no-constant-controls --no-retention --limit 150 --out runs/default/crispr-ses-generation \
   --format markdown -q > experiments/crispr/generation_ses.md
.venv/bin/python - <<'PY'
import json
with open("experiments/crispr/generation_ses.md", "a") as f:
    for state in ("before", "after"):
        recs = [json.loads(l) for l in open(f"runs/default/crispr-ses-generation/{state}/records.jsonl") if '"pred"' in l]
        n = len(recs); unmatched = sum(r["pred"] is None for r in recs)
        f.write(f"\n{state.capitalize()} the patch, {unmatched} of {n} greedy answers ({unmatched / n:.1%}) matched no "
                "option exactly (counted wrong, as the released code does).\n")
PY
cat >> experiments/crispr/generation_ses.md <<'TXT'

Reading: on a 135M chat model the released code's strict protocol mostly scores *format*. Three answers in four
restate the options or add words ("The server, Not answerable, The pharmacist…"), and they count as wrong. The
4-neuron patch's gain (+0.064 [0.031, 0.102]; the random-pruning control changes nothing) comes with 99 fewer
unmatched answers (338 → 239 of 450). It is mostly the model emitting an option verbatim more often, not less bias:
both bias scores show no detectable change. This is why biaslab's default CRISPR protocols score the answer
distribution (`letter`, `cloze`, `option-loglik`) rather than generated text.
TXT
cat experiments/crispr/generation_ses.md
