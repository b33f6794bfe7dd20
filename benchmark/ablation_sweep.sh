#!/usr/bin/env bash
# Claim 2 of the Qflex paper (its Fig. 5: N = 20 flow steps are enough, fewer are worse) at a 2-core budget:
# Qflex on ChainReach64-v0 (|A| = 128) with N in {0, 5, 10, 20, 40} flow steps (eta = 0.01), eta in {0.003, 0.01,
# 0.03} (N = 20), and --no-flow (acting with the source policy; no velocity field is trained), 3 seeds each, at the
# budget and width of benchmark/dimension_sweep.sh. N = 20, eta = 0.01 is the default: its runs are the dimension
# sweep's own Qflex ChainReach64-v0 runs (same command), made in DIMENSION if that sweep has not made them yet.
# One runs folder per variant (exp names qflex_N5, qflex_eta0.03, qflex_noflow, ...). Rerunning resumes the sweep;
# then `benchmark/analysis.py ablation` writes the table (score, CI, wall time per run) and the figure.
# Completed runs are kept in the repository as in dimension_sweep.sh (benchmark/archive.py; ARCHIVE and DIMENSION_ARCHIVE).
#   bash benchmark/ablation_sweep.sh   # OUT=sweeps/ablation DIMENSION=sweeps/dimension/main RESULTS=docs/results WORKERS=2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-sweeps/ablation}
DIMENSION=${DIMENSION:-sweeps/dimension/main}
RESULTS=${RESULTS:-docs/results}
ARCHIVE=${ARCHIVE:-docs/results/archive/ablation}
DIMENSION_ARCHIVE=${DIMENSION_ARCHIVE:-docs/results/archive/dimension/main}
WORKERS=${WORKERS:-2}
SEEDS=${SEEDS:-1 2 3}
COMMON=(--num-envs 4 --learning-starts 1000 --total-timesteps 20000 --batch-size 128 --hidden-dim 64
    --eval-freq 5000 --eval-episodes 5 --final-eval-episodes 10 --save-model)
status=0
runs() {  # runs RUNS_DIR ARCHIVE_DIR [qflex flags]
    local dir=$1 kept=$2
    shift 2
    if [ -d "$kept" ]; then python benchmark/archive.py "$kept" "$dir" || status=$?; fi
    # shellcheck disable=SC2086
    python benchmark/run.py --algos qflex --env-ids ChainReach64-v0 --seeds $SEEDS --workers "$WORKERS" \
        --runs-dir "$dir" --archive "$kept" -- "${COMMON[@]}" "$@" || status=$?
}
variant() {  # variant NAME [qflex flags]
    local name=$1
    shift
    runs "$OUT/$name" "$ARCHIVE/$name" --exp-name "$name" "$@"
}
runs "$DIMENSION" "$DIMENSION_ARCHIVE"
variant qflex_N0 --flow-steps 0
variant qflex_N5 --flow-steps 5
variant qflex_N10 --flow-steps 10
variant qflex_N40 --flow-steps 40
variant qflex_eta0.003 --flow-step-size 0.003
variant qflex_eta0.03 --flow-step-size 0.03
variant qflex_noflow --no-flow
python benchmark/analysis.py ablation --runs-dir "$DIMENSION" "$OUT"/* --env-id ChainReach64-v0 --out "$RESULTS" \
    --name ablation || status=$?
exit $status
