"""Smoke tests on a CUDA device (marker `cuda`; scripts/gpu_check.sh runs them with
MMSR_TEST_CUDA=1): the sparse attention of the HAN layer forward and backward against the CPU,
train, resume, evaluate and recommend on cuda, and half-precision feature extraction.

Elsewhere they skip with the reason; MMSR_TEST_CUDA=cpu runs them on the CPU, which checks their
plumbing (``gpu_check.sh --cpu-dry-run``). GPU results are compared with tolerances, not bit for
bit: scatter atomics and GEMM order make them differ from the CPU in the last bits
(docs: /work/shared/gpu-review.md), and near-tied scores may swap ranks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli.workdir import DatasetDir

from conftest import make_items, run_cli, tiny_hf_model
from test_training import make_coded_toy

pytestmark = pytest.mark.cuda

SMALL = ["--epochs", "2", "--max-steps", "3", "--dim", "16", "--batch-size", "32", "--patience", "0",
         "--dropout", "0", "--no-tensorboard"]
MODELS = {"mmsr": ["--layers", "2"], "sasrec": ["--heads", "2"]}


def mmsr(ds: DatasetDir, command: str, *args) -> str:
    r = run_cli([command, "--workdir", ds.workdir, "--dataset", ds.name, *map(str, args)])
    assert r.exit_code == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> DatasetDir:
    return make_coded_toy(tmp_path_factory.mktemp("cuda"))


def history(ds: DatasetDir, run: str) -> list[dict]:
    return json.loads(ds.path(f"{C.RUNS_DIR}/{run}/history.json").read_text())


@pytest.mark.parametrize("model", list(MODELS))
def test_train_resume_evaluate_recommend_on_cuda(coded, cuda_device, model):
    from mmsr_cli.significance import read_ranks

    args = ["--model", model, *MODELS[model], *SMALL, "--device", cuda_device]
    mmsr(coded, "train", *args, "--run-name", f"{model}-straight")
    mmsr(coded, "train", *args, "--epochs", "1", "--run-name", f"{model}-resumed")
    mmsr(coded, "train", *args, "--run-name", f"{model}-resumed")  # resumes on the device from epoch 1
    straight, resumed = history(coded, f"{model}-straight"), history(coded, f"{model}-resumed")
    assert [h["epoch"] for h in resumed] == [1, 2] and [h["steps"] for h in resumed] == [3, 3]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["valid"] == pytest.approx(b["valid"], abs=0.02)
    if cuda_device == "cuda":
        assert all(h["peak_gpu_mib"] > 0 for h in straight)
    else:
        assert all("peak_gpu_mib" not in h for h in straight)

    # evaluate on the device and on the CPU: the same ranks but for near ties
    run = f"{model}-straight"
    folder = coded.path(f"{C.RUNS_DIR}/{run}")
    mmsr(coded, "evaluate", "--run", run, "--device", "cpu")
    cpu_ranks = read_ranks(folder / C.ranks_file("test"))
    cpu_metrics = json.loads((folder / C.metrics_file("test")).read_text())["metrics"]
    mmsr(coded, "evaluate", "--run", run, "--device", cuda_device)
    dev_ranks = read_ranks(folder / C.ranks_file("test"))
    dev_metrics = json.loads((folder / C.metrics_file("test")).read_text())["metrics"]
    assert len(dev_ranks) == len(cpu_ranks) > 0
    assert np.mean(dev_ranks == cpu_ranks) >= 0.95
    assert dev_metrics == pytest.approx(cpu_metrics, abs=0.05)

    # recommend on the device: the CPU's top items, seen items excluded
    common = ["--run", run, "--all-users", "--top-k", "5", "--exclude-seen", "--format", "jsonl"]
    on_cpu = [json.loads(line) for line in mmsr(coded, "recommend", *common, "--device", "cpu").splitlines()]
    on_dev = [json.loads(line) for line in mmsr(coded, "recommend", *common, "--device", cuda_device).splitlines()]
    assert [(r["user_id"], r["rank"]) for r in on_dev] == [(r["user_id"], r["rank"]) for r in on_cpu]
    same = np.mean([a["item_id"] == b["item_id"] for a, b in zip(on_cpu, on_dev)])
    assert same >= 0.9
    assert [r["score"] for r in on_dev] == pytest.approx([r["score"] for r in on_cpu], abs=1e-3)


def test_han_attention_forward_and_backward_match_the_cpu(coded, cuda_device):
    """The MMSR model (sparse CSR attention, every HAN piece of the adaptive fusion) on one batch:
    scores, loss and every parameter's gradient on the device equal the CPU's."""
    from mmsr_cli.data import to_device
    from mmsr_cli.runs import load_run
    from mmsr_cli.training import TrainStep

    run = "han-grad"
    mmsr(coded, "train", "--model", "mmsr", "--layers", "2", *SMALL, "--epochs", "1", "--device", "cpu", "--run-name", run)
    results = {}
    for device in ("cpu", cuda_device):
        loaded = load_run(coded, run, "best", torch.device(device))
        model = loaded.model.to(device)
        model.train()  # training path (dropout is 0: deterministic)
        data = loaded.bundle.open_split(coded, "train")
        batch = to_device(data.collate(np.arange(min(len(data), 48))), torch.device(device))
        step = TrainStep(model)
        loss = step(batch)
        loss.backward()
        with torch.no_grad():
            scores = model.score(batch)
        results[device] = (float(loss), scores.cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None})
    (loss_a, scores_a, grads_a), (loss_b, scores_b, grads_b) = results["cpu"], results[cuda_device]
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    torch.testing.assert_close(scores_b, scores_a, rtol=1e-4, atol=1e-4)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5, msg=name)


def test_half_precision_text_features_are_close_to_fp32(tmp_path, cuda_device):
    """extract-features under autocast (bf16 on the device; fp32 in a CPU dry run) against fp32."""
    folder = tiny_hf_model("clip-text", tmp_path / "clip-text")
    rows = [{"title": t} for t in ("red lipstick", "blue nail polish", "shampoo for dry hair", "sun cream 50", "")]
    ds = make_items(tmp_path, rows)
    half = "bf16" if cuda_device == "cuda" else "fp32"
    for name, precision in (("full", "fp32"), ("half", half)):
        mmsr(ds, "extract-features", "--modality", "text", "--name", name, "--model", folder, "--fields", "title",
             "--precision", precision, "--device", cuda_device)
    full, half_feats = (torch.load(ds.path(C.features_tensor_file(n)), weights_only=True)["features"] for n in ("full", "half"))
    assert full.shape == half_feats.shape == (5, full.shape[1])
    assert torch.isfinite(half_feats).all()
    present = full[:4]  # the empty title has no features (zeros in both)
    cosine = torch.nn.functional.cosine_similarity(present, half_feats[:4], dim=1)
    assert bool((cosine > 0.98).all()), cosine
    assert torch.equal(full[4], half_feats[4])
    manifest = ds.read_manifest("features:half")
    assert manifest["options"]["precision"] == half
