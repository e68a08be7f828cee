#!/usr/bin/env bash
# CRISPR vs the paper's baselines — contextual calibration (CC), domain-context calibration (DC) — and the random
# control, on the same held-out items with paired intervals (issue 17, part 4), on the default model.
# 1. SST-2, the `make demo` preset (cloze protocol, 100 test items x 3 instructions, n by dev search)
# 2. BBQ Age, letter protocol, 1 instruction, 200 test items, n = 18 (the n the v2 dev search chose for this task,
#    experiments/crispr/bbq_age), attribution on 32 dev instances
# Outputs: runs/crispr-baselines-*/ and the markdown tables in experiments/crispr/baselines_*.md
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${B:-.venv/bin/biaslab}
export BIASLAB_PROGRESS_EVERY=60
$B mitigate crispr --config demo --baselines cc,dc --no-retention --out runs/crispr-baselines-sst2 \
   --format markdown > experiments/crispr/baselines_sst2.md
$B mitigate crispr --task bbq:Age --protocol letter --instructions 1 --neurons 18 --dev-size 32 --limit 200 \
   --control-seeds 3 --baselines cc,dc --no-retention --out runs/crispr-baselines-bbq-age \
   --format markdown > experiments/crispr/baselines_bbq_age.md
