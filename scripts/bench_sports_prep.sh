#!/usr/bin/env bash
# Prepare Amazon Sports and Outdoors for the experiments report (docs/experiments.md): leave-one-out
# split, one text modality, codes c = 30, k = 3, graphs; dataset "sports" in WORKDIR.
#
#   bash scripts/bench_sports_prep.sh WORKDIR [SOURCE]
#
# SOURCE defaults to ../shared/data/amazon-sports. Its items have no categories or brands and only
# short title-derived phrases (see its README), so the one modality is "title": those phrases
# encoded with all-MiniLM-L6-v2. Logs: WORKDIR/sports/logs/.
set -euo pipefail
WORKDIR=${1:?usage: bench_sports_prep.sh WORKDIR [SOURCE]}
SOURCE=${2:-$(dirname "$0")/../../shared/data/amazon-sports}
MMSR=${MMSR:-mmsr}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$MMSR download --workdir "$WORKDIR" --dataset sports --from "$SOURCE"
$MMSR preprocess --workdir "$WORKDIR" --dataset sports --core 5 --max-len 50 --split loo
$MMSR extract-features --workdir "$WORKDIR" --dataset sports --modality text --name title --fields title --model minilm
$MMSR build-codes --workdir "$WORKDIR" --dataset sports --clusters 30 --top-k 3 --seed 0
$MMSR build-graphs --workdir "$WORKDIR" --dataset sports
