"""Scale benchmark: the pipeline on interaction logs of 1x, 10x, 100x Amazon Beauty's size.

    python scripts/bench_scale.py run --workdir /work/scale-wd --scale 1 [--scale 10 ...]
    python scripts/bench_scale.py report --workdir /work/scale-wd [--workdir ...] --out docs/scale
    python scripts/bench_scale.py graphs --workdir /work/scale-wd --dataset scale1x   # stored vs per-batch graphs

``run`` generates, per scale s, a generic interaction log (``interactions.parquet``: user, item,
timestamp) with s x Beauty 5-core's users (22,363), items (12,101) and interactions (198,502):
every user has at least 5 interactions (5 + a geometric tail), every item at least 5 (then drawn
by a power-law popularity), timestamps increasing per user. It then runs, each stage in its own
child process under ``/usr/bin/time -v`` (wall time, CPU time, peak RSS of that process), and
measures the disk the stage added to the dataset folder:

    generate      this script: the log above (disk: the log)
    download      mmsr download --from <log folder>
    preprocess    mmsr preprocess --core 5 --max-len 50 --split loo
    features      this script: random float32 item features in the extract-features contract
                  (features/<name>.pt + .parquet + manifest), ``image`` 2048-d (ResNet-50's size)
                  and ``text`` 768-d (T5-base's size), so build-codes runs unchanged
    build-codes   mmsr build-codes (--codes-args, default: the command's defaults)
    build-graphs  mmsr build-graphs
    train-M       one epoch of model M (sasrec, mmsr) with --max-steps steps (mmsr_cli.training.train,
                  defaults otherwise); the epoch's validation pass is capped at --valid-cap samples
                  (the training figure is the epoch's training part, ``train_seconds``)
    evaluate-M    full-ranking evaluation (mmsr_cli.evaluation.evaluate_run, every item ranked for
                  every sample) of the first --eval-cap test samples; where the split has more,
                  the full pass is extrapolated per sample and marked so

A stage with a result in ``<workdir>/results.jsonl`` is skipped when ``run`` is started again, so
a killed run resumes at its first unfinished stage. ``report`` writes ``scale.md`` (table),
``scale.csv`` and ``scale.png`` (log-log: seconds and peak RSS against interactions per stage).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BEAUTY = {"users": 22_363, "items": 12_101, "interactions": 198_502}
FEATURES = {"image": 2048, "text": 768}  # ResNet-50 and T5-base feature sizes
MODELS = ("sasrec", "mmsr")
STAGES = ("generate", "download", "preprocess", "features", "build-codes", "build-graphs",
          *(f"train-{m}" for m in MODELS), *(f"evaluate-{m}" for m in MODELS))
RESULTS = "results.jsonl"
SCRIPT = Path(__file__).resolve()


def dataset_name(scale: int) -> str:
    return f"scale{scale}x"


# ----------------------------------------------------------------------------------------------
# Children: one stage each


def generate_log(scale: int, out: Path, seed: int = 0) -> dict:
    """Write ``out/interactions.parquet`` of ``scale`` x Beauty's size; returns its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, scale])
    n_users, n_items = BEAUTY["users"] * scale, BEAUTY["items"] * scale
    target = BEAUTY["interactions"] * scale
    extra_mean = target / n_users - 5  # each user: 5 + a geometric tail with this mean
    lengths = 5 + rng.geometric(1 / (1 + extra_mean), size=n_users) - 1
    n = int(lengths.sum())
    # every item 5 times (so the log is a 5-core), the rest by a power-law popularity
    rest = max(n - 5 * n_items, 0)
    popularity = (np.arange(1, n_items + 1, dtype=np.float64)) ** -0.8
    ranked = rng.permutation(n_items)  # which item gets which popularity rank
    drawn = ranked[np.searchsorted(np.cumsum(popularity / popularity.sum()), rng.random(rest))]
    items = np.concatenate([np.repeat(np.arange(n_items), 5), np.minimum(drawn, n_items - 1)])[:n]
    items = rng.permutation(items)
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    start = np.repeat(rng.integers(1_300_000_000, 1_400_000_000, n_users), lengths)
    gaps = rng.integers(1, 86_400 * 30, n)
    first = np.cumsum(lengths) - lengths
    steps = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first] - gaps[first], lengths)
    order = rng.permutation(n)  # the file is not sorted by user: preprocess must sort
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"user": users[order], "item": items[order].astype(np.int64), "timestamp": (start + steps)[order]})
    pq.write_table(table, out / "interactions.parquet")
    return {"users": n_users, "items": n_items, "interactions": n}


def write_features(workdir: str, dataset: str, seed: int = 0) -> dict:
    """Random features for every item, in the contract extract-features writes."""
    import pyarrow as pa
    import torch

    from mmsr_cli import contracts as C
    from mmsr_cli.workdir import DatasetDir, upstream, write_parquet_atomic, write_torch_atomic

    ds = DatasetDir.open(workdir, dataset)
    pre = ds.require(C.STAGE_PREPROCESS, verify=False)
    n_items = int(pre["counts"]["items"])
    rng = np.random.default_rng(seed)
    for name, dim in FEATURES.items():
        feats = torch.empty((n_items, dim), dtype=torch.float32)
        for lo in range(0, n_items, 65_536):  # in chunks: no float64 copy of the whole table
            hi = min(n_items, lo + 65_536)
            feats[lo:hi] = torch.from_numpy(rng.standard_normal((hi - lo, dim), dtype=np.float32))
        missing = np.zeros(n_items, dtype=bool)
        tensor_rel, index_rel = C.features_tensor_file(name), C.features_index_file(name)
        ds.path(tensor_rel).parent.mkdir(parents=True, exist_ok=True)
        write_torch_atomic(ds.path(tensor_rel), {"features": feats, "missing": torch.from_numpy(missing)})
        del feats
        index = pa.table({
            "item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
            "row": pa.array(np.arange(n_items, dtype=np.int32)),
            "missing": pa.array(missing),
            "reason": pa.array([None] * n_items, type=pa.string()),
        })
        write_parquet_atomic(ds.path(index_rel), index, C.FEATURE_INDEX_SCHEMA)
        ds.write_manifest(
            C.modality_stage(C.STAGE_FEATURES, name),
            inputs=upstream(pre),
            outputs=[tensor_rel, index_rel],
            options={"modality": name, "name": name, "model": "random (bench_scale.py)", "dim": dim},
            counts={"items": n_items, "missing": 0},
        )
    return {"items": n_items}


class _Head:
    """The first ``n`` samples of a split (SplitData)."""

    def __init__(self, split, n: int):
        self.split, self.n = split, min(n, len(split))

    def __len__(self) -> int:
        return self.n

    def collate(self, indices):
        return self.split.collate(indices)


def _capped_evaluate_split(module, cap: int, seen: dict):
    """Replace ``module.evaluate_split`` by one that scores the first ``cap`` samples; ``seen``
    records the split's full size, the samples scored and the process CPU time around the pass."""
    original = module.evaluate_split

    def evaluate_split(model, split, *args, **kwargs):
        seen["samples"], seen["scored"] = len(split), min(cap, len(split))
        seen["cpu_start"] = time.process_time()
        try:
            return original(model, _Head(split, cap), *args, **kwargs)
        finally:
            seen["cpu_s"] = time.process_time() - seen["cpu_start"]

    module.evaluate_split = evaluate_split


def _mark_first_batch(training, marks: dict) -> None:
    """Record the process CPU time when the first training batch is collated."""
    original = inputs.DatasetBundle.open_split

    def open_split(self, ds, split):
        data = original(self, ds, split)
        if split == "train":
            collate = data.collate

            def first_marked(idx):
                marks.setdefault("cpu_first_batch", time.process_time())
                return collate(idx)

            data.collate = first_marked
        return data

    inputs.DatasetBundle.open_split = open_split


def train_one_epoch(workdir: str, dataset: str, model: str, max_steps: int, valid_cap: int) -> dict:
    from mmsr_cli import inputs
    from mmsr_cli import runs
    from mmsr_cli import training
    from mmsr_cli.models.base import ModelConfig
    from mmsr_cli.workdir import DatasetDir

    seen: dict = {}
    _capped_evaluate_split(training, valid_cap, seen)
    _mark_first_batch(training, seen)
    ds = DatasetDir.open(workdir, dataset)
    tc = runs.TrainConfig(model=model, run_name=f"{model}-scale", epochs=1, max_steps=max_steps, device="cpu")
    result = training.train(ds, tc, ModelConfig(model=model), resume=False, tensorboard=False)
    row = result.history[-1]
    n_train = len(inputs.load_dataset(ds, ModelConfig(model=model), verify=False).open_split(ds, "train"))
    batches = -(-n_train // tc.batch_size)
    step_cpu = (seen["cpu_start"] - seen["cpu_first_batch"]) / row["steps"]
    return {
        "steps": row["steps"], "train_seconds": row["train_seconds"], "seconds_per_step": row["train_seconds"] / row["steps"],
        "cpu_s_per_step": step_cpu, "full_epoch_cpu_s_extrapolated": step_cpu * batches, "batches_per_epoch": batches,
        "valid_seconds": row["valid_seconds"], "valid_cpu_s": seen["cpu_s"], "valid_scored": seen["scored"],
        "valid_samples": seen["samples"], "loss": row["loss"],
    }


def evaluate(workdir: str, dataset: str, model: str, eval_cap: int) -> dict:
    from mmsr_cli import evaluation
    from mmsr_cli.workdir import DatasetDir

    seen: dict = {}
    _capped_evaluate_split(evaluation, eval_cap, seen)
    ds = DatasetDir.open(workdir, dataset)
    t0 = time.perf_counter()
    evaluation.evaluate_run(ds, f"{model}-scale", "test", "best", "cpu")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ranking_cpu_s": seen["cpu_s"], "scored": seen["scored"], "samples": seen["samples"],
            "full_pass_cpu_s_extrapolated": seen["cpu_s"] * seen["samples"] / max(seen["scored"], 1)}


# ----------------------------------------------------------------------------------------------
# Parent: stages as children, results, report


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _time_v(text: str) -> dict:
    def field(label: str) -> str:
        m = re.search(rf"^\s*{re.escape(label)}: (.*)$", text, re.M)
        return m.group(1).strip() if m else ""

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall else [0.0]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {
        "wall_s": round(seconds, 2),
        "cpu_s": round(float(field("User time (seconds)") or 0) + float(field("System time (seconds)") or 0), 2),
        "peak_rss_mib": round(int(field("Maximum resident set size (kbytes)") or 0) / 1024, 1),
    }


def _stage_command(stage: str, args, scale: int) -> list[str]:
    ds, wd = dataset_name(scale), str(args.workdir)
    mmsr = [sys.executable, "-m", "mmsr_cli"]
    common = ["--dataset", ds, "--workdir", wd]
    child = [sys.executable, str(SCRIPT), "child", "--workdir", wd, "--scale", str(scale)]
    if stage == "generate":
        return child + ["generate"]
    if stage == "download":
        return mmsr + ["download", *common, "--from", str(Path(args.workdir) / f"src-{scale}x")]
    if stage == "preprocess":
        return mmsr + ["preprocess", *common, "--core", "5", "--max-len", "50", "--split", "loo"]
    if stage == "features":
        return child + ["features"]
    if stage == "build-codes":
        return mmsr + ["build-codes", *common, *args.codes_args.split()]
    if stage == "build-graphs":
        return mmsr + ["build-graphs", *common]
    kind, model = stage.split("-", 1)
    if kind == "train":
        return child + ["train", "--model", model, "--max-steps", str(args.max_steps), "--valid-cap", str(args.valid_cap)]
    return child + ["evaluate", "--model", model, "--eval-cap", str(args.eval_cap)]


def _done(workdir: Path) -> set[tuple[int, str]]:
    path = workdir / RESULTS
    if not path.exists():
        return set()
    return {(r["scale"], r["stage"]) for r in map(json.loads, path.read_text().splitlines()) if r.get("ok")}


def run_stage(stage: str, args, scale: int) -> dict:
    workdir = Path(args.workdir)
    measured = workdir / (f"src-{scale}x" if stage == "generate" else dataset_name(scale))
    before = _du(measured)
    out_json = workdir / f".{dataset_name(scale)}-{stage}.json"
    out_json.unlink(missing_ok=True)
    time_file = workdir / f".{dataset_name(scale)}-{stage}.time"
    env = {**os.environ, "BENCH_SCALE_OUT": str(out_json)}
    log_path = workdir / f"{dataset_name(scale)}-{stage}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.call(["/usr/bin/time", "-v", "-o", str(time_file), *_stage_command(stage, args, scale)],
                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)  # not the repo: PYTHONPATH decides
    record = {"scale": scale, "stage": stage, "ok": rc == 0, "rc": rc,
              **_time_v(time_file.read_text() if time_file.exists() else ""),
              "disk_mib": round((_du(measured) - before) / 2**20, 1),
              "dataset_disk_mib": round(_du(workdir / dataset_name(scale)) / 2**20, 1),
              "finished": datetime.fromtimestamp(t0 + 0, timezone.utc).isoformat(timespec="seconds")}
    if out_json.exists():
        record["detail"] = json.loads(out_json.read_text())
    with open(workdir / RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def cmd_run(args) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",") if args.stages else list(STAGES)
    for scale in args.scale:
        for stage in stages:
            if (scale, stage) in _done(workdir):
                print(f"{dataset_name(scale)} {stage}: done earlier, skipped", flush=True)
                continue
            r = run_stage(stage, args, scale)
            print(f"{dataset_name(scale)} {stage}: rc {r['rc']}, {r['wall_s']} s wall, {r['cpu_s']} s CPU, "
                  f"{r['peak_rss_mib']} MiB peak RSS, +{r['disk_mib']} MiB{' ' + json.dumps(r['detail']) if 'detail' in r else ''}",
                  flush=True)
            if not r["ok"]:
                sys.exit(f"{stage} failed at scale {scale}: see {workdir / (dataset_name(scale) + '-' + stage + '.log')}")


def cmd_child(args) -> None:
    wd, ds = str(args.workdir), dataset_name(args.scale)
    if args.what == "generate":
        out = generate_log(args.scale, Path(args.workdir) / f"src-{args.scale}x")
    elif args.what == "features":
        out = write_features(wd, ds)
    elif args.what == "train":
        out = train_one_epoch(wd, ds, args.model, args.max_steps, args.valid_cap)
    else:
        out = evaluate(wd, ds, args.model, args.eval_cap)
    Path(os.environ["BENCH_SCALE_OUT"]).write_text(json.dumps(out))


def _rows(workdirs: list[Path]) -> list[dict]:
    latest: dict = {}
    for workdir in workdirs:
        for r in map(json.loads, (workdir / RESULTS).read_text().splitlines()):
            if r.get("ok"):
                latest[(r["scale"], r["stage"])] = r
    return [latest[k] for k in sorted(latest, key=lambda k: (STAGES.index(k[1]), k[0]))]


def _note(r: dict) -> str:
    d = r.get("detail") or {}
    if r["stage"].startswith("train-"):
        return (f"{d['steps']} steps, {d['cpu_s_per_step']:.2f} CPU s/step; full epoch ({d['batches_per_epoch']:,} steps) "
                f"~{d['full_epoch_cpu_s_extrapolated']:,.0f} CPU s *extrapolated*; validation of {d['valid_scored']:,} "
                f"samples {d['valid_cpu_s']:.0f} CPU s")
    if r["stage"].startswith("evaluate-"):
        if d["scored"] < d["samples"]:
            return (f"ranking {d['scored']:,} of {d['samples']:,} test samples {d['ranking_cpu_s']:.0f} CPU s; full pass "
                    f"~{d['full_pass_cpu_s_extrapolated']:,.0f} CPU s *extrapolated*")
        return f"ranking all {d['samples']:,} test samples {d['ranking_cpu_s']:.0f} CPU s"
    if r["stage"] == "generate":
        return f"{d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions"
    return ""


def _cpu_cost(r: dict) -> float:
    """The stage's CPU seconds; for training one full epoch and for evaluation one full test pass,
    extrapolated from the capped run (per step, per sample)."""
    d = r.get("detail") or {}
    if r["stage"].startswith("train-"):
        return d["full_epoch_cpu_s_extrapolated"]
    if r["stage"].startswith("evaluate-"):
        return d["full_pass_cpu_s_extrapolated"]
    return max(r["cpu_s"], 0.01)


def cmd_report(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows([Path(w) for w in args.workdir])
    gen = {r["scale"]: r["detail"] for r in rows if r["stage"] == "generate"}
    with open(out / "scale.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scale", "interactions", "stage", "wall_s", "cpu_s", "peak_rss_mib", "disk_mib", "note"])
        for r in rows:
            w.writerow([r["scale"], gen.get(r["scale"], {}).get("interactions", ""), r["stage"], r["wall_s"], r["cpu_s"],
                        r["peak_rss_mib"], r["disk_mib"], _note(r)])
    lines = ["| stage | scale | wall s | CPU s | peak RSS MiB | disk MiB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['scale']}x | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['disk_mib']:.1f} | {_note(r)} |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for stage in STAGES:
        pts = sorted((gen[r["scale"]]["interactions"], r) for r in rows if r["stage"] == stage and r["scale"] in gen)
        if not pts:
            continue
        x = [p[0] for p in pts]
        extrapolated = stage.startswith(("train-", "evaluate-"))
        axes[0].plot(x, [_cpu_cost(p[1]) for p in pts], "o--" if extrapolated else "o-",
                     label=stage + (" (full pass, extrapolated)" if extrapolated else ""))
        axes[1].plot(x, [p[1]["peak_rss_mib"] for p in pts], "o-", label=stage)
    xs = np.array(sorted(v["interactions"] for v in gen.values()), dtype=float)
    axes[0].plot(xs, xs / xs[0], "k--", lw=0.8, label="linear (1 s at 1x)")
    axes[0].plot(xs, (xs / xs[0]) ** 2, "k:", lw=0.8, label="quadratic (1 s at 1x)")
    axes[0].set(xscale="log", yscale="log", xlabel="interactions",
                ylabel="CPU s (train: 1 full epoch, evaluate: full pass)")
    axes[1].set(xscale="log", yscale="log", xlabel="interactions", ylabel="peak RSS (MiB)")
    axes[1].axhline(24 * 1024, color="r", lw=0.8, ls=":", label="24 GiB")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("mmsr pipeline vs. log size (Beauty x 1, 10, 100)")
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    print(f"wrote {out / 'scale.md'}, {out / 'scale.csv'}, {out / 'scale.png'} ({platform.node()})")


# former on-disk dtypes of build-graphs' per-sample arrays, and the narrowest that hold Beauty-like
# graphs (local node ids < 256, positions < 128, offsets < 2^31)
STORED_BYTES = {"node": 1 + 4 + 8, "position": 2, "edge": 2 * 4 + 1, "sample": 8 + 8 + 4 + 4 + 4}
COMPACT_BYTES = {"node": 1 + 4 + 1, "position": 1, "edge": 2 * 1 + 1, "sample": 4 + 4 + 1 + 4 + 4}


def _alternate_mmsr_steps(ds, stored: dict, split, batches: list) -> dict:
    """CPU seconds per MMSR training step (collate, forward, CE over all items, backward, Adam)
    with stored and with per-batch graphs: two identical models, steps alternating so that load
    from other processes hits both alike; their losses must agree."""
    import torch

    from mmsr_cli import graphs as G
    from mmsr_cli.models import build_model
    from mmsr_cli.models.base import ModelConfig
    from mmsr_cli.inputs import load_dataset
    from mmsr_cli.training import TrainStep

    config = ModelConfig(model="mmsr")
    info = load_dataset(ds, config, verify=False).info
    runs = {}
    for name, collate in (("stored", lambda idx: G._collate_arrays(stored, idx)), ("per_batch", split.collate)):
        torch.manual_seed(0)
        model = build_model(config, info)
        runs[name] = {"collate": collate, "step": TrainStep(model), "opt": torch.optim.Adam(model.parameters(), lr=1e-3),
                      "cpu": [], "loss": []}
    for idx in batches:
        for r in runs.values():
            torch.manual_seed(1)  # the same dropout masks in both
            t0 = time.process_time()
            loss = r["step"](r["collate"](idx))
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            r["cpu"].append(time.process_time() - t0)
            r["loss"].append(loss.item())
    return {"train_steps": len(batches), "losses_equal": runs["stored"]["loss"] == runs["per_batch"]["loss"],
            **{f"step_cpu_s_{n}": float(np.median(r["cpu"])) for n, r in runs.items()}}


def cmd_graphs(args) -> None:
    """Stored (the former build-graphs) against per-batch graphs on one split: bytes, construction,
    collate CPU time per batch."""
    from mmsr_cli import contracts as C
    from mmsr_cli import graphs as G
    from mmsr_cli.workdir import DatasetDir

    ds = DatasetDir.open(args.workdir, args.dataset)
    split = G.GraphSplit.open(ds, args.split)
    t0 = time.process_time()
    stored = G.build_msgraphs(split.hist, split.hist_ptr, split._codes, split.n_items)
    build_cpu = time.process_time() - t0
    stored.target, stored.user_idx = split.target, split.user_idx
    S, N, P, E = stored.n_samples, int(stored.node_ptr[-1]), int(stored.pos_ptr[-1]), int(stored.edge_ptr[-1])

    def size(b: dict) -> int:
        return b["node"] * N + b["position"] * P + b["edge"] * E + b["sample"] * S

    rng = np.random.default_rng(0)
    batches = [rng.choice(S, size=min(args.batch, S), replace=False) for _ in range(args.batches)]
    times = {}
    for name, collate in (("stored", lambda idx: G._collate_arrays(vars(stored), idx)), ("per_batch", split.collate)):
        t0 = time.process_time()
        for idx in batches:
            collate(idx)
        times[name] = (time.process_time() - t0) / len(batches)
    step_cpu = _alternate_mmsr_steps(ds, vars(stored), split, batches[: args.steps]) if args.steps else {}
    out = {"split": args.split, "samples": S, "nodes": N, "positions": P, "edges": E, **step_cpu,
           "stored_bytes": size(STORED_BYTES), "compact_bytes": size(COMPACT_BYTES),
           "stored_bytes_per_sample": size(STORED_BYTES) / S, "compact_bytes_per_sample": size(COMPACT_BYTES) / S,
           "build_cpu_s": build_cpu, "collate_cpu_s_stored": times["stored"],
           "collate_cpu_s_per_batch": times["per_batch"], "batch": args.batch}
    print(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the stages at each --scale (resumable)")
    run.add_argument("--workdir", required=True)
    run.add_argument("--scale", type=int, action="append", required=True)
    run.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    run.add_argument("--max-steps", type=int, default=30)
    run.add_argument("--valid-cap", type=int, default=20_000)
    run.add_argument("--eval-cap", type=int, default=50_000)
    run.add_argument("--codes-args", default="", help="extra build-codes options, e.g. '--epochs 20'")
    child = sub.add_parser("child")
    child.add_argument("what", choices=("generate", "features", "train", "evaluate"))
    child.add_argument("--workdir", required=True)
    child.add_argument("--scale", type=int, required=True)
    child.add_argument("--model", choices=MODELS)
    child.add_argument("--max-steps", type=int, default=30)
    child.add_argument("--valid-cap", type=int, default=20_000)
    child.add_argument("--eval-cap", type=int, default=50_000)
    gr = sub.add_parser("graphs", help="stored vs per-batch graphs on one split (bytes, CPU per batch)")
    gr.add_argument("--workdir", required=True)
    gr.add_argument("--dataset", required=True)
    gr.add_argument("--split", default="train")
    gr.add_argument("--batch", type=int, default=512)
    gr.add_argument("--batches", type=int, default=50)
    gr.add_argument("--steps", type=int, default=10, help="MMSR training steps timed each way (0: none)")
    rep = sub.add_parser("report")
    rep.add_argument("--workdir", required=True, action="append", help="one or more run workdirs")
    rep.add_argument("--out", required=True)
    args = ap.parse_args()
    {"run": cmd_run, "child": cmd_child, "graphs": cmd_graphs, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
