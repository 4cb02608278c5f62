"""A model's training step in an older checkout against this one, side by side in one process.

    python scripts/bench_step_ab.py --old CHECKOUT --workdir W --dataset D [--model mmsr] [--authors]
        [--threads 2] [--rounds 5] [--steps 6]

The older checkout's ``mmsr_cli`` package is copied to a temporary folder under another name and
its class of ``--model`` (default MMSR) built with the current config and the current model's initial weights; the two
models then take the same training batches (forward, CE over all items, backward, Adam) in
alternating rounds, so that load from other jobs hits both alike. Prints the median seconds per
step of each, and checks that from equal weights one batch gives the same loss and gradients
(float rounding aside). ``--authors`` uses the authors' Beauty preset (their layer, one layer,
batch 128, dropout 0.4, attention dropout 0.2) instead of `mmsr train`'s defaults (batch 512).
Timings are only comparable within one run: on a shared machine the absolute figures move.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmsr_cli import runtime
from mmsr_cli.inputs import load_dataset
from mmsr_cli.models import build_model
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.training import TrainStep
from mmsr_cli.workdir import DatasetDir

AUTHORS = {"variant": "authors", "layers": 1, "dropout": 0.4, "attention_dropout": 0.2}


def copy_checkout(checkout: Path, scratch: Path) -> None:
    """``checkout``'s package made importable as ``mmsr_old`` (the models import each other
    relatively, so the copy never reaches the current package)."""
    shutil.copytree(checkout / "mmsr_cli", scratch / "mmsr_old")
    sys.path.insert(0, str(scratch))


def old_model_class(name: str):
    """The class of model ``name`` in the copied checkout (:func:`copy_checkout`)."""
    module, cls = importlib.import_module("mmsr_old.models").REGISTRY[name].split(":")
    # the registry names modules absolutely (mmsr_cli.models...): the copy's own module instead
    return getattr(importlib.import_module(module.replace("mmsr_cli.", "mmsr_old.", 1)), cls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="an older checkout (e.g. a git worktree)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--model", default="mmsr", help="the model to time (default mmsr)")
    ap.add_argument("--authors", action="store_true", help="the authors' Beauty preset instead of the defaults")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model and round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runtime.keep_freed_memory()  # as train does
    if args.authors and args.model != "mmsr":
        ap.error("--authors is MMSR's preset")
    options = AUTHORS if args.authors else {}
    batch_size = 128 if args.authors else 512

    ds = DatasetDir.open(args.workdir, args.dataset)
    bundle = load_dataset(ds, ModelConfig(model=args.model, dim=128, **options))
    train = bundle.open_split(ds, "train")
    torch.manual_seed(0)
    new = build_model(bundle.model_config, bundle.info)
    scratch = Path(tempfile.mkdtemp(prefix="mmsr-ab-"))  # kept while the old package may import from it
    try:
        copy_checkout(args.old.resolve(), scratch)
        old_class = old_model_class(args.model)
        old = old_class(old_class.config_class.from_record(bundle.model_config), bundle.info)
        compare(args, batch_size, train, new, old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare(args, batch_size: int, train, new, old) -> None:
    old.load_state_dict(new.state_dict())
    models = {"old": old, "new": new}
    steps = {name: TrainStep(m) for name, m in models.items()}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    rng = np.random.default_rng(0)
    batches = [train.collate(np.sort(rng.choice(len(train), batch_size, replace=False))) for _ in range(args.steps + 1)]

    def step(name: str, batch) -> None:
        models[name].train()
        loss = steps[name](batch)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in models:
        step(name, batches[0])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            start = time.perf_counter()
            for batch in batches[1:]:
                step(name, batch)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"{args.model}, {args.dataset}, {'authors preset' if args.authors else 'defaults'}, batch {batch_size}, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}: old {args.old}")
    for name, v in seconds.items():
        print(f"  {name}: {medians[name]:.4f} s/step (rounds: {', '.join(f'{x:.3f}' for x in v)})")
    print(f"  new / old: {medians['new'] / medians['old']:.2f}")

    # the same loss and gradients from equal weights (eval mode: no dropout draws to match)
    new.load_state_dict(old.state_dict())
    losses, grads = {}, {}
    for name, m in models.items():
        m.eval()
        m.zero_grad(set_to_none=True)
        loss = steps[name](batches[1])
        loss.backward()
        losses[name] = loss.item()
        grads[name] = [p.grad for p in m.parameters()]
    diff = max((a - b).abs().max().item() for a, b in zip(grads["old"], grads["new"]) if a is not None)
    print(f"  loss old {losses['old']:.6f}, new {losses['new']:.6f}; largest gradient difference {diff:.2e}")


if __name__ == "__main__":
    main()
