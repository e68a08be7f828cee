#!/usr/bin/env bash
# CRISPR experiments on the default model (issue 3). CPU-frugal: one thread each, nice, sized for a shared
# 2-core machine. The three jobs may run concurrently; collect.py gathers the committed outputs.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/crispr/env.sh
export PYTHONUNBUFFERED=1
B=.venv/bin/biaslab
# 1. SST-2 (label bias "always positive"): n by golden-section search on 20 dev items × 3 instructions
nice -n 10 $B mitigate crispr --model smollm2-135m-instruct --task sst2 --instructions 3 --search \
    --search-dev-limit 20 --test-limit 40 --control-seeds 3 --retention-limit 12 --out runs/crispr-sst2 &
# 2. BBQ Age, cheaper (BBQ prompts are ~1.5x longer): 2 instructions, n in [0, 40], 15 dev items per step,
#    48 test items, retention measured in run 1 only
nice -n 10 $B mitigate crispr --model smollm2-135m-instruct --task bbq:Age --instructions 2 --search --search-max 40 \
    --search-dev-limit 15 --test-limit 48 --control-seeds 3 --no-retention --out runs/crispr-bbq-age &
# 3. ablations on SST-2 (attribution starts at once; evaluation waits for run 1's chosen n)
nice -n 10 .venv/bin/python experiments/crispr/ablations.py --run runs/crispr-sst2 &
wait
# 4. other-task retention: each task's patch on the other task's test items
nice -n 10 .venv/bin/python experiments/crispr/cross_task.py
nice -n 10 .venv/bin/python bench/crispr_attribution.py --items 1 --rss-items 8 --ig-layers 2 --out bench/results/crispr_attribution.json
.venv/bin/python experiments/crispr/collect.py
