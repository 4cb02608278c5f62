"""The training harness shared by MMSR and the baselines (`mmsr train`).

One loop for every model (paper section 3.1): batches of a split's samples, user vectors scored
against all items by dot product (Eq. 7), cross-entropy over all items, Adam with L2 weight decay,
full-ranking validation after every epoch and early stopping on the validation metric (the test
split is never looked at here).

A run lives in ``<dataset>/runs/<run>/`` (runs.py names, records and loads it):

* ``config.json``: TrainConfig, ModelConfig, dataset sizes and the fingerprints of the stages the
  run read (runs.config_record);
* ``last.pt``: model, optimizer, epoch, torch RNG states, early-stopping state and history, written
  atomically after every epoch; ``--resume`` (the default) continues from it, and on CPU the result
  equals that of an uninterrupted run (shuffling is seeded per epoch, the dropout RNG is restored);
* ``best.pt``: the model's state_dict at the best validation epoch;
* ``history.json``, ``history.csv``, ``curve.png``: per-epoch loss, validation metrics and time;
  ``events.out.tfevents.*``: the same numbers for TensorBoard (tensorboard_log.py; ``--no-tensorboard``).

Under ``torchrun`` the run is data-parallel over the launched processes (distributed.py: global
batch ``--batch-size`` split over the ranks, sharded validation, rank 0 writes every file).

All ``.pt`` files hold only tensors and plain containers: ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import contracts as C
from . import distributed, memory
from .data import prefetched, to_device
from .errors import MmsrError
from .evaluation import evaluate_split
from .inputs import load_dataset
from .metrics import METRIC_NAMES
from .models import build_model, check_model_config
from .models.base import ModelConfig, Recommender
from .robustness import apply_drop
from .runs import (
    TrainConfig,
    config_difference,
    config_record,
    default_run_name,
    load_torch,
    read_run_config,
    run_dir,
    save_torch_atomic,
)
from .runtime import TRIM_EVERY_STEPS, keep_freed_memory, progress, release_freed_memory, resolve_device, set_seed
from .tensorboard_log import GateStats, RunWriter
from .workdir import DatasetDir, atomic_path, write_bytes_atomic, write_json_atomic, writer_lock


def _size_options(tc: TrainConfig, mc: ModelConfig) -> str:
    """The options that set a training step's memory, as given (for the one-line refusal)."""
    shown = f"--batch-size {tc.batch_size} --dim {mc.dim} --layers {mc.layers}"
    if mc.model == "mmsr":
        return f"{shown} --aggregator {mc.aggregator} --max-len {mc.max_len}"
    return f"{shown} --heads {mc.heads} --max-len {mc.max_len}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# History fields that measure the machine, not the model: they differ between identical runs.
MEASUREMENT_FIELDS = ("seconds", "train_seconds", "valid_seconds", "peak_rss_mib", "peak_gpu_mib")


def without_measurements(row: dict) -> dict:
    """A history row with only what a seed determines (for comparing runs)."""
    return {k: v for k, v in row.items() if k not in MEASUREMENT_FIELDS}


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory of this process so far, for the history: resident set size (MiB) and, on a CUDA
    device, the most memory torch allocated on it. A resumed run counts from its resumption."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def write_history(folder: Path, history: list[dict], metric: str) -> None:
    write_json_atomic(folder / C.RUN_HISTORY_JSON, history)
    columns = ["epoch", "loss", "seconds", "train_seconds", "valid_seconds", "steps", "peak_rss_mib", "peak_gpu_mib",
               *METRIC_NAMES]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:  # rows of runs trained before the memory fields existed leave them empty
        writer.writerow({k: v for k, v in row.items() if k != "valid"} | row["valid"])
    write_bytes_atomic(folder / C.RUN_HISTORY_CSV, buf.getvalue().encode())
    _write_curve(folder / C.RUN_CURVE_PNG, history, metric)


def _write_curve(path: Path, history: list[dict], metric: str) -> None:
    # matplotlib: only when the curve is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (CE)", title="loss")
    ax_metric.plot(epochs, [h["valid"][metric] for h in history], marker="o", color="tab:green")
    ax_metric.set(xlabel="epoch", ylabel=f"valid {metric}", title=f"validation {metric}")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run: str
    folder: Path
    best_epoch: int
    best_valid: dict[str, float]
    epochs_run: int  # epochs completed in total (resumed ones included)
    seconds_per_epoch: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)

    def summary(self, metric: str) -> str:
        v = self.best_valid
        shown = ", ".join(f"{m} {v[m]:.4f}" for m in dict.fromkeys([metric, "hr@10", "mrr@10", "ndcg@10"]))
        stop = " (early stop)" if self.stopped_early else ""
        return (
            f"run {self.run}: best epoch {self.best_epoch}/{self.epochs_run}{stop}; valid {shown}; "
            f"{self.seconds_per_epoch:.2f} s/epoch; {self.folder}"
        )


def _has_parameters(model: Recommender) -> bool:
    return any(p.requires_grad for p in model.parameters())


class TrainStep(torch.nn.Module):
    """One training forward: CE over all items of the Eq. 7 scores, and the model's auxiliary
    loss (BM3's, DIF-SR's predictors), in one module call so DistributedDataParallel sees it."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = F.cross_entropy(self.model.score(batch), batch["target"])  # Eq. 7 + CE over all items
        auxiliary = self.model.auxiliary_loss(batch)  # a model's own extra objective (BM3)
        return loss if auxiliary is None else loss + auxiliary


def train(
    ds: DatasetDir,
    tc: TrainConfig,
    mc: ModelConfig,
    *,
    resume: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    tensorboard: bool = True,
) -> TrainResult:
    """Train (or resume) the run ``tc.run_name``; see the module docstring for the files. Under
    torchrun, every launched process joins the process group for the run (distributed.py).

    ``on_epoch(row)`` sees each history row (epoch, loss, ``valid`` metrics) once the epoch's files
    are written, the rows a resumed run already had first; an exception it raises (`mmsr tune`'s
    pruning) ends the run there, its files those of a run interrupted after that epoch. Called in
    rank 0 only: not for torchrun."""
    with distributed.process_group(resolve_device(tc.device)):
        run = tc.run_name or default_run_name(ds, tc, mc)
        # One writer per run folder (rank 0 alone writes it under torchrun).
        lock = writer_lock(ds.path(C.run_lock(run)), f"run {run}") if distributed.is_main() else contextlib.nullcontext()
        with lock:
            return _train(ds, tc, mc, resume=resume, on_epoch=on_epoch, tensorboard=tensorboard)


def _train(ds: DatasetDir, tc: TrainConfig, mc: ModelConfig, *, resume: bool, on_epoch=None,
           tensorboard: bool = True) -> TrainResult:
    tc.validate()
    keep_freed_memory()
    mc = check_model_config(ModelConfig(**{**asdict(mc), "model": tc.model}))
    device = distributed.device_for(resolve_device(tc.device))
    bundle = load_dataset(ds, mc)
    if tc.drop_modality:  # missing modalities for the whole run (section 5.4)
        bundle, _ = apply_drop(ds, bundle, tc.drop_modality, tc.drop_ratio, tc.seed)
    mc = bundle.model_config
    run = tc.run_name or default_run_name(ds, tc, mc)
    tc = TrainConfig(**{**asdict(tc), "run_name": run})
    folder = run_dir(ds, run)
    log = ds.logger(C.STAGE_TRAIN) if distributed.is_main() else logging.getLogger(f"mmsr.rank{distributed.rank()}")
    log.disabled = not distributed.is_main()
    record = config_record(ds, tc, bundle)

    # Checked before the run folder is created, so a refused run leaves nothing behind.
    train_split = bundle.open_split(ds, "train")
    valid_split = bundle.open_split(ds, "valid")
    if len(train_split) == 0 or len(valid_split) == 0:
        raise MmsrError(f"{ds.root}: the train or valid split has no samples; re-run `mmsr preprocess`")

    set_seed(tc.seed)
    model = build_model(mc, bundle.info).to(device)
    trainable = _has_parameters(model)
    # Micro-batches where a batch's forward/backward would pass the memory budget (memory.py),
    # and a configuration whose single sample cannot fit refused before anything is written.
    step_memory = memory.measure(model, train_split.collate, memory.history_lengths(train_split), len(train_split),
                                 device, loss=TrainStep(model))
    memory.check_fits(step_memory, _size_options(tc, mc))
    micro = step_memory.micro_batch(tc.batch_size) if step_memory is not None else tc.batch_size
    score_memory = memory.measure(model, valid_split.collate, memory.history_lengths(valid_split), len(valid_split),
                                  device)
    valid_micro = score_memory.micro_batch(tc.batch_size) if score_memory is not None else tc.batch_size
    # Pop and other parameter-free models: one pass gives their (fixed) result.
    epochs = tc.epochs if trainable else 1
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay) if trainable else None
    )

    history: list[dict] = []
    best = {"epoch": 0, "value": -math.inf, "valid": {}}
    bad_epochs, stopped, start_epoch = 0, False, 1
    last_path = folder / C.RUN_LAST_CKPT
    resuming = resume and last_path.exists() and (folder / C.RUN_CONFIG).exists()
    distributed.barrier()  # every rank has decided before rank 0 touches the folder
    if resuming:
        diff = config_difference(read_run_config(folder / C.RUN_CONFIG), record)
        if diff is not None:
            raise MmsrError(
                f"{folder}: run exists with another configuration ({diff}); use --no-resume to "
                f"overwrite it or another --run-name"
            )
        ckpt = load_torch(last_path)
        try:
            model.load_state_dict(ckpt["model"])
            if optimizer is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise MmsrError(f"{last_path}: does not fit this model ({str(e).splitlines()[0]}); use --no-resume") from e
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        bad_epochs, stopped = int(ckpt["bad_epochs"]), bool(ckpt["stopped"])
        start_epoch = int(ckpt["epoch"]) + 1
        log.info("resume %s from epoch %d", run, start_epoch - 1)
        if (stopped or start_epoch > epochs) and distributed.is_main():  # killed after the final last.pt, before its history files
            write_history(folder, history, tc.metric)
    elif distributed.is_main():
        if folder.exists():  # a fresh start must not leave files of an earlier run behind
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    distributed.check_agree(start_epoch, "the epoch this run resumes after + 1", device)
    if distributed.is_main():
        write_json_atomic(folder / C.RUN_CONFIG, record)
    for row in history if on_epoch is not None else ():  # the epochs a resumed run already has
        on_epoch(row)
    step = distributed.wrap(TrainStep(model), device)  # DDP under torchrun (not for Pop)
    log.info("train %s on %s: %s %s (device %s)", run, ds.name, tc, mc, device)
    if micro < tc.batch_size or valid_micro < tc.batch_size:
        log.info("memory: batches of %d split into micro-batches of %d (training) and %d (validation): %.0f MiB "
                 "of saved activations per sample, budget %d MiB", tc.batch_size, micro, valid_micro,
                 step_memory.per_sample / 2**20, memory.STEP_BUDGET_BYTES >> 20)

    n_batches = math.ceil(len(train_split) / tc.batch_size)
    if tc.max_steps:
        n_batches = min(n_batches, tc.max_steps)
    n_valid_batches = math.ceil(len(valid_split) / tc.batch_size)

    tb = RunWriter(folder, tensorboard and distributed.is_main())
    with progress(transient=True) as bar, contextlib.closing(tb):
        for epoch in range(start_epoch, epochs + 1):
            if stopped:
                break
            task = bar.add_task(f"{run} epoch {epoch}/{epochs}", total=n_batches + n_valid_batches)
            t0 = time.perf_counter()
            # Shuffling seeded per epoch: a resumed run sees the same order as a straight one.
            order = np.random.default_rng([tc.seed, epoch]).permutation(len(train_split))
            if distributed.active():  # per-rank dropout masks, reproducible on resume
                torch.manual_seed(int(np.random.SeedSequence([tc.seed, epoch, distributed.rank()]).generate_state(1)[0]))
            step.train()
            gates = GateStats()
            loss_sum, steps = torch.zeros((), dtype=torch.float64, device=device), 0
            parts, part_indices = [], []  # (weight in the batch's mean loss, first part, last part)
            for b in range(n_batches):
                global_batch = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                idx = distributed.shard(global_batch)  # the whole batch in one process
                share = len(idx) / len(global_batch)  # this rank's weight in the batch's mean loss
                idx = idx if len(idx) else global_batch[:1]  # fewer samples than ranks: a zero-weight step keeps DDP in sync
                pieces = memory.micro_batches(idx, micro)  # [idx] unless the batch passes the memory budget
                for k, piece in enumerate(pieces):
                    weight = share if len(pieces) == 1 else share * len(piece) / len(idx)
                    parts.append((weight, k == 0, k == len(pieces) - 1))
                    part_indices.append(piece)
            for (weight, first, last), (_, batch) in zip(parts, prefetched(train_split, part_indices)):
                batch = to_device(batch, device)
                if optimizer is None:
                    with torch.no_grad():
                        loss = step(batch) * weight
                else:
                    if first:
                        optimizer.zero_grad(set_to_none=True)
                    loss = step(batch) * weight
                    # DDP averages gradients over the W ranks: W * share recovers the batch mean;
                    # micro-batches add their parts of it into the same gradients
                    with step.no_sync() if not last and hasattr(step, "no_sync") else contextlib.nullcontext():
                        (loss * distributed.world_size()).backward()
                    if last:
                        if tc.clip_norm > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
                        optimizer.step()
                batch_loss = loss.detach() if first else batch_loss + loss.detach()
                if not last:
                    continue
                if tb.writer is not None:
                    gates.add(model)
                loss_sum += batch_loss
                steps += 1
                if steps % TRIM_EVERY_STEPS == 0:
                    release_freed_memory()
                bar.advance(task)
            mean_loss = float(distributed.all_reduce_sum(loss_sum)) / max(steps, 1)
            if not math.isfinite(mean_loss):
                raise MmsrError(f"--lr {tc.lr}: training loss became {mean_loss} in epoch {epoch}; lower the learning rate")
            t1 = time.perf_counter()
            valid = evaluate_split(model, valid_split, tc.batch_size, device, lambda n: bar.advance(task, 1),
                                   micro_batch=valid_micro)
            valid.pop("n")
            release_freed_memory()
            t2 = time.perf_counter()
            bar.remove_task(task)
            row = {
                "epoch": epoch,
                "loss": round(mean_loss, 6),
                "steps": steps,
                "train_seconds": round(t1 - t0, 3),
                "valid_seconds": round(t2 - t1, 3),
                "seconds": round(t2 - t0, 3),
                **peak_memory_mib(device),
                "valid": valid,
            }
            history.append(row)
            value = valid[tc.metric]
            if value > best["value"]:  # early stopping and best.pt follow the validation metric only
                best = {"epoch": epoch, "value": value, "valid": valid}
                bad_epochs = 0
                if distributed.is_main():
                    save_torch_atomic(folder / C.RUN_BEST_CKPT, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                bad_epochs += 1
            stopped = distributed.broadcast_flag(tc.patience > 0 and bad_epochs >= tc.patience, device)
            if not distributed.is_main():
                distributed.barrier()  # rank 0 writes the epoch's files
                continue
            save_torch_atomic(
                last_path,
                {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict() if optimizer is not None else {},
                    "epoch": epoch,
                    "rng": _rng_state(),
                    "best": best,
                    "bad_epochs": bad_epochs,
                    "stopped": stopped,
                    "history": history,
                },
            )
            write_history(folder, history, tc.metric)
            tb.epoch(row, optimizer.param_groups[0]["lr"] if optimizer is not None else None, gates)
            log.info("epoch %d: loss %.5f, valid %s, %.2fs", epoch, mean_loss, json.dumps(valid), t2 - t0)
            if stopped:
                log.info("early stop: no %s improvement for %d epochs", tc.metric, bad_epochs)
            if on_epoch is not None:
                on_epoch(row)
            distributed.barrier()

    if not history:
        raise MmsrError(f"{folder}: no epoch was trained")
    seconds = float(np.mean([h["seconds"] for h in history]))
    result = TrainResult(run, folder, best["epoch"], best["valid"], history[-1]["epoch"], seconds, stopped, history)
    log.info("%s", result.summary(tc.metric))
    return result

