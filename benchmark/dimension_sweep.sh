#!/usr/bin/env bash
# Claim 1 of the Qflex paper at a 2-core budget: final score vs the number of actuators |A|.
# ChainReach{4,16,64,256}-v0 (|A| = 8, 32, 128, 512) x every algorithm at its file's default preset
# (qflex-protocol), plus SAC at its `paper` preset (sac_paper: the baseline that learns fastest at this budget),
# at one shared budget and width chosen by measurement (docs/analysis.md): 4 envs, 1k uniform warm-up transitions,
# 20k transitions (4,750 updates of batch 128), hidden width 64, evaluations of 5 episodes every 5k transitions and a
# final one of 10. Seeds 1-5 for qflex, sac and sac_paper, 1-3 for crossq, dacer and sdac (4 particles instead of 32,
# as in cpu_budget.sh). Runs are ordered so that 3 seeds of everything but SDAC (the slowest) finish first, then
# seeds 4-5 of qflex, sac and sac_paper, then SDAC. Rerunning resumes the sweep.
# Every run keeps its final checkpoint (no buffer), which benchmark/analysis.py reads for the exploration analysis;
# final_eval.json carries the effort (eval/effort) of claim 4.
# Then the analyses (benchmark/analysis.py) write docs/results/dimension*, dimension_effort*, dimension_flow* and
# dimension_correlation_ChainReach{16,64}* (docs/analysis.md).
# Every run is also copied into ARCHIVE as it completes (run.py --archive, benchmark/archive.py: records, configs,
# final evals, TensorBoard events; no checkpoints), which is kept in the repository; on a new machine the sweep first
# copies the archive back, so it continues where the last one stopped instead of starting over.
#   bash benchmark/dimension_sweep.sh  # OUT=sweeps/dimension ARCHIVE=docs/results/archive/dimension RESULTS=docs/results WORKERS=2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-sweeps/dimension}
RESULTS=${RESULTS:-docs/results}
ARCHIVE=${ARCHIVE:-docs/results/archive/dimension}
WORKERS=${WORKERS:-2}
ENVS=(ChainReach4-v0 ChainReach16-v0 ChainReach64-v0 ChainReach256-v0)
COMMON=(--num-envs 4 --learning-starts 1000 --total-timesteps 20000 --batch-size 128 --hidden-dim 64
    --eval-freq 5000 --eval-episodes 5 --final-eval-episodes 10 --save-model)
status=0
sweep() {  # sweep RUNS_DIR "ALGOS" "SEEDS" [extra algorithm flags]
    local dir=$1 algos=$2 seeds=$3 kept=$ARCHIVE/${1##*/}
    shift 3
    if [ -d "$kept" ]; then python benchmark/archive.py "$kept" "$dir" || status=$?; fi
    # shellcheck disable=SC2086
    python benchmark/run.py --algos $algos --env-ids "${ENVS[@]}" --seeds $seeds --workers "$WORKERS" \
        --runs-dir "$dir" --archive "$kept" -- "${COMMON[@]}" "$@" || status=$?
}
sweep "$OUT/main" "qflex sac" "1 2 3"
sweep "$OUT/sac_paper" "sac" "1 2 3" --preset paper --exp-name sac_paper
sweep "$OUT/main" "crossq dacer" "1 2 3"
sweep "$OUT/main" "qflex sac" "4 5"
sweep "$OUT/sac_paper" "sac" "4 5" --preset paper --exp-name sac_paper
sweep "$OUT/main" "sdac" "1 2 3" --num-particles 4
DIRS=("$OUT/main" "$OUT/sac_paper")
python benchmark/analysis.py dimension --runs-dir "${DIRS[@]}" --out "$RESULTS" --name dimension || status=$?
python benchmark/analysis.py effort --runs-dir "${DIRS[@]}" --out "$RESULTS" --name dimension_effort || status=$?
python benchmark/analysis.py flow --runs-dir "$OUT/main" --out "$RESULTS" --name dimension_flow || status=$?
for env_id in ChainReach16-v0 ChainReach64-v0; do
    python benchmark/analysis.py correlation --runs-dir "$OUT/main" --env-id "$env_id" --out "$RESULTS" \
        --name "dimension_correlation_${env_id%-v0}" || status=$?
done
exit $status
