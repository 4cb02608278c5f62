"""Data-parallel training over several processes (GPUs, machines) launched by ``torchrun``.

``torchrun`` starts one process per GPU and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; `mmsr train` then joins a process group (NCCL on CUDA, Gloo on CPU) and trains
with :class:`torch.nn.parallel.DistributedDataParallel`. Without those variables nothing here is
active and training runs in one process as before.

Batch arrangement: ``--batch-size B`` stays the GLOBAL batch. Every rank draws the same seeded
permutation of the epoch, cuts it into the same global batches of B samples, and takes its
contiguous slice of each batch (:func:`shard`: rank r of W gets about B/W samples). Each rank
weights its mean loss by its share of the global batch (times W, undone by DDP's gradient mean),
so the update equals one process's update on the whole batch up to floating point. Dropout draws
from a per-rank, per-epoch seeded generator, so masks differ between ranks and resume exactly.

Evaluation is sharded too: each rank ranks its contiguous slice of the samples and the metric
sums and sample counts are all-reduced (:func:`all_reduce_sums`), so every rank gets the metrics
of the whole split. Only rank 0 (:func:`is_main`) writes run files and logs; decisions (early
stopping) are taken on rank 0 and broadcast (:func:`broadcast_flag`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import MmsrError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when this process was started by torchrun (or any launcher setting its variables)."""
    return all(v in os.environ for v in ENV_VARS)


def active() -> bool:
    """True while a process group is initialised (collectives are needed)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return rank() == 0


def launched_main() -> bool:
    """Rank 0 of a torchrun launch by its RANK variable, or a process not launched by torchrun:
    the one that prints results once the group is gone."""
    return not launched() or os.environ["RANK"] == "0"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when training on CUDA, else ``device`` itself."""
    if active() and device.type == "cuda":
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise MmsrError(f"LOCAL_RANK {index}: this machine has only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join the torchrun process group for the duration of a training run (NCCL on CUDA, Gloo on
    CPU); yields whether it did. Does nothing when not launched by torchrun or already joined."""
    if not launched() or active():
        yield False
        return
    if not dist.is_available():
        raise MmsrError("torchrun: this torch build has no torch.distributed support")
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as e:
        raise MmsrError(f"torchrun: could not join the process group ({str(e).splitlines()[0]})") from e
    try:
        yield True
    finally:
        dist.destroy_process_group()


def shard(indices, part: int | None = None, parts: int | None = None):
    """This rank's contiguous slice of ``indices`` (rank r of W: [r*n//W, (r+1)*n//W)).

    Slices of all ranks concatenate to ``indices`` in order; some may be empty when n < W.
    """
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    n = len(indices)
    return indices[part * n // parts : (part + 1) * n // parts]


def all_reduce_sums(
    sums: dict[str, torch.Tensor], n: int, names: list[str], device: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-rank metric sums (keyed by ``names``; a rank that saw no sample has none) and sample
    count summed over all ranks; unchanged in one process."""
    if not active():
        return sums, n
    values = [torch.as_tensor(sums.get(m, 0.0), dtype=torch.float64, device=device).reshape(()) for m in names]
    packed = torch.stack([*values, torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return {m: packed[i] for i, m in enumerate(names)}, int(packed[-1].item())


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (a copy; identity in one process)."""
    value = value.clone()
    if active():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (so all ranks stop at the same epoch)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def check_agree(value: int, what: str, device: torch.device) -> None:
    """Fail on every rank whose ``value`` differs from rank 0's (e.g. the epoch a run resumes
    from, when the ranks do not see the same run folder)."""
    if not active():
        return
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    if int(t.item()) != value:
        raise MmsrError(f"rank {rank()}: {what} is {value} here but {int(t.item())} on rank 0; "
                        f"every machine must see the same --workdir (a shared file system)")


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when a group is active and it has trainable parameters.

    ``find_unused_parameters=True``: some models leave parameters out of a step (code channels of
    absent modalities, auxiliary predictors and collaborative hooks used only by some batches).
    """
    if not active() or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
