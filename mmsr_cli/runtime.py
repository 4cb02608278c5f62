"""Seeds, devices, the console and progress bars, and memory housekeeping shared by the stages.

The library writes its progress and summaries through :data:`console`; the CLI (app.py) prints
through the same object, so there is one stderr stream however mmsr is driven."""

from __future__ import annotations

import ctypes
import functools
import os
import random
import subprocess
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .errors import MmsrError

console = Console(stderr=True)  # progress and summaries; stdout is kept for data (recommend)


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The code that computes a run's numbers, for its config and metrics files: mmsr's version
    and, where the package sits in a git checkout, the commit and whether the package's files
    differ from it (None where git or the checkout is absent, as in an installed wheel)."""
    package = Path(__file__).resolve().parent
    commit = modified = None
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."],
                                    capture_output=True, text=True, timeout=10)
            modified = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"mmsr": __version__, "commit": commit, "modified": modified}


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs on one machine."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    # torch: not at import (app.py imports this module for its console)
    import torch

    torch.manual_seed(seed)


def release_freed_memory() -> bool:
    """Hand the heap pages of freed tensors back to the OS (glibc's ``malloc_trim``); False where
    the C library has none (macOS, musl), which then keeps its own policy.

    Training batches whose shapes change from step to step (length groups, per-batch graphs)
    fragment glibc's heap: the blocks one step frees rarely fit the next step's tensors, and the
    process keeps growing. A DIF-SR training on Amazon Beauty grew from 1.5 to 4.5 GiB over five
    epochs; trimming every ``TRIM_EVERY_STEPS`` steps keeps it near 1 GiB for ~3 % more CPU time
    (docs/benchmarks.md, "Length groups").
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


TRIM_EVERY_STEPS = 20

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit systems


def keep_freed_memory() -> bool:
    """Let glibc reuse freed tensor memory instead of handing it back to the OS at every free;
    False where the C library has no ``mallopt`` (macOS, musl).

    By default glibc serves blocks over 128 KiB to 32 MiB with fresh ``mmap`` pages once its
    adaptive threshold is left behind by shape-changing batches, and every fresh page costs a
    page fault on first touch: a graph batch's [N, d] tensors are a few MiB, so an MMSR training
    step took ~15,000 page faults and spent about a quarter of its time in them (in a virtual
    machine a fault is several microseconds). With blocks up to 32 MiB kept in the heap, and the
    heap trimmed only by :func:`release_freed_memory` every ``TRIM_EVERY_STEPS`` steps, a step
    takes a few hundred (docs/benchmarks.md, "MMSR's training step"). The same effect as the
    jemalloc/tcmalloc preload PyTorch's CPU tuning guide recommends, without a preload.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(_M_TOP_PAD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return True


def resolve_device(device: str) -> "torch.device":  # noqa: F821
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    # torch: not at import (app.py imports this module for its console)
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MmsrError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise MmsrError(f"--device: expected auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


@contextmanager
def progress(transient: bool = False) -> Iterator[Progress]:
    """A rich progress bar on stderr; hidden when stderr is not a terminal (batch jobs, tests)
    and on every torchrun rank but rank 0 (distributed.py)."""
    from .distributed import is_main  # imports torch: the CLI imports this module for its console

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal or not is_main(),
    ) as bar:
        yield bar
