#!/usr/bin/env bash
# CRISPR experiments on the default model (issue 3), prompt layout v2, as run for experiments/crispr/results.md.
# CPU-frugal: one thread, nice, one job at a time (2-core machine shared by the team; ~90 CPU-minutes in total).
# Both tasks: golden-section search of n in [0, 32] with the dev objective accuracy+goldprob (dev accuracy, ties
# broken by the mean gold-option probability: dev accuracy is flat in n when the model answers one letter for
# everything); 200 held-out test items; 3 random-control seeds. CPU forced 1 instruction (of 10) per task.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/crispr/env.sh
export PYTHONUNBUFFERED=1
B=.venv/bin/biaslab
COMMON=(--model smollm2-135m-instruct --search --search-max 32 --search-objective accuracy+goldprob
        --limit 200 --control-seeds 3 --no-retention)
# 1. SST-2 (label bias "always positive"): 1 instruction, attribution on 32 dev instances, 40 dev items per step
#    (when the search keeps n = 0 the patch is empty, so 'after' and the controls reuse the 'before' records)
nice -n 10 $B mitigate crispr --task sst2 "${COMMON[@]}" --instructions 1 --dev-size 32 --search-dev-limit 40 \
    --out runs/crispr-v2-sst2
# 1b. dev-only grid n ∈ {1..8} (the search never looked below 12): best n on dev is still 0, so no test run follows
nice -n 10 .venv/bin/python experiments/crispr/sst2_dev_grid.py
# 2. BBQ Age (prompts ~1.4x longer): 1 instruction, attribution on 32 dev instances, 32 dev items per step
nice -n 10 $B mitigate crispr --task bbq:Age "${COMMON[@]}" --instructions 1 --dev-size 32 --search-dev-limit 32 \
    --out runs/crispr-v2-bbq-age
# 3. retention of the BBQ-Age patch: crows, stereoset, retention (100 items each) + SST-2 accuracy (100 test items)
nice -n 10 .venv/bin/python experiments/crispr/retention.py --run runs/crispr-v2-bbq-age --limit 100 --other-limit 100
# 4. ablations (max→mean, no confusion weighting, no skill disentanglement) on BBQ Age at the chosen n
nice -n 10 .venv/bin/python experiments/crispr/ablations.py --run runs/crispr-v2-bbq-age
# 5. instruction robustness of the BBQ-Age patch: the same test items under instruction 1 too (before / after)
nice -n 10 .venv/bin/python experiments/crispr/second_instruction.py --run runs/crispr-v2-bbq-age --add 1
# 6. POST-HOC (decided after seeing step 2's CI include 0): the same BBQ patch and controls on 600 test items
nice -n 10 .venv/bin/python experiments/crispr/extend_test.py --run runs/crispr-v2-bbq-age --limit 600 --control-seeds 3
.venv/bin/python experiments/crispr/collect.py
# 7. CONFIRMATORY (session 3, 2026-12-01; pre-specified before scoring: primary = accuracy, success = the 95 % CIs of
#    after - before and of CRISPR - control both exclude 0): the committed BBQ-Age patch and its 3 controls, unchanged,
#    on 600 test items never scored before (the test split minus step 6's 600-item sample; seed 1)
nice -n 10 .venv/bin/python experiments/crispr/extend_test.py --run experiments/crispr/bbq_age --fresh 600 --limit 600 \
    --control-seeds 3 --threads 2
# 8. (session 4, 2026-12-01; plan fixed before any of its test items was scored) BBQ Age under the new option-loglik
#    attribution (CRISPR on whole option texts: the released code's "argmax of option sequence probability" mode).
#    Why: under letter the model answers "B" ~90 % and has no BBQ skill to keep; under option-loglik it picks a
#    named person in ambiguous contexts (ambiguous accuracy ~0.10, disambiguated ~0.45 on the bench's 200 items), the
#    bias CRISPR's "most probable wrong option" targets. CPU budget: 3 instructions, 20 dev instances, search of
#    n in [0, 500] on 60 dev items per step plus n = 1..4 (--search-small, a named deviation), 300 test items,
#    3 control seeds, retention at 20 items. Success (issue 3): accuracy Δ CI and CRISPR − control CI exclude 0,
#    instruction std not grown; retention within CI width.
nice -n 5 .venv/bin/biaslab mitigate crispr --model smollm2-135m-instruct --task bbq:Age --protocol option-loglik \
    --instructions 3 --search --search-dev-limit 60 --search-small 4 --limit 300 --control-seeds 3 \
    --retention-limit 20 --out runs/crispr-optll-bbq-age
.venv/bin/python experiments/crispr/collect.py
# 9. (session 4; decided after step 8's collapse, before any test item was scored for it) the best NON-collapsed n
#    on dev: every n >= 191 the search tried answers "unknown" to everything (dev accuracy 0.50-0.51 = always-
#    unknown), so the candidates are the other n it evaluated on the same 60 dev items, n = 1..4; the best is n = 3
#    (dev 0.283 vs 0.222 unpruned). A post-hoc, dev-only rule — a secondary result; step 8 stays the pre-specified
#    one. Same attribution (cache) and unpatched 'before' records, copied; same test items, controls and checks.
mkdir -p runs/crispr-optll-bbq-age-n3
cp runs/crispr-optll-bbq-age/attribution.safetensors runs/crispr-optll-bbq-age-n3/
cp -r runs/crispr-optll-bbq-age/before runs/crispr-optll-bbq-age-n3/
nice -n 5 .venv/bin/biaslab mitigate crispr --model smollm2-135m-instruct --task bbq:Age --protocol option-loglik \
    --instructions 3 --neurons 3 --limit 300 --control-seeds 3 --retention-limit 20 \
    --out runs/crispr-optll-bbq-age-n3
.venv/bin/python experiments/crispr/collect.py
# 10. (session 5, 2026-12-01; plan fixed before this run) the dev objective made to refuse step 8's collapse:
#     --search-objective condition-hmean = harmonic mean of dev accuracy on ambiguous and on disambiguated items
#     (answering "unknown" to everything scores 0 on it). A named deviation, designed after step 8's dev collapse
#     (no test item was looked at to design it). Same attribution (cache) and unpatched 'before' records as step 8,
#     same search settings (60 dev items per step, n in [0, 500] plus n = 1..4), same 300 test items, 3 control
#     seeds; success criteria as in step 8.
mkdir -p runs/crispr-optll-bbq-age-hmean
cp runs/crispr-optll-bbq-age/attribution.safetensors runs/crispr-optll-bbq-age-hmean/
cp -r runs/crispr-optll-bbq-age/before runs/crispr-optll-bbq-age-hmean/
nice -n 5 .venv/bin/biaslab mitigate crispr --model smollm2-135m-instruct --task bbq:Age --protocol option-loglik \
    --instructions 3 --search --search-dev-limit 60 --search-small 4 --search-objective condition-hmean \
    --limit 300 --control-seeds 3 --retention-limit 20 --out runs/crispr-optll-bbq-age-hmean
.venv/bin/python experiments/crispr/collect.py
# 11. (session 5; planned after step 10's result, before this run) step 10's dev objective was still rising at
#     n = 4, the largest small n it evaluated (the golden-section probes started at 191, inside the collapse), so
#     this run evaluates every n in 1..32 on the same 60 dev items (--search-small 32; step 10's dev values are
#     reused from its search.json) and takes the best on dev. Same attribution, 'before' records, test items,
#     controls and criteria as step 10. A follow-up on the same test items: secondary to step 10.
mkdir -p runs/crispr-optll-bbq-age-hmean32
cp runs/crispr-optll-bbq-age-hmean/attribution.safetensors runs/crispr-optll-bbq-age-hmean/search.json \
    runs/crispr-optll-bbq-age-hmean32/
cp -r runs/crispr-optll-bbq-age-hmean/before runs/crispr-optll-bbq-age-hmean32/
nice -n 5 .venv/bin/biaslab mitigate crispr --model smollm2-135m-instruct --task bbq:Age --protocol option-loglik \
    --instructions 3 --search --search-dev-limit 60 --search-small 32 --search-objective condition-hmean \
    --limit 300 --control-seeds 3 --retention-limit 20 --out runs/crispr-optll-bbq-age-hmean32
.venv/bin/python experiments/crispr/collect.py
# 12. (session 6, 2026-12-02; plan fixed and committed before any Gender_identity item was scored) a second BBQ
#     category, fresh: no Gender_identity item has been attributed, searched or tested by any earlier step. The
#     category was chosen a priori (gender is the bias type the other methods here edit; no dev or test number of
#     any category but Age had been looked at). Settings are step 11's, unchanged (the configuration with the
#     largest accuracy gain on Age; its Age failure modes are what this run checks for): option-loglik, 3
#     instructions, 20 dev instances for attribution, condition-hmean on 60 dev items per step with every n in
#     1..32 plus the golden-section search of [0, 500], 300 test items, 3 control seeds, retention at 20 items.
#     Success = issue 3's BBQ criteria as in step 8: the 95 % CIs of after - before and of CRISPR - control both
#     exclude 0, the std over instructions does not grow, and retention (CrowS, StereoSet LMS, perplexity,
#     knowledge) moves by no more than the unpatched model's CI width. Also reported, as for Age: accuracy on
#     ambiguous and disambiguated items, the share of "unknown" answers, and CRISPR - always-A.
# (run with OMP_NUM_THREADS=2 BIASLAB_THREADS=2: 24 min)
nice -n 5 .venv/bin/biaslab mitigate crispr --model smollm2-135m-instruct --task bbq:Gender_identity \
    --protocol option-loglik --instructions 3 --search --search-dev-limit 60 --search-small 32 \
    --search-objective condition-hmean --limit 300 --control-seeds 3 --retention-limit 20 \
    --out runs/crispr-optll-bbq-gender-hmean32
.venv/bin/python experiments/crispr/collect.py
