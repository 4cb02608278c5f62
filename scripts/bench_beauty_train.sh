#!/usr/bin/env bash
# Train and test the models of the Beauty accuracy benchmark (docs/benchmarks.md) on one prepared
# dataset (see scripts/bench_beauty_prep.sh), JOBS (default 2) trainings at a time, one torch thread each.
#
#   bash scripts/bench_beauty_train.sh WORKDIR DATASET "MODEL ..." [EPOCHS] [SEED]
#
# Every model gets the same budget: --epochs EPOCHS (default 10), --patience 3, --lr 2e-3, seed SEED
# (default 0), the rest at `mmsr train`'s defaults (dim 128, batch 512, 2 layers, dropout 0.3).
# Per model: WORKDIR/DATASET/logs/bench-MODEL-sSEED.log (train + evaluate output) and
# .../bench-MODEL-sSEED.time (peak RSS in KiB and wall seconds of the training process, from
# /usr/bin/time). Per-epoch train/valid seconds are in the run's history.json. Interrupted runs
# resume from their last.pt when the script is run again. Ends with `mmsr evaluate --compare`.
# Variants: TRAIN_OPTS (more `mmsr train` options, e.g. "--feed-forward") and TAG (run names
# MODEL-TAG-bench-sSEED, logs bench-MODEL-TAG-sSEED.*) keep a variant's runs apart from the defaults'.
set -euo pipefail
WORKDIR=${1:?usage: bench_beauty_train.sh WORKDIR DATASET "MODEL ..." [EPOCHS] [SEED]}
DATASET=${2:?dataset name}
MODELS=${3:?models, e.g. "pop gru4rec sasrec sasrecf mmsr"}
EPOCHS=${4:-10}
SEED=${5:-0}
MMSR=${MMSR:-mmsr}
TAG=${TAG:+-$TAG}
export OMP_NUM_THREADS=1 MMSR WORKDIR DATASET EPOCHS SEED LOGS TAG TRAIN_OPTS
LOGS=$WORKDIR/$DATASET/logs
mkdir -p "$LOGS"

one() {
    local model=$1 run="$1$TAG-bench-s$SEED" name="$1$TAG-s$SEED"
    local log="$LOGS/bench-$name.log"
    local budget=(--epochs "$EPOCHS" --patience 3 --lr 2e-3 ${TRAIN_OPTS:-})
    [ "$model" = pop ] && budget=()  # no parameters: one pass, and train refuses training options
    {
        /usr/bin/time -f "%M %e" -o "$LOGS/bench-$name.time" \
            $MMSR train --workdir "$WORKDIR" --dataset "$DATASET" --model "$model" --run-name "$run" \
            "${budget[@]}" --seed "$SEED"
        $MMSR evaluate --workdir "$WORKDIR" --dataset "$DATASET" --run "$run" --split test
    } > "$log" 2>&1 || { echo "bench: $model failed, see $log" >&2; return 1; }
    echo "bench: $run done ($(cat "$LOGS/bench-$name.time") = peak KiB, wall s)"
}
export -f one
printf '%s\n' $MODELS | xargs -P "${JOBS:-2}" -I{} bash -c 'one {}'
runs=$(printf '%s'"$TAG"'-bench-s'"$SEED"',' $MODELS)
$MMSR evaluate --workdir "$WORKDIR" --dataset "$DATASET" --compare "${runs%,}" --split test
