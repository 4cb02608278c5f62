"""TensorBoard event files of a training run (``runs/<run>/events.out.tfevents.*``).

One scalar per history value and epoch, under the names ``train/loss``, ``valid/<metric>``,
``time/seconds_per_epoch`` (also ``time/train_seconds``, ``time/valid_seconds``),
``memory/peak_rss_mib`` (``memory/peak_gpu_mib`` on CUDA), ``train/lr`` (the optimizer's learning
rate), and for MMSR with the adaptive update gate ``gate/layer<l>/beta_hohe_mean`` (mean weight of
the ho->he order, Eq. 16-17) and ``gate/layer<l>/share_hohe`` (share of nodes whose gate prefers
ho->he) over the epoch's training batches. Written with PyTorch's ``SummaryWriter``;
``tensorboard --logdir <workdir>/<dataset>/runs`` shows every run of a dataset side by side.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .workdir import full_disk_as_error

HISTORY_SCALARS = {
    "loss": "train/loss",
    "seconds": "time/seconds_per_epoch",
    "train_seconds": "time/train_seconds",
    "valid_seconds": "time/valid_seconds",
    "peak_rss_mib": "memory/peak_rss_mib",
    "peak_gpu_mib": "memory/peak_gpu_mib",
}


def scalar_tags(row: dict) -> dict[str, float]:
    """TensorBoard tag -> value of one history row (the numbers of history.json, by tag)."""
    out = {tag: float(row[key]) for key, tag in HISTORY_SCALARS.items() if row.get(key) is not None}
    out.update({f"valid/{name}": float(value) for name, value in row.get("valid", {}).items()})
    return out


class GateStats:
    """Running statistics of MMSR's update gate beta (``model.gate_values()``) over an epoch."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []  # per layer: [sum of beta_hohe, nodes preferring hohe, nodes]

    def add(self, model) -> None:
        gates = model.gate_values() if hasattr(model, "gate_values") else []
        for layer, beta in enumerate(gates):
            beta = beta.detach().to(torch.float64)
            row = torch.stack([beta[:, 0].sum(), (beta[:, 0] > beta[:, 1]).sum(), torch.tensor(float(len(beta)))])
            if layer == len(self.sums):
                self.sums.append(row.cpu())
            else:
                self.sums[layer] += row.cpu()

    def scalars(self) -> dict[str, float]:
        out = {}
        for layer, (beta_sum, prefer, n) in enumerate(s.tolist() for s in self.sums):
            if n:
                out[f"gate/layer{layer + 1}/beta_hohe_mean"] = beta_sum / n
                out[f"gate/layer{layer + 1}/share_hohe"] = prefer / n
        return out


def _quiet_writer_thread_errors() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails.

    The thread keeps its exception and the writer raises it again on the next add/flush/close in
    the training thread, where ``full_disk_as_error`` turns it into the one-line error; the
    traceback the thread itself would print through ``threading.excepthook`` is only noise.
    Installed once per process; every other thread's exceptions go to the previous hook.
    """
    if getattr(threading.excepthook, "_mmsr_quiet_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook._mmsr_quiet_tensorboard = True
    threading.excepthook = hook


class RunWriter:
    """A SummaryWriter on the run folder, or nothing at all when TensorBoard logging is off.

    Event files are append-only logs (TensorBoard reads a file cut short by a kill up to its last
    whole record), so they are written in place, not renamed; a full disk is the usual one line.
    """

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        self.folder = folder
        if enabled:
            # tensorboard: only when event files are written
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread_errors()

            with self._full_disk():
                self.writer = SummaryWriter(log_dir=str(folder))

    def _full_disk(self):
        return full_disk_as_error(self.folder / "events.out.tfevents")

    def epoch(self, row: dict, lr: float | None, gates: GateStats) -> None:
        if self.writer is None:
            return
        values = scalar_tags(row)
        if lr is not None:
            values["train/lr"] = lr
        values.update(gates.scalars())
        with self._full_disk():
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with self._full_disk():
                writer.close()
