"""Bounded memory whatever the options (issue 21's bar: no command past 4 GiB on the synthetic set)
and allocator failures as one-line errors.

A batch whose forward/backward would pass the memory budget is split into micro-batches
(mmsr_cli/memory.py): the same batch loss and gradients up to float rounding, a batch that fits is
never split. The bar itself is checked in child processes on the synthetic set at the largest
batch size with the heaviest aggregators, their address space capped so that a regression ends
in a refused allocation instead of the OOM killer; a refused allocation is the one-line exit-2
error naming what ran out, not an internal error.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_same, one_error_line, run_cli, run_cli_limited
from mmsr_cli import contracts as C
from mmsr_cli import memory
from mmsr_cli.workdir import DatasetDir
from test_aggregators import synthetic_with_graphs

GIB = 1 << 30
BAR_MIB = 4096
ADDRESS_SPACE_CAP = 8 * GIB  # torch reserves ~3.8 GB of address space while touching ~0.8 GB


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> DatasetDir:
    return synthetic_with_graphs(run_cli, tmp_path_factory.mktemp("work"))


def _log_after(ds: DatasetDir, offset: int) -> str:
    path = ds.path("logs/train.log")
    return path.read_text()[offset:] if path.exists() else ""


def _log_size(ds: DatasetDir) -> int:
    return len(_log_after(ds, 0))


def _train(ds: DatasetDir, *args) -> dict:
    r = run_cli(["train", "--workdir", ds.workdir, "--dataset", ds.name, "--epochs", "1", "--max-steps", "3",
                 "--device", "cpu", *args])
    assert r.exit_code == 0, r.stderr
    return r


@pytest.mark.parametrize("model", ["mmsr", "sasrec"])
def test_micro_batches_give_the_batch_loss_and_gradients(synthetic, monkeypatch, model):
    """With a budget that splits every batch, one epoch without dropout ends in the same loss,
    weights and validation metrics as with whole batches, up to float rounding."""
    args = ["--model", model, "--dropout", "0", "--dim", "16", "--batch-size", "256"]
    _train(synthetic, *args, "--run-name", f"{model}-whole")
    offset = _log_size(synthetic)
    monkeypatch.setattr(memory, "STEP_BUDGET_BYTES", 64 << 10)  # 64 KiB: micro-batches of a few samples
    _train(synthetic, *args, "--run-name", f"{model}-split")
    runs = synthetic.path(C.RUNS_DIR)
    assert "split into micro-batches" in _log_after(synthetic, offset)  # the budget did split the batches
    whole, split = (json.loads((runs / f"{model}-{r}" / "history.json").read_text())[0] for r in ("whole", "split"))
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert split["valid"] == pytest.approx(whole["valid"], abs=1e-6)
    a, b = (torch.load(runs / f"{model}-{r}" / "best.pt", weights_only=True) for r in ("whole", "split"))
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.qkv.bias"):  # the key bias has no gradient (softmax is shift-invariant):
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]  # Adam turns its rounding noise into lr-size steps
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=key)


def test_a_batch_that_fits_is_not_split(synthetic, monkeypatch):
    """The memory probe changes nothing for a batch within the budget: the run (dropout on) has
    the same weights bit for bit as one trained without the probe, and no micro-batches."""
    offset = _log_size(synthetic)
    _train(synthetic, "--model", "mmsr", "--dim", "16", "--run-name", "probed")
    assert "split into micro-batches" not in _log_after(synthetic, offset)
    with monkeypatch.context() as m:
        m.setattr(memory, "measure", lambda *a, **k: None)  # whole batches, no probe: the harness before it
        _train(synthetic, "--model", "mmsr", "--dim", "16", "--run-name", "unprobed")
    runs = synthetic.path(C.RUNS_DIR)
    a, b = (torch.load(runs / r / "last.pt", weights_only=True) for r in ("probed", "unprobed"))
    assert_same(a["model"], b["model"])
    assert a["history"][0]["loss"] == b["history"][0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("args, commands", [
    (["--model", "mmsr", "--aggregator", "hgt"], ()),
    (["--model", "mmsr", "--aggregator", "transformer", "--dim", "256"], ()),
    (["--model", "mmsr", "--layers", "4", "--dim", "512"], ("evaluate", "recommend")),
    (["--model", "sasrec", "--dim", "512", "--heads", "64", "--layers", "4"], ("evaluate", "recommend")),
], ids=["hgt", "transformer-d256", "han-d512-l4", "sasrec-d512-h64"])
def test_largest_batches_stay_under_the_bar(synthetic, args, commands):
    """`train` (whose validation pass scores at the same batch size), `evaluate` and `recommend
    --all-users` at --batch-size 4096 on the synthetic set peak under 4 GiB (each went past 7 GiB
    with whole batches). The scoring commands run for one graph model and one sequence model:
    their micro-batching is the evaluation's, whatever the aggregator, and the aggregators'
    training steps are what differ."""
    w = ["--workdir", synthetic.workdir, "--dataset", synthetic.name]
    run = "big-" + "-".join(a.lstrip("-") for a in args)
    r = run_cli_limited(["train", *w, *args, "--batch-size", "4096", "--epochs", "1", "--max-steps", "1",
                         "--device", "cpu", "--run-name", run, "--no-tensorboard"], ADDRESS_SPACE_CAP)
    assert r.exit_code == 0, r.stderr
    assert r.peak_rss_mib < BAR_MIB, (args, r.peak_rss_mib)
    scoring = {"evaluate": ["evaluate", "--run", run], "recommend": ["recommend", "--run", run, "--all-users", "--top-k", "5"]}
    for command in (scoring[c] for c in commands):
        r = run_cli_limited([command[0], *w, *command[1:]], ADDRESS_SPACE_CAP)
        assert r.exit_code == 0, r.stderr
        assert r.peak_rss_mib < BAR_MIB, (command, r.peak_rss_mib)


@pytest.mark.slow
def test_refused_allocation_is_one_line_exit_2(synthetic):
    """Under address-space caps too small for the work, `train` ends in exit 2 and one line saying
    the memory ran out (the limit and the free memory named), never exit 1 with a traceback.
    Where the cap is reached varies (importing torch, building the model, a step), so a few caps."""
    w = ["--workdir", synthetic.workdir, "--dataset", synthetic.name]
    seen = 0
    for cap in (3 * GIB, int(4.2 * GIB), int(4.6 * GIB)):
        r = run_cli_limited(["train", *w, "--model", "mmsr", "--batch-size", "4096", "--dim", "1024", "--epochs", "1",
                             "--max-steps", "1", "--device", "cpu", "--run-name", "capped"], cap)
        if r.exit_code == 0:
            continue
        line = one_error_line(r)
        assert "out of memory" in line and "address-space limit" in line, line
        seen += 1
    assert seen, "no cap made the allocation fail"


THREAD_UNDER_CAP = r"""
import resource, threading
from mmsr_cli.errors import allocator_failure, out_of_memory_message
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:  # an 8 MiB thread stack cannot be mapped within 2 MiB of headroom
    threading.Thread(target=lambda: None).start()
    print("started")
except RuntimeError as e:
    print(type(e).__name__, "|", e, "|", allocator_failure(e) is e, "|", out_of_memory_message(e))
"""


def test_a_thread_that_cannot_start_under_an_address_space_cap_is_out_of_memory():
    """A thread whose stack the address-space limit refuses (TensorBoard's writer once hit this
    in test_refused_allocation's `train`) is the refused allocation: the one-line out-of-memory
    error naming the limit, not an internal error. Without a limit the same text may be the
    thread limit and is not called memory."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    from mmsr_cli.errors import allocator_failure

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", THREAD_UNDER_CAP], env=env, capture_output=True, text=True, timeout=60)
    kind, text, is_memory, line = (part.strip() for part in r.stdout.split("|"))
    assert (kind, text, is_memory) == ("RuntimeError", "can't start new thread", "True"), r.stdout + r.stderr
    assert line.startswith("out of memory:") and "address-space limit" in line, line
    if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:  # this process: no cap
        assert allocator_failure(RuntimeError("can't start new thread")) is None
