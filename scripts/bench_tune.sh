#!/usr/bin/env bash
# The CPU-sized tuning of Table 2 (issue 17; docs/benchmarks.md): one `mmsr tune` study per
# model on the same search space (configs/tune-beauty-cpu.toml; for "mmsr-authors" its authors'-form
# twin) and the same budget, JOBS (default 2) studies at a time, one torch thread each. The Sports
# table uses it unchanged on DATASET sports-ratio (scripts/bench_sports_prep.sh with SPLIT=ratio).
# Two runs of the script on one study (another lane, another machine on the same workdir) share
# its trials; both return once the study has TRIALS finished ones.
#
#   bash scripts/bench_tune.sh WORKDIR DATASET "MODEL ..." [TRIALS] [SEED]
#
# MODEL is a model name (study MODEL-cpu) or mmsr-authors (study mmsr-authors-cpu). Each study runs
# until it has TRIALS (default 12) finished trials, with the Table-2 epoch budget (--epochs 10
# --patience 3); its log is WORKDIR/DATASET/logs/tune-STUDY.log. Studies live in the dataset's
# tune/studies.sqlite3, so running the script again resumes them where they stopped (a killed
# trial is queued again and continues from its last.pt); a study that has its trials returns at
# once with its table. Each study's
# best options are written to WORKDIR/DATASET/tune/STUDY.toml for `mmsr train --config`.
set -euo pipefail
WORKDIR=${1:?usage: bench_tune.sh WORKDIR DATASET "MODEL ..." [TRIALS] [SEED]}
DATASET=${2:?dataset name}
MODELS=${3:?models, e.g. "sasrec sasrecf mmsr mmsr-authors"}
TRIALS=${4:-12}
SEED=${5:-0}
MMSR=${MMSR:-mmsr}
CONFIGS=$(cd "$(dirname "$0")/../configs" && pwd)
LOGS=$WORKDIR/$DATASET/logs
mkdir -p "$LOGS"
export OMP_NUM_THREADS=1 MMSR WORKDIR DATASET TRIALS SEED CONFIGS LOGS

one() {
    local name=$1 model=$1 space=$CONFIGS/tune-beauty-cpu.toml
    if [ "$name" = mmsr-authors ]; then
        model=mmsr space=$CONFIGS/tune-beauty-cpu-mmsr-authors.toml
    fi
    local study="$name-cpu"
    $MMSR tune --workdir "$WORKDIR" --dataset "$DATASET" --model "$model" --study "$study" --space "$space" \
        --trials "$TRIALS" --epochs 10 --patience 3 --seed "$SEED" >> "$LOGS/tune-$study.log" 2>&1 \
        || { echo "tune: $study stopped, see $LOGS/tune-$study.log" >&2; return 1; }
    echo "tune: $study has $TRIALS trials -> $WORKDIR/$DATASET/tune/$study.toml"
}
export -f one
printf '%s\n' $MODELS | xargs -P "${JOBS:-2}" -I{} bash -c 'one {}'
