"""Training-step and validation-pass speed of several models, side by side in one process.

    python scripts/bench_step_speed.py --workdir W --dataset beauty-ratio [--models mmsr,sasrec]
        [--batch 512] [--dim 128] [--steps 6] [--rounds 3] [--threads 1] [--valid] [--option k=v ...]

For each model: the training step of `mmsr train` (TrainStep: forward, CE over all items, backward,
Adam) on the same random training batches, taken as the training loop takes them (each next
batch collated in a background thread), timed in ``--rounds`` rounds that alternate the models
(so a neighbour's load on a shared machine hits all of them alike), after one warm-up step; the
median round is reported. Also: the dense FLOPs of one step (torch's FlopCounterMode: matmuls,
linear layers and attention; sparse kernels, softmax and element-wise work are not counted), the
FLOP/s this gives, and that as a share of the machine's matmul rate measured on the spot (a
[4096, d] x [d, d] product, the shape of a projection of every node, and a 2048^3 one), i.e. the
roofline of the step. ``--valid`` adds full-ranking passes over the validation split (one per
model and round, median) and the epoch estimate with its validation pass, which is what an
epoch of `mmsr train` costs, beside the epoch's dense FLOPs (steps and one counted validation
pass): the ratio of those is what a model's epoch would cost against the last model's if both ran
their dense work equally fast, a floor for the timed ratio wherever the rest is slower too.

The import path decides which code is measured: run it with PYTHONPATH pointing at another
checkout to time that one with the same script (docs/benchmarks.md compares commits that way).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode  # _count_flops overridden below

import mmsr_cli
from mmsr_cli import data, runtime
from mmsr_cli.evaluation import evaluate_split
from mmsr_cli.models import build_model
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.inputs import load_dataset
from mmsr_cli.training import TrainStep
from mmsr_cli.workdir import DatasetDir


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def matmul_rate(rows: int, inner: int, cols: int, repeats: int = 10) -> float:
    """FLOP/s of a float32 [rows, inner] x [inner, cols] product on this machine, now."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start)


class DenseFlopCounter(FlopCounterMode):
    """FlopCounterMode that leaves out products with a sparse operand, which it would count as
    dense [N, N] products (MMSR's CSR attention kernels)."""

    def _count_flops(self, func_packet, out, args, kwargs):
        if any(isinstance(a, torch.Tensor) and a.layout != torch.strided for a in args):
            return out
        return super()._count_flops(func_packet, out, args, kwargs)


class Subject:
    """One model with its optimiser and split, ready to take training steps."""

    def __init__(self, ds: DatasetDir, name: str, options: dict):
        self.name = name
        bundle = load_dataset(ds, ModelConfig(model=name, **options))
        self.train = bundle.open_split(ds, "train")
        self.valid = bundle.open_split(ds, "valid")
        torch.manual_seed(0)
        self.model = build_model(bundle.model_config, bundle.info)
        self.step_module = TrainStep(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.steps = 0

    def step(self, indices: np.ndarray) -> None:
        self.model.train()
        self.step_batch(self.train.collate(indices))

    def steps_as_training(self, batches: list[np.ndarray]) -> None:
        """The steps on ``batches`` as `mmsr train` takes them: each next batch collated in the
        background thread (data.prefetched) while this one computes."""
        self.model.train()
        for _, batch in data.prefetched(self.train, batches):
            self.step_batch(batch)

    def step_batch(self, batch: dict) -> None:
        loss = self.step_module(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        if self.steps % runtime.TRIM_EVERY_STEPS == 0:  # as the training loop does
            runtime.release_freed_memory()

    def valid_flops(self, batch_size: int) -> int:
        counter = DenseFlopCounter(display=False)
        with counter:
            evaluate_split(self.model, self.valid, batch_size, torch.device("cpu"))
        return counter.get_total_flops()

    def step_flops(self, indices: np.ndarray) -> int:
        counter = DenseFlopCounter(display=False)
        with counter:
            self.step(indices)
        return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--models", default="mmsr,sasrec")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--valid", action="store_true", help="also time one full-ranking validation pass")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a ModelConfig field for every model, e.g. --option layers=1")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    keep = getattr(runtime, "keep_freed_memory", None)  # what `mmsr train` does, where the code has it
    allocator = "glibc default"
    if keep is not None and keep():
        allocator = "freed memory kept (runtime.keep_freed_memory)"
    options = {"dim": args.dim, **{k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}}
    ds = DatasetDir.open(args.workdir, args.dataset)
    subjects = [Subject(ds, name, options) for name in args.models.split(",")]
    n_train = len(subjects[0].train)
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(n_train, size=min(args.batch, n_train), replace=False))
               for _ in range(args.steps + 1)]

    checkout = Path(mmsr_cli.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"{args.dataset}: batch {args.batch}, options {options}, torch threads {args.threads}, "
          f"{allocator}; code {checkout} @ {commit}; {cpu}, {time.strftime('%Y-%m-%d %H:%M')}")

    for s in subjects:
        s.step(batches[0])  # warm-up
    flops = {s.name: s.step_flops(batches[0]) for s in subjects}
    seconds: dict[str, list[float]] = {s.name: [] for s in subjects}
    for _ in range(args.rounds):
        for s in subjects:
            start = time.perf_counter()
            s.steps_as_training(batches[1:])
            seconds[s.name].append((time.perf_counter() - start) / args.steps)
    peak_proj = matmul_rate(4096, args.dim, args.dim)
    peak_square = matmul_rate(2048, 2048, 2048, repeats=3)

    base = statistics.median(seconds[subjects[-1].name])
    n_steps = -(-n_train // args.batch)
    print(f"machine matmul rate: {peak_proj / 1e9:.1f} GFLOP/s at [4096, {args.dim}] x [{args.dim}, {args.dim}], "
          f"{peak_square / 1e9:.1f} GFLOP/s at 2048^3")
    print(f"| model | s/step (median of {args.rounds}) | x {subjects[-1].name} | epoch estimate ({n_steps} steps) "
          f"| dense GFLOP/step | GFLOP/s | share of the projection-shape matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for s in subjects:
        med = statistics.median(seconds[s.name])
        rate = flops[s.name] / med
        print(f"| {s.name} | {med:.3f} | {med / base:.2f} | {med * n_steps:.0f} s | {flops[s.name] / 1e9:.2f} "
              f"| {rate / 1e9:.1f} | {rate / peak_proj:.0%} |")
    if args.valid:  # one pass per model and round, the models alternating like the steps
        passes: dict[str, list[float]] = {s.name: [] for s in subjects}
        valid_flops = {s.name: s.valid_flops(args.batch) for s in subjects}
        epoch_flops = {s.name: flops[s.name] * n_steps + valid_flops[s.name] for s in subjects}
        for _ in range(args.rounds):
            for s in subjects:
                start = time.perf_counter()
                metrics = evaluate_split(s.model, s.valid, args.batch, torch.device("cpu"))
                passes[s.name].append(time.perf_counter() - start)
        epoch = {s.name: statistics.median(seconds[s.name]) * n_steps + statistics.median(passes[s.name]) for s in subjects}
        for s in subjects:
            print(f"validation pass {s.name}: {statistics.median(passes[s.name]):.2f} s (median of {args.rounds}; "
                  f"{', '.join(f'{v:.2f}' for v in passes[s.name])}) over {metrics['n']} samples (full ranking, batch "
                  f"{args.batch}); epoch with validation {epoch[s.name]:.1f} s, "
                  f"{epoch[s.name] / epoch[subjects[-1].name]:.2f} x {subjects[-1].name}; dense GFLOP: validation pass "
                  f"{valid_flops[s.name] / 1e9:.1f}, epoch {epoch_flops[s.name] / 1e9:.0f} "
                  f"({epoch_flops[s.name] / epoch_flops[subjects[-1].name]:.2f} x {subjects[-1].name})")


if __name__ == "__main__":
    main()
