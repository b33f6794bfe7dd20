#!/usr/bin/env bash
# Paper protocol (Qflex, ICLR 2026): myoLegWalk-v0, 20M env transitions, 80 parallel envs, 1 update per vector
# step, 30k warm-up (the qflex-protocol preset of every script), all five algorithms x 5 seeds = 25 runs.
# ~4 h of pure MyoSuite simulation per run per core before any learning cost (~1.5 ms per myoLegWalk-v0 step on one core): meant for
# a cluster or a multi-GPU box. Flags given to this script go to benchmark/run.py, e.g.
#   bash benchmark/paper_protocol.sh --launcher slurm --slurm-partition gpu --slurm-gpus 1 --slurm-cpus-per-task 8 --workers 25
#   OUT=sweeps/paper WORKERS=2 bash benchmark/paper_protocol.sh          # local, 2 runs at a time
# Rerunning the same command resumes the sweep (completed runs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-sweeps/paper}
WORKERS=${WORKERS:-1}
RESULTS=${RESULTS:-$OUT/results}

status=0
python benchmark/run.py \
    --algos qflex sac crossq dacer sdac \
    --env-ids myoLegWalk-v0 \
    --seeds 1 2 3 4 5 \
    --workers "$WORKERS" \
    --runs-dir "$OUT" \
    "$@" \
    -- \
    --preset qflex-protocol \
    --total-timesteps 20000000 \
    --num-envs 80 \
    --save-model || status=$?

python benchmark/plot.py --runs-dir "$OUT" --out "$RESULTS" --name paper_protocol --reps 50000
exit "$status"
