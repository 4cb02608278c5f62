#!/usr/bin/env bash
# The MMSR-variant table of docs/benchmarks.md ("Does MMSR beat SASRec?"): on one prepared dataset
# (scripts/bench_beauty_prep.sh), train and test every (variant, seed) with the Table-2 budget of
# scripts/bench_beauty_train.sh (--epochs 10 --patience 3 --lr 2e-3), JOBS (default 2) at a time,
# seed 0 of every variant first. Resumable: run it again and finished runs are skipped by their
# logs, interrupted ones resume from last.pt.
#
#   bash scripts/bench_mmsr_variants.sh WORKDIR DATASET [SEEDS]
#
# Variants (run names mmsr-TAG-bench-sSEED):
#   paper2   the paper's layer (Eq. 12-17), 2 layers (mmsr train's defaults)
#   paper1   the paper's layer, 1 layer
#   authors  --variant authors with the authors' Beauty preset (configs/mmsr-authors-beauty.toml:
#            1 layer, batch 128, dropout 0.4, attention dropout 0.2), the same epoch budget
# Then SASRec and SASRec^F (seed 0 of SEEDS) as anchors of the same data.
set -euo pipefail
WORKDIR=${1:?usage: bench_mmsr_variants.sh WORKDIR DATASET [SEEDS]}
DATASET=${2:?dataset name}
SEEDS=${3:-0 1 2}
here=$(cd "$(dirname "$0")" && pwd)
preset=$here/../configs/mmsr-authors-beauty.toml
export WORKDIR DATASET here preset
jobs=()
for seed in $SEEDS; do
    jobs+=("authors $seed" "paper1 $seed" "paper2 $seed")
done
first=${SEEDS%% *}
jobs+=("sasrec $first" "sasrecf $first")

one() {
    local tag=$1 seed=$2 model=mmsr opts=""
    case $tag in
        paper2) ;;
        paper1) opts="--layers 1" ;;
        authors) opts="--config $preset" ;;
        sasrec|sasrecf) model=$tag tag="" ;;
        *) echo "bench: unknown variant $tag" >&2; return 1 ;;
    esac
    local run=$model${tag:+-$tag}-bench-s$seed
    if [ -f "$WORKDIR/$DATASET/runs/$run/metrics_test.json" ]; then echo "bench: $run tested before"; return 0; fi
    TAG=$tag TRAIN_OPTS=$opts JOBS=1 bash "$here/bench_beauty_train.sh" "$WORKDIR" "$DATASET" "$model" 10 "$seed" > /dev/null
    echo "bench: $run done"
}
export -f one
printf '%s\n' "${jobs[@]}" | xargs -P "${JOBS:-2}" -I{} bash -c 'one {}'
