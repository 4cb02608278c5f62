"""Memory of a forward/backward pass, bounded whatever the options (`train`, `evaluate`, `recommend`).

A batch's activations grow with ``--batch-size`` and with what each sample costs (``--dim``,
``--layers``, ``--heads``, the history length, the aggregator). Rather than refusing options, the
harness splits a batch that would need more than :data:`STEP_BUDGET_BYTES` into micro-batches:
in training each micro-batch's cross-entropy sum is back-propagated into the same gradients
(the batch's mean loss and gradients, up to float rounding), in scoring each micro-batch is
scored on its own. A batch that fits is never split, so runs that fit the budget are unchanged.

What a sample costs is measured, not guessed: :func:`measure` runs the model's training loss on
samples spread evenly over the split's history lengths (8, then 16: a batch's mix) and sums the
bytes of the tensors autograd saves for the backward pass (``saved_tensors_hooks``); the slope
between the two is the cost per sample. The count depends on tensor
shapes only, so the split is the same on every machine and for a resumed run; the RNG state is
restored afterwards, so the probe changes no result. Where a single sample would not fit in the
memory the machine has, the command stops before any work with one line naming the options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import psutil
import torch

from .data import to_device
from .errors import MmsrError

#: estimated bytes of saved activations one forward/backward may hold. On the synthetic set a
#: training's peak RSS is about 1 GiB (torch, data, model, validation) plus 1.2 to 2.2 times the
#: saved bytes (1.2: MMSR's HAN-GNN at d 64; 2.2: four HAN layers at d 512, whose temporaries the
#: probe does not see), so a step within the budget stays under the 4 GiB of issue 21's bar
#: (measured: 3.4 GiB for that four-layer model at --batch-size 4096; 4.1 GiB with a 1.5 GiB budget).
STEP_BUDGET_BYTES = 1 << 30  # 1 GiB
#: samples in the two probes (the slope between them is the per-sample cost)
PROBE_SAMPLES = (8, 16)
#: real peak / saved bytes, for refusing a configuration whose single sample cannot fit
PEAK_FACTOR = 2.0


@dataclass(frozen=True)
class StepMemory:
    """Saved activation bytes of a forward/backward: ``fixed + per_sample * n`` for n samples."""

    fixed: float
    per_sample: float
    model_bytes: int = 0  # parameters; training holds them 4 times (weights, gradients, Adam's two moments)

    def bytes_for(self, n: int) -> float:
        return self.fixed + self.per_sample * n

    def micro_batch(self, batch_size: int) -> int:
        """The most samples (at most ``batch_size``, at least 1) whose step fits the budget, less
        what the model's parameters take beyond it (SASRec at dim 1024, 16 layers: 1.6 GB with
        gradients and Adam's moments), but at least an eighth of it."""
        budget = max(STEP_BUDGET_BYTES - self.model_bytes, STEP_BUDGET_BYTES / 8)
        if self.bytes_for(batch_size) <= budget or self.per_sample <= 0:
            return batch_size
        return int(max(1, min(batch_size, (budget - self.fixed) // self.per_sample)))


def history_lengths(split) -> np.ndarray | None:
    """Per-sample history lengths of a split (SequenceSplit, GraphSplit, robustness's splits)."""
    for owner in (split, getattr(split, "samples", None)):
        for name in ("ptr", "hist_ptr"):
            ptr = getattr(owner, name, None)
            if ptr is not None:
                return np.diff(np.asarray(ptr, dtype=np.int64))
    return None


def _saved_bytes(model: torch.nn.Module, batch: dict, loss: Callable[[dict], torch.Tensor] | None) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in ``loss`` on ``batch`` (the
    model's scores when None)."""
    training = loss is not None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse layouts: count their values (an estimate)
            sizes[("sparse", id(t))] = t._nnz() * t.element_size() if t.layout != torch.strided else 0
            return t
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    was_training = model.training
    model.train(training)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss(batch) if training else model.score(batch)
        del out
    finally:
        model.train(was_training)
    return sum(sizes.values())


def measure(model: torch.nn.Module, collate: Callable[[np.ndarray], dict], lengths: np.ndarray | None,
            n_samples: int, device: torch.device, loss: Callable[[dict], torch.Tensor] | None = None,
            ) -> StepMemory | None:
    """The saved activation bytes per sample of the split's mix of ``loss`` (a training step,
    e.g. training.TrainStep(model): its backward's memory), or of ``model``'s scores when None;
    None for a model without trainable parameters (Pop) or an empty split."""
    training = loss is not None
    if n_samples == 0 or not any(p.requires_grad for p in model.parameters()):
        return None
    order = np.arange(n_samples) if lengths is None else np.argsort(lengths, kind="stable")
    k1, k2 = (min(k, n_samples) for k in PROBE_SAMPLES)

    def spread(k: int) -> np.ndarray:  # k samples evenly spread over the lengths: a batch's mix
        return order[np.linspace(0, n_samples - 1, k).round().astype(np.int64)]

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        s1 = _saved_bytes(model, to_device(collate(spread(k1)), device), loss)
        s2 = _saved_bytes(model, to_device(collate(spread(k2)), device), loss) if k2 > k1 else s1
    finally:  # the probe's dropout draws must not shift the run's random numbers
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) * (4 if training else 1)
    if k2 == k1:
        return StepMemory(0.0, s1 / k1, params)
    per_sample = max(0.0, (s2 - s1) / (k2 - k1))
    return StepMemory(max(0.0, s1 - per_sample * k1), per_sample, params)


def available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def check_fits(memory: StepMemory | None, options: str, what: str = "a training step") -> None:
    """Refuse, before any work, a configuration whose single-sample step needs more memory than
    the machine has available now (its estimated peak: :data:`PEAK_FACTOR` x the saved bytes)."""
    if memory is None:
        return
    need, have = PEAK_FACTOR * memory.bytes_for(1) + memory.model_bytes, available_bytes()
    if need > have:
        raise MmsrError(f"{options}: {what} of one sample needs an estimated {need / 2**30:.1f} GiB, "
                        f"{have / 2**30:.1f} GiB of memory is available; lower these options")


def micro_batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """``indices`` in consecutive parts of at most ``size`` (one part when it fits)."""
    if len(indices) <= size:
        return [indices]
    return [indices[i : i + size] for i in range(0, len(indices), size)]
