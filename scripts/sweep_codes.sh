#!/usr/bin/env bash
# Modality-code construction sweep (paper section 5.5, Figure 5): for every c in CLUSTERS and k in
# TOPK, `mmsr build-codes -c c -k k`, `mmsr build-graphs`, `mmsr train --model mmsr` (one run per
# seed) and `mmsr evaluate` on the test split, then one table of c, k and the test metrics.
#
# Usage: scripts/sweep_codes.sh DATASET
#   DATASET must be prepared up to extract-features in the workdir (download, preprocess,
#   extract-features of the modalities to code).
#
# Each (c, k) gets its own dataset DATASET-c<c>k<k> in the workdir, because build-codes and
# build-graphs write fixed paths per dataset: a copy of DATASET without its codes, graphs, runs and
# logs (files hard-linked where the file system allows: every stage replaces its outputs by
# rename, never in place; manifests hold relative paths only). A copy whose preprocess/features
# manifests still equal DATASET's is reused, so re-running the sweep resumes it (train continues
# unfinished runs and keeps finished ones); one made from an older state of DATASET is rebuilt.
# Copies are built and replaced by renames; what an interrupted sweep left beside a copy
# (DATASET-c<c>k<k>.sweep-tmp.PID, .sweep-old.PID) is deleted when the sweep reaches that cell again.
#
# Environment [default]:
#   MMSR_WORKDIR  workdir holding DATASET [./workdir]
#   CLUSTERS      c values, separated by spaces or commas [10 20 30 40 50]
#   TOPK          k values [1 2 3 4]
#   SEEDS         training seeds, one run each [0]
#   CODES_OPTS    more `mmsr build-codes` options, e.g. "--modality image,text --epochs 100" []
#   TRAIN_OPTS    more `mmsr train` options, e.g. "--epochs 50 --lr 1e-3 --device cuda" []
#   EVAL_OPTS     more `mmsr evaluate` options, e.g. "--device cuda" []
#   MMSR          the mmsr command, e.g. ".venv/bin/python -m mmsr_cli" [mmsr]
#   PYTHON        Python 3 that writes the table (standard library only) [python3]
#   OUT           the table [$MMSR_WORKDIR/DATASET-sweep-codes.tsv]
#
# Output: OUT, tab-separated, a header line then one row per (c, k, seed) in sweep order:
#   dataset  c  k  seed  run  n  hr@5  hr@10  hr@20  mrr@5  mrr@10  mrr@20  ndcg@5  ndcg@10  ndcg@20
# where dataset is the (c, k) dataset, run its run name mmsr-c<c>k<k>-s<seed>, n the number of
# test samples and the metrics are fractions in [0, 1] from
# $MMSR_WORKDIR/<dataset>/runs/<run>/metrics_test.json (which `mmsr report` reads too; each run's
# config.json also records the c and k of the codes it read). OUT is written to a temporary file
# and renamed at the end, so it is never half-written; a failing command stops the sweep.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then usage; exit 0; fi
[ $# -eq 1 ] || { echo "usage: scripts/sweep_codes.sh DATASET (environment: see --help)" >&2; exit 2; }
DATASET=$1
WORK=$(cd "${MMSR_WORKDIR:-./workdir}" 2>/dev/null && pwd) || { echo "sweep_codes: workdir ${MMSR_WORKDIR:-./workdir} not found" >&2; exit 2; }
BASE="$WORK/$DATASET"
CLUSTERS=${CLUSTERS:-10 20 30 40 50}
TOPK=${TOPK:-1 2 3 4}
SEEDS=${SEEDS:-0}
read -r -a MMSR_CMD <<< "${MMSR:-mmsr}"
read -r -a CODES_ARGS <<< "${CODES_OPTS:-}"
read -r -a TRAIN_ARGS <<< "${TRAIN_OPTS:-}"
read -r -a EVAL_ARGS <<< "${EVAL_OPTS:-}"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$WORK/$DATASET-sweep-codes.tsv}

die() { echo "sweep_codes: $*" >&2; exit 2; }
integers() {  # NAME VALUES MIN: "10, 20 30" -> "10 20 30 ", each an integer >= MIN
  local v out=""
  for v in ${2//,/ }; do
    [[ $v =~ ^[0-9]{1,9}$ ]] && [ "$((10#$v))" -ge "$3" ] || die "$1: '$v' is not an integer >= $3"
    out+="$((10#$v)) "
  done
  [ -n "$out" ] || die "$1: no values"
  echo "$out"
}
CLUSTERS=$(integers CLUSTERS "$CLUSTERS" 1)
TOPK=$(integers TOPK "$TOPK" 1)
SEEDS=$(integers SEEDS "$SEEDS" 0)
[ -d "$BASE/manifests" ] || die "$BASE: not a prepared dataset (run mmsr download, preprocess and extract-features first)"
compgen -G "$BASE/manifests/features__*.json" > /dev/null || die "$BASE: no features (run mmsr extract-features first)"

# The manifests a copy shares with DATASET: those of every stage before build-codes.
prepared_manifests() { find "$1/manifests" -maxdepth 1 -name '*.json' ! -name 'codes__*' ! -name 'graphs__*' -printf '%f\n' | sort; }

copy_is_current() {  # DST: a copy whose prepared manifests are exactly DATASET's
  local m
  [ -d "$1/manifests" ] || return 1
  [ "$(prepared_manifests "$BASE")" = "$(prepared_manifests "$1")" ] || return 1
  while read -r m; do cmp -s "$BASE/manifests/$m" "$1/manifests/$m" || return 1; done < <(prepared_manifests "$BASE")
}

remove_leftovers() {  # DST: folders DST.sweep-tmp.PID / DST.sweep-old.PID of sweeps no longer running
  local left pid
  for left in "$1".sweep-tmp.* "$1".sweep-old.*; do
    [ -d "$left" ] || continue
    pid=${left##*.}
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2> /dev/null && continue  # another sweep's, in progress
    rm -rf "$left"
  done
}

make_copy() {  # DST: DATASET without codes, graphs, runs and logs (built beside DST, then renamed)
  local dst=$1 tmp="$1.sweep-tmp.$$" old="$1.sweep-old.$$" entry name m
  rm -rf "$tmp" "$old"
  mkdir -p "$tmp/manifests"
  for entry in "$BASE"/*; do
    name=$(basename "$entry")
    case "$name" in codes | graphs | runs | logs | manifests) continue ;; esac
    cp -al "$entry" "$tmp/" 2> /dev/null || { rm -rf "${tmp:?}/$name"; cp -a "$entry" "$tmp/"; }
  done
  while read -r m; do cp "$BASE/manifests/$m" "$tmp/manifests/"; done < <(prepared_manifests "$BASE")
  # Renames only, so a sweep killed at any point leaves DST either whole or absent: deleting an
  # outdated DST in place could be cut short with its manifests still there, and the half-deleted
  # copy would then pass copy_is_current.
  [ -e "$dst" ] && mv "$dst" "$old"
  mv "$tmp" "$dst"
  rm -rf "$old"
}

mmsr() { command "${MMSR_CMD[@]}" "$@"; }  # `command`: MMSR=mmsr must not call this function again

ROWS=()  # "dataset c k seed run" of every evaluated run, in sweep order
for c in $CLUSTERS; do
  for k in $TOPK; do
    name="$DATASET-c${c}k${k}"
    remove_leftovers "$WORK/$name"
    if ! copy_is_current "$WORK/$name"; then
      echo "sweep_codes: $name: copying $DATASET" >&2
      make_copy "$WORK/$name"
    fi
    mmsr build-codes --workdir "$WORK" --dataset "$name" --clusters "$c" --top-k "$k" "${CODES_ARGS[@]}"
    mmsr build-graphs --workdir "$WORK" --dataset "$name"
    for seed in $SEEDS; do
      run="mmsr-c${c}k${k}-s$seed"
      mmsr train --workdir "$WORK" --dataset "$name" --model mmsr --run-name "$run" --seed "$seed" "${TRAIN_ARGS[@]}"
      mmsr evaluate --workdir "$WORK" --dataset "$name" --run "$run" --split test "${EVAL_ARGS[@]}" > /dev/null
      ROWS+=("$name $c $k $seed $run")
    done
  done
done

"$PYTHON" - "$WORK" "$OUT" "${ROWS[@]}" << 'PY'
import json, os, sys

work, out, rows = sys.argv[1], sys.argv[2], [r.split() for r in sys.argv[3:]]


def order(metric):  # hr@5, hr@10, hr@20, mrr@5, ...
    name, _, k = metric.partition("@")
    return name, int(k) if k.isdigit() else 0


lines, header = [], None
for dataset, c, k, seed, run in rows:
    path = os.path.join(work, dataset, "runs", run, "metrics_test.json")
    with open(path) as f:
        record = json.load(f)
    names = sorted(record["metrics"], key=order)
    if header is None:
        header = names
    elif names != header:
        sys.exit(f"sweep_codes: {path}: metrics {names} differ from the first run's {header}")
    values = [repr(float(record["metrics"][m])) for m in header]
    lines.append("\t".join([dataset, c, k, seed, run, str(record["n"]), *values]))
tmp = f"{out}.tmp{os.getpid()}"
with open(tmp, "w") as f:
    f.write("\t".join(["dataset", "c", "k", "seed", "run", "n", *header]) + "\n")
    f.writelines(line + "\n" for line in lines)
os.replace(tmp, out)
print(f"sweep_codes: {len(lines)} runs -> {out}")
PY
