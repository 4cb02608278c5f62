#!/usr/bin/env bash
# The tuned Table 2 on Beauty or Sports (issue 17; docs/benchmarks.md), after scripts/bench_tune.sh: each
# study's best options (WORKDIR/DATASET/tune/STUDY.toml, chosen on validation) trained again with
# every seed of SEEDS and tested, JOBS (default 2) trainings at a time, one torch thread each; then
# one `mmsr evaluate --compare` over all these runs: metrics as mean +- std over the seeds, and the
# paired tests (t-test and Wilcoxon over the same test cases, and over seeds) of each MMSR form
# against the best baseline on each metric. For Sports: DATASET sports-ratio, as for the studies.
# Seeds may be split over lanes (one run of the script with "0 1", another with "2"): each run is
# its own run folder; start them only after every `tune` of the study has returned, since the
# config file is the study's best at the end.
#
#   bash scripts/bench_tuned.sh WORKDIR DATASET "STUDY ..." ["SEEDS"]
#
# STUDY is a study name of bench_tune.sh (e.g. sasrec-cpu, mmsr-authors-cpu); SEEDS defaults
# to "0 1 2". The run of STUDY with seed S is WORKDIR/DATASET/runs/STUDY-tuned-sS; its train and
# evaluate output goes to WORKDIR/DATASET/logs/tuned-STUDY-sS.log. The config file carries the
# study's epoch budget. A run that has its test metrics is skipped, an interrupted one resumes from
# its last.pt, so the script can be cut off and run again at any time. The comparison is printed
# and written to WORKDIR/DATASET/logs/tuned-compare.txt.
set -euo pipefail
WORKDIR=${1:?usage: bench_tuned.sh WORKDIR DATASET "STUDY ..." ["SEEDS"]}
DATASET=${2:?dataset name}
STUDIES=${3:?studies, e.g. "sasrec-cpu mmsr-authors-cpu"}
SEEDS=${4:-0 1 2}
MMSR=${MMSR:-mmsr}
DS=$WORKDIR/$DATASET
LOGS=$DS/logs
mkdir -p "$LOGS"
for study in $STUDIES; do
    [ -f "$DS/tune/$study.toml" ] || { echo "tuned: no $DS/tune/$study.toml; run bench_tune.sh first" >&2; exit 2; }
done
export OMP_NUM_THREADS=1 MMSR WORKDIR DATASET DS LOGS

one() {
    local study=$1 seed=$2 run="$1-tuned-s$2"
    [ -f "$DS/runs/$run/metrics_test.json" ] && { echo "tuned: $run already tested"; return 0; }
    {
        $MMSR train --workdir "$WORKDIR" --dataset "$DATASET" --config "$DS/tune/$study.toml" --seed "$seed" \
            --run-name "$run" --no-tensorboard
        $MMSR evaluate --workdir "$WORKDIR" --dataset "$DATASET" --run "$run" --split test
    } >> "$LOGS/tuned-$study-s$seed.log" 2>&1 || { echo "tuned: $run failed, see $LOGS/tuned-$study-s$seed.log" >&2; return 1; }
    echo "tuned: $run done"
}
export -f one
for study in $STUDIES; do for seed in $SEEDS; do echo "$study $seed"; done; done \
    | xargs -P "${JOBS:-2}" -L 1 bash -c 'one "$0" "$1"'
runs=()
for study in $STUDIES; do for seed in $SEEDS; do runs+=("$study-tuned-s$seed"); done; done
$MMSR evaluate --workdir "$WORKDIR" --dataset "$DATASET" --compare "$(IFS=,; echo "${runs[*]}")" --split test \
    | tee "$LOGS/tuned-compare.txt"
