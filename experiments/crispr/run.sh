#!/usr/bin/env bash
# CRISPR experiments on the default model (issue 3), as run for experiments/crispr/results.md. CPU-frugal: one
# thread each, nice; sized for a 2-core machine shared by the whole team (load average 7-10 during the runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/crispr/env.sh
export PYTHONUNBUFFERED=1
B=.venv/bin/biaslab
# 1. SST-2 (label bias "always positive"): n by golden-section search on 20 dev items x 3 instructions.
#    The search chose n = 0 (see sst2/search.json), so the test evaluation was stopped (after = before).
nice -n 10 $B mitigate crispr --model smollm2-135m-instruct --task sst2 --instructions 3 --search \
    --search-dev-limit 20 --test-limit 40 --control-seeds 3 --retention-limit 12 --out runs/crispr-sst2 || true
nice -n 10 .venv/bin/python experiments/crispr/sst2_dev_probe.py          # dev-only: what n = 1, 2, 3, ... do
# 2. BBQ Age, cheaper (BBQ prompts are ~1.5x longer): 2 instructions, n in [0, 40], 15 dev items per step,
#    48 test items; retention measured separately (step 4)
nice -n 10 $B mitigate crispr --model smollm2-135m-instruct --task bbq:Age --instructions 2 --search --search-max 40 \
    --search-dev-limit 15 --test-limit 48 --control-seeds 3 --no-retention --out runs/crispr-bbq-age
# 3. ablations on BBQ Age at the n chosen there, same test items
nice -n 10 .venv/bin/python experiments/crispr/ablations.py --run runs/crispr-bbq-age
# 4. retention of the BBQ-Age patch: crows, stereoset, retention (40 items each) + SST-2 accuracy (40 test items)
nice -n 10 .venv/bin/python experiments/crispr/retention.py --run runs/crispr-bbq-age --limit 40
# 5. attribution cost / agreement benchmark
nice -n 10 .venv/bin/python bench/crispr_attribution.py --items 1 --rss-items 8 --ig-layers 2 --out bench/results/crispr_attribution.json
.venv/bin/python experiments/crispr/collect.py
