#!/usr/bin/env bash
# Prepare Amazon Sports and Outdoors: one text modality, codes c = 30, k = 3, graphs. With the
# leave-one-out split (SPLIT=loo, the default) as dataset "sports", for the experiments report
# (docs/experiments.md); with SPLIT=ratio as dataset "sports-ratio" (the last 20 % of each history
# for test, the paper's protocol and the tuned Sports table of issue 17, docs/benchmarks.md).
#
#   [SPLIT=loo|ratio] bash scripts/bench_sports_prep.sh WORKDIR [SOURCE]
#
# SOURCE defaults to ../shared/data/amazon-sports. Its items have no categories or brands and only
# short title-derived phrases (see its README), so the one modality is "title": those phrases
# encoded with all-MiniLM-L6-v2. Logs: WORKDIR/<dataset>/logs/.
set -euo pipefail
WORKDIR=${1:?usage: [SPLIT=loo|ratio] bench_sports_prep.sh WORKDIR [SOURCE]}
SOURCE=${2:-$(dirname "$0")/../../shared/data/amazon-sports}
MMSR=${MMSR:-mmsr}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case ${SPLIT:-loo} in
    loo) DS=sports SPLIT_OPTS=(--split loo) ;;
    ratio) DS=sports-ratio SPLIT_OPTS=(--split ratio --test-ratio 0.2) ;;
    *) echo "bench_sports_prep: error: SPLIT must be loo or ratio, got '$SPLIT'" >&2; exit 2 ;;
esac
$MMSR download --workdir "$WORKDIR" --dataset "$DS" --from "$SOURCE"
$MMSR preprocess --workdir "$WORKDIR" --dataset "$DS" --core 5 --max-len 50 "${SPLIT_OPTS[@]}"
$MMSR extract-features --workdir "$WORKDIR" --dataset "$DS" --modality text --name title --fields title --model minilm
$MMSR build-codes --workdir "$WORKDIR" --dataset "$DS" --clusters 30 --top-k 3 --seed 0
$MMSR build-graphs --workdir "$WORKDIR" --dataset "$DS"
