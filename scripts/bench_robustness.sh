#!/usr/bin/env bash
# Robustness experiments of the paper (section 5.4 / Figure 4 and the Figure 1 case study) on trained
# runs: for every run, `mmsr evaluate` on the test split with
#   --drop-modality T --drop-ratio R   for every T in TARGETS and R in RATIOS, and
#   --perturb disordered, --perturb mismatched --perturb-ratio 0.5,
# each writing runs/<run>/metrics_test_<setting>.json beside the clean metrics_test.json
# (evaluated too when missing), which `mmsr report` turns into curves and tables.
#
# Usage: scripts/bench_robustness.sh WORKDIR DATASET "RUN ..."
#
# Environment [default]:
#   TARGETS  modalities to drop: names, image, text or all ["all"]
#   RATIOS   drop ratios ["0.1 0.2 0.3 0.4 0.5 0.6 0.7"]
#   SEED     seed choosing the dropped / displaced items [0]
#   JOBS     evaluations at a time, one torch thread each [2]
#   MMSR     the mmsr command [mmsr]
#
# A setting whose metrics file is newer than the run's best.pt is skipped, so an interrupted sweep
# resumes where it stopped. Output of each evaluation: WORKDIR/DATASET/logs/robust-<run>.log.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then usage; exit 0; fi
[ $# -eq 3 ] || { echo "usage: scripts/bench_robustness.sh WORKDIR DATASET \"RUN ...\" (environment: see --help)" >&2; exit 2; }
WORKDIR=$1 DATASET=$2 RUNS=$3
export OMP_NUM_THREADS=1 MMSR=${MMSR:-mmsr} WORKDIR DATASET SEED=${SEED:-0}
TARGETS=${TARGETS:-all}
RATIOS=${RATIOS:-0.1 0.2 0.3 0.4 0.5 0.6 0.7}
mkdir -p "$WORKDIR/$DATASET/logs"

# one job per line: RUN SETTING-FILE-SUFFIX EVALUATE-OPTIONS...
jobs_list() {
    for run in $RUNS; do
        echo "$run -"
        for t in $TARGETS; do for r in $RATIOS; do
            echo "$run _drop-$t-$r --drop-modality $t --drop-ratio $r"
        done; done
        echo "$run _disordered --perturb disordered"
        echo "$run _mismatched --perturb mismatched --perturb-ratio 0.5"
    done
}

one() {  # RUN SUFFIX [OPTIONS...]
    local run=$1 suffix=$2; shift 2
    [ "$suffix" = - ] && suffix=
    local dir="$WORKDIR/$DATASET/runs/$run" out
    out="$dir/metrics_test$suffix.json"
    [ -f "$dir/best.pt" ] || { echo "robustness: $dir/best.pt missing (train the run first)" >&2; return 1; }
    [ "$out" -nt "$dir/best.pt" ] && return 0
    $MMSR evaluate --workdir "$WORKDIR" --dataset "$DATASET" --run "$run" --split test --seed "$SEED" "$@" \
        >> "$WORKDIR/$DATASET/logs/robust-$run.log" 2>&1 \
        || { echo "robustness: $run $* failed, see $WORKDIR/$DATASET/logs/robust-$run.log" >&2; return 1; }
    echo "robustness: $run ${suffix:-clean} done"
}
export -f one
jobs_list | xargs -P "${JOBS:-2}" -L 1 bash -c 'one "$@"' _
