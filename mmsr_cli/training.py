"""The training harness shared by MMSR and the baselines (`mmsr train`).

One loop for every model (paper section 3.1): batches of a split's samples, user vectors scored
against all items by dot product (Eq. 7), cross-entropy over all items, Adam with L2 weight decay,
full-ranking validation after every epoch and early stopping on the validation metric (the test
split is never looked at here).

A run lives in ``<dataset>/runs/<run>/``:

* ``config.json``: TrainConfig, ModelConfig, dataset sizes and the fingerprints of the stages the
  run read (preprocess, codes:<m>, graphs:<variant>), so `evaluate`/`recommend` can refuse a
  checkpoint that does not belong to the dataset's current files;
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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import contracts as C
from . import distributed
from .data import prefetched
from .errors import MmsrError, check_typed_fields
from .evaluation import METRIC_NAMES, check_metric, evaluate_split, to_device
from .models import build_model, check_model_name, model_class
from .models.base import DatasetInfo, ModalityInfo, ModelConfig, Recommender
from .workdir import (
    DatasetDir,
    atomic_path,
    read_parquet,
    validate_modality_name,
    write_bytes_atomic,
    write_json_atomic,
    write_torch_atomic,
    writer_lock,
)

CONFIG_FILE = "config.json"
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
CURVE_PNG = "curve.png"
STAGE_TRAIN = "train"

# Options that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("epochs", "device")
# Options that are not part of an experiment's identity when comparing runs over seeds.
NOT_EXPERIMENT = ("seed", "run_name", "device")


@dataclass
class TrainConfig:
    model: str = "sasrec"
    run_name: str = ""  # "" -> default_run_name()
    epochs: int = 50
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0  # Adam's L2 penalty (paper: {0, 1e-1, ..., 1e-5})
    clip_norm: float = 0.0  # max gradient norm; 0 = no clipping
    patience: int = 5  # epochs without validation improvement before stopping; 0 = never stop
    seed: int = 0
    device: str = "auto"
    max_steps: int = 0  # at most this many training batches per epoch (smoke runs); 0 = all
    metric: str = "ndcg@10"  # validation metric for early stopping and best.pt
    # Missing modalities during training (paper section 5.4; robustness.py): a share drop_ratio of
    # the items lose the modalities drop_modality selects (image|text|all|NAME), fixed for the run.
    drop_modality: str = ""
    drop_ratio: float = 0.0

    def validate(self) -> "TrainConfig":
        from .robustness import check_drop_options

        check_model_name(self.model)
        check_metric(self.metric)
        check_drop_options(self.drop_modality, self.drop_ratio if self.drop_modality or self.drop_ratio else None)
        for name, rng in (("epochs", C.RANGE_EPOCHS), ("batch_size", C.RANGE_TRAIN_BATCH), ("patience", C.RANGE_PATIENCE),
                          ("max_steps", C.RANGE_MAX_STEPS), ("lr", C.RANGE_LR), ("weight_decay", C.RANGE_WEIGHT_DECAY),
                          ("clip_norm", C.RANGE_CLIP_NORM), ("seed", C.RANGE_SEED)):
            rng.check(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.run_name and not C.DATASET_NAME_RE.match(self.run_name):
            raise MmsrError(f"--run-name: invalid name {self.run_name!r} (letters, digits, '.', '_' and '-')")
        return self


def check_model_config(cfg: ModelConfig) -> ModelConfig:
    for name, rng in (("dim", C.RANGE_DIM), ("layers", C.RANGE_LAYERS), ("heads", C.RANGE_HEADS),
                      ("dropout", C.RANGE_DROPOUT), ("attention_dropout", C.RANGE_DROPOUT)):
        rng.check(f"--{name.replace('_', '-')}", getattr(cfg, name))
    if cfg.model in ("sasrec", "sasrecf") and cfg.dim % cfg.heads:
        raise MmsrError(f"--heads: {cfg.heads} does not divide --dim {cfg.dim}")
    if cfg.model == "mmsr":
        from .models.mmsr import check_variant

        check_variant(cfg)
    return cfg


def default_run_name(ds: DatasetDir, cfg: TrainConfig) -> str:
    """``<model>-<split>-s<seed>``, the split as preprocess made it: ``loo`` or ``ratio<r>``
    (``<model>-<split>-drop-<modality>-<ratio>-s<seed>`` when training drops modalities)."""
    opts = ds.require(C.STAGE_PREPROCESS, verify=False).get("options", {})
    split = opts.get("split", "loo")
    if split == "ratio":
        split = f"ratio{opts.get('test_ratio')}"
    if cfg.drop_modality:
        split = f"{split}-{C.drop_setting(cfg.drop_modality, cfg.drop_ratio)}"
    return f"{cfg.model}-{split}-s{cfg.seed}"


def run_dir(ds: DatasetDir, run: str) -> Path:
    if not C.DATASET_NAME_RE.match(run or ""):
        raise MmsrError(f"--run: invalid run name {run!r}")
    return ds.path(f"{C.RUNS_DIR}/{run}")


# ----------------------------------------------------------------------------------------------
# Dataset side: sizes, modalities, splits, fingerprints


def _codes_module():
    try:
        from . import codes
    except ImportError as e:
        raise MmsrError(f"this mmsr has no build-codes stage to read modality codes from ({e})") from e
    return codes


@dataclass
class DatasetBundle:
    """What a model of a given config is built and fed from."""

    info: DatasetInfo
    fingerprints: dict[str, str]
    model_config: ModelConfig  # with the modalities resolved
    # info's item codes differ from those build-graphs used (dropped modalities): graph models
    # build their graphs per batch from the samples (robustness.HistoryGraphSplit)
    rebuild_graphs: bool = False

    def open_split(self, ds: DatasetDir, split: str):
        cls = model_class(self.model_config.model)
        if self.rebuild_graphs:
            from .robustness import open_split

            return open_split(ds, self, split)
        if cls.input_kind == "graph":
            from .graphs import GraphSplit

            return GraphSplit.open(ds, split, self.model_config.graph_variant, list(self.model_config.modalities))
        from .data import SequenceSplit

        return SequenceSplit.open(ds, split, self.info.max_len, self.info.n_items)


def train_target_counts(ds: DatasetDir, n_items: int) -> np.ndarray:
    path = ds.path(C.samples_file("train"))
    target = read_parquet(path).column("target").to_numpy().astype(np.int64)
    if target.size and (target.min() < 0 or target.max() >= n_items):
        raise MmsrError(f"{path}: field 'target' has item ids outside 0..{n_items - 1}")
    return np.bincount(target, minlength=n_items)


def train_interactions(ds: DatasetDir, n_users: int, n_items: int) -> np.ndarray:
    """[n, 2] unique (user_idx, item_idx) pairs a user met before their validation target.

    Read from the training samples (histories and targets: every prefix before the validation
    target) and the validation samples' histories, never their targets: a user with a single
    training item has no training sample, only a validation history. No validation or test target
    enters (unless the user had already met that item before it); test histories are not read.
    """
    import pyarrow.compute as pc

    users, items = [], []
    for split, with_target in (("train", True), ("valid", False)):
        path = ds.path(C.samples_file(split))
        table = read_parquet(path, C.SAMPLES_SCHEMA)
        history = table.column("history").combine_chunks()
        if history.null_count:
            raise MmsrError(f"{path}: field 'history' has null entries")
        sample_users = table.column("user_idx").to_numpy().astype(np.int64)
        lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False).astype(np.int64)
        split_users = [np.repeat(sample_users, lengths)]
        split_items = [history.flatten().to_numpy(zero_copy_only=False).astype(np.int64)]
        if with_target:
            split_users.append(sample_users)
            split_items.append(table.column("target").to_numpy().astype(np.int64))
        users.append(np.concatenate(split_users))
        items.append(np.concatenate(split_items))
        for name, ids, n in (("user_idx", users[-1], n_users), ("history/target", items[-1], n_items)):
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise MmsrError(f"{path}: field '{name}' has ids outside 0..{n - 1}")
    pairs = np.unique(np.concatenate(users) * n_items + np.concatenate(items))
    return np.stack([pairs // n_items, pairs % n_items], axis=1)


def feature_modalities(ds: DatasetDir) -> list[str]:
    """Names of the modalities that have an extract-features manifest, sorted."""
    prefix = C.STAGE_FEATURES + ":"
    return sorted(s[len(prefix):] for s in ds.stages(C.STAGE_FEATURES) if s.startswith(prefix))


def load_item_features(ds: DatasetDir, name: str, n_items: int) -> torch.Tensor:
    """[n_items, dim] float32 features of modality ``name`` in item order, missing rows zero."""
    from .codes import _load_features

    feats, missing = _load_features(ds, name)
    if feats.shape[0] != n_items:
        raise MmsrError(f"{ds.path(C.features_tensor_file(name))}: {feats.shape[0]} rows for {n_items} items; "
                        f"re-run `mmsr extract-features --name {name} --dataset {ds.name}`")
    feats[torch.from_numpy(np.asarray(missing, dtype=bool))] = 0.0
    return feats.contiguous()


def load_dataset(ds: DatasetDir, model_cfg: ModelConfig, verify: bool = True) -> DatasetBundle:
    """Check the upstream stages the model needs and describe the dataset for it.

    Sequence models need ``preprocess``; those reading modality codes (SASRecF, GRU4RecF, NOVA,
    DIF-SR, Trans2D) also ``codes:<m>``; MMSR also
    ``graphs:<variant>`` (variant ``items`` with ``--no-codes``); models with
    ``needs_item_features`` (MMGCN, MGAT, BM3) ``features:<m>``. Unset modalities mean every
    modality available (MMSR: those the graphs were built with).
    """
    pre = ds.require(C.STAGE_PREPROCESS, verify=verify)
    counts, options = pre.get("counts", {}), pre.get("options", {})
    try:
        n_items, n_users, max_len = int(counts["items"]), int(counts["users"]), int(options["max_len"])
    except (KeyError, TypeError, ValueError) as e:
        raise MmsrError(f"{ds.manifest_path(C.STAGE_PREPROCESS)}: missing count/option {e}; re-run `mmsr preprocess --dataset {ds.name}`") from e
    fingerprints = {C.STAGE_PREPROCESS: pre["fingerprint"]}
    from .models.baselines import ModalityCodeChannels

    cls = model_class(model_cfg.model)
    names = list(model_cfg.modalities)
    modalities: list[ModalityInfo] = []
    if cls.input_kind == "graph":
        from .graphs import GraphSplit, graphs_stage

        fingerprints[graphs_stage(model_cfg.graph_variant)] = ds.require(
            graphs_stage(model_cfg.graph_variant), verify=verify
        )["fingerprint"]
        names = GraphSplit.open(ds, "train", model_cfg.graph_variant, names or None).modality_names
    elif issubclass(cls, ModalityCodeChannels):  # SASRecF, GRU4RecF, NOVA, DIF-SR, Trans2D
        codes = _codes_module()
        names = names or list(codes.available_modalities(ds))
        if not names:
            raise MmsrError(
                f"--model {model_cfg.model}: dataset '{ds.name}' has no modality codes; run "
                f"`mmsr build-codes --modality NAME --dataset {ds.name}` first"
            )
    elif cls.needs_item_features:
        names = names or feature_modalities(ds)
        if not names:
            raise MmsrError(
                f"--model {model_cfg.model}: dataset '{ds.name}' has no item features; run "
                f"`mmsr extract-features --modality image|text --dataset {ds.name}` first"
            )
    elif names:
        raise MmsrError(f"--modalities: model {model_cfg.model} uses no modalities")
    item_features: dict[str, torch.Tensor] = {}
    if names and cls.needs_item_features:
        for name in names:
            validate_modality_name(name)
            stage = C.modality_stage(C.STAGE_FEATURES, name)
            fingerprints[stage] = ds.require(stage, verify=verify)["fingerprint"]
            item_features[name] = load_item_features(ds, name, n_items)
    elif names:
        codes = _codes_module()
        for name in names:
            stage = C.modality_stage(C.STAGE_CODES, name)
            fingerprints[stage] = ds.require(stage, verify=verify)["fingerprint"]
            modalities.append(codes.load_modality_info(ds, name, variant=model_cfg.graph_variant))
    info = DatasetInfo(
        n_items=n_items,
        n_users=n_users,
        max_len=max_len,
        modalities=modalities,
        item_popularity=train_target_counts(ds, n_items),
        train_interactions=train_interactions(ds, n_users, n_items) if cls.needs_interactions else None,
        item_features=item_features,
    )
    resolved = ModelConfig(**{**asdict(model_cfg), "modalities": tuple(names), "max_len": max_len})
    return DatasetBundle(info, fingerprints, resolved)


# ----------------------------------------------------------------------------------------------
# Run files


def config_record(ds: DatasetDir, tc: TrainConfig, bundle: DatasetBundle) -> dict:
    mc = asdict(bundle.model_config)
    mc["modalities"] = list(mc["modalities"])
    # build-codes options of the codes the run read (c, k: `mmsr report`'s Figure 5 heat map)
    codes = {}
    for stage in bundle.fingerprints:
        if stage.startswith(C.STAGE_CODES + ":"):
            codes[stage.partition(":")[2]] = codes_options(ds.read_manifest(stage) or {})
    return {
        "dataset": ds.name,
        "train": asdict(tc),
        "model": mc,
        "codes": codes,
        "fingerprints": dict(bundle.fingerprints),
        "data": {"n_items": bundle.info.n_items, "n_users": bundle.info.n_users, "max_len": bundle.info.max_len},
    }


def codes_options(manifest: dict) -> dict:
    """The build-codes options a run config records of a codes manifest (its "codes" entry)."""
    options = manifest.get("options", {})
    return {k: options.get(k) for k in ("codes_mode", "clusters", "top_k", "ae_dim", "seed")}


def recorded_codes(ds: DatasetDir, config: dict) -> dict | None:
    """A run config's "codes" entry. Runs trained before config.json recorded it get the options
    of the dataset's codes manifests, where each still has the fingerprint the run read; None when
    one of them has been rebuilt since (the run's c and k are then unknown)."""
    if "codes" in config:
        return config["codes"]
    codes = {}
    for stage, fingerprint in (config.get("fingerprints") or {}).items():
        if stage.startswith(C.STAGE_CODES + ":"):
            manifest = ds.read_manifest(stage)
            if manifest is None or manifest.get("fingerprint") != fingerprint:
                return None
            codes[stage.partition(":")[2]] = codes_options(manifest)
    return codes


def read_run_config(path: Path) -> dict:
    """A run's config.json, its ``train`` and ``model`` sections checked field by field against the
    typed configs (types, then the ranges the command line enforces), naming the file and field."""
    if not path.exists():
        raise MmsrError(f"{path}: run config not found; run `mmsr train` first or check --run")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MmsrError(f"{path}: not a valid run config ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict):
        raise MmsrError(f"{path}: not a valid run config (expected a JSON object)")
    for section, cls in (("train", TrainConfig), ("model", ModelConfig)):
        check_typed_fields(cls, cfg.get(section), f"{path}: field '{section}")
    if "modalities" not in cfg["model"]:
        raise MmsrError(f"{path}: field 'model.modalities' is missing")
    defaults = with_config_defaults(cfg)
    try:
        TrainConfig(**defaults["train"]).validate()
        check_model_config(ModelConfig(**{**defaults["model"], "modalities": tuple(defaults["model"]["modalities"])}))
    except MmsrError as e:
        raise MmsrError(f"{path}: invalid value in the run config: {e}") from e
    return cfg


def with_config_defaults(config: dict) -> dict:
    """A run config (config.json) with the model and train fields added since the run was trained
    filled in with their defaults, as JSON values (tuples as lists), so old and new runs compare."""
    def json_defaults(obj) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(obj).items()}

    return {**config, "model": {**json_defaults(ModelConfig()), **(config.get("model") or {})},
            "train": {**json_defaults(TrainConfig()), **(config.get("train") or {})}}


def _config_difference(old: dict, new: dict) -> str | None:
    """First difference between two run configs that forbids resuming, as 'field: a != b'."""
    old, new = with_config_defaults(old), with_config_defaults(new)  # fields added since the run started
    for section in ("dataset", "model", "fingerprints", "train"):
        a, b = old.get(section), new.get(section)
        if section == "train":
            a = {k: v for k, v in a.items() if k not in RESUMABLE_CHANGES}
            b = {k: v for k, v in b.items() if k not in RESUMABLE_CHANGES}
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                for key in sorted(set(a) | set(b)):
                    if a.get(key) != b.get(key):
                        return f"{section}.{key}: {a.get(key)!r} != {b.get(key)!r}"
            return f"{section}: {a!r} != {b!r}"
    return None


def save_torch_atomic(path: Path, obj: Any) -> None:
    write_torch_atomic(path, obj)  # same tensors -> same bytes


def load_torch(path: Path) -> Any:
    if not path.exists():
        raise MmsrError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or foreign pickle: one line, not a traceback
        raise MmsrError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


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
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def write_history(folder: Path, history: list[dict], metric: str) -> None:
    write_json_atomic(folder / HISTORY_JSON, history)
    columns = ["epoch", "loss", "seconds", "train_seconds", "valid_seconds", "steps", "peak_rss_mib", "peak_gpu_mib",
               *METRIC_NAMES]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:  # rows of runs trained before the memory fields existed leave them empty
        writer.writerow({k: v for k, v in row.items() if k != "valid"} | row["valid"])
    write_bytes_atomic(folder / HISTORY_CSV, buf.getvalue().encode())
    _write_curve(folder / CURVE_PNG, history, metric)


def _write_curve(path: Path, history: list[dict], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    from .runtime import resolve_device

    with distributed.process_group(resolve_device(tc.device)):
        run = tc.run_name or default_run_name(ds, tc)
        # One writer per run folder (rank 0 alone writes it under torchrun).
        lock = writer_lock(ds.path(C.run_lock(run)), f"run {run}") if distributed.is_main() else contextlib.nullcontext()
        with lock:
            return _train(ds, tc, mc, resume=resume, on_epoch=on_epoch, tensorboard=tensorboard)


def _train(ds: DatasetDir, tc: TrainConfig, mc: ModelConfig, *, resume: bool, on_epoch=None,
           tensorboard: bool = True) -> TrainResult:
    from .runtime import TRIM_EVERY_STEPS, keep_freed_memory, progress, release_freed_memory, resolve_device, set_seed
    from .tensorboard_log import GateStats, RunWriter

    tc.validate()
    keep_freed_memory()
    mc = check_model_config(ModelConfig(**{**asdict(mc), "model": tc.model}))
    device = distributed.device_for(resolve_device(tc.device))
    bundle = load_dataset(ds, mc)
    if tc.drop_modality:  # missing modalities for the whole run (section 5.4)
        from .robustness import apply_drop

        bundle, _ = apply_drop(ds, bundle, tc.drop_modality, tc.drop_ratio, tc.seed)
    mc = bundle.model_config
    run = tc.run_name or default_run_name(ds, tc)
    tc = TrainConfig(**{**asdict(tc), "run_name": run})
    folder = run_dir(ds, run)
    log = ds.logger(STAGE_TRAIN) if distributed.is_main() else logging.getLogger(f"mmsr.rank{distributed.rank()}")
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
    # Pop and other parameter-free models: one pass gives their (fixed) result.
    epochs = tc.epochs if trainable else 1
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay) if trainable else None
    )

    history: list[dict] = []
    best = {"epoch": 0, "value": -math.inf, "valid": {}}
    bad_epochs, stopped, start_epoch = 0, False, 1
    last_path = folder / LAST_CKPT
    resuming = resume and last_path.exists() and (folder / CONFIG_FILE).exists()
    distributed.barrier()  # every rank has decided before rank 0 touches the folder
    if resuming:
        diff = _config_difference(read_run_config(folder / CONFIG_FILE), record)
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
        write_json_atomic(folder / CONFIG_FILE, record)
    for row in history if on_epoch is not None else ():  # the epochs a resumed run already has
        on_epoch(row)
    step = distributed.wrap(TrainStep(model), device)  # DDP under torchrun (not for Pop)
    log.info("train %s on %s: %s %s (device %s)", run, ds.name, tc, mc, device)

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
            shares, batch_indices = [], []
            for b in range(n_batches):
                global_batch = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                idx = distributed.shard(global_batch)  # the whole batch in one process
                shares.append(len(idx) / len(global_batch))  # this rank's weight in the batch's mean loss
                batch_indices.append(idx if len(idx) else global_batch[:1])  # fewer samples than ranks: a zero-weight step keeps DDP in sync
            for share, (_, batch) in zip(shares, prefetched(train_split, batch_indices)):
                batch = to_device(batch, device)
                if optimizer is None:
                    with torch.no_grad():
                        loss = step(batch) * share
                else:
                    loss = step(batch) * share
                    optimizer.zero_grad(set_to_none=True)
                    # DDP averages gradients over the W ranks: W * share recovers the batch mean
                    (loss * distributed.world_size()).backward()
                    if tc.clip_norm > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
                    optimizer.step()
                if tb.writer is not None:
                    gates.add(model)
                loss_sum += loss.detach()
                steps += 1
                if steps % TRIM_EVERY_STEPS == 0:
                    release_freed_memory()
                bar.advance(task)
            mean_loss = float(distributed.all_reduce_sum(loss_sum)) / max(steps, 1)
            if not math.isfinite(mean_loss):
                raise MmsrError(f"--lr {tc.lr}: training loss became {mean_loss} in epoch {epoch}; lower the learning rate")
            t1 = time.perf_counter()
            valid = evaluate_split(model, valid_split, tc.batch_size, device, lambda n: bar.advance(task, 1))
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
                    save_torch_atomic(folder / BEST_CKPT, {k: v.detach().cpu() for k, v in model.state_dict().items()})
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


# ----------------------------------------------------------------------------------------------
# Loading a finished run (evaluate, recommend)


@dataclass
class LoadedRun:
    name: str
    folder: Path
    config: dict
    train_config: TrainConfig
    model_config: ModelConfig
    bundle: DatasetBundle
    model: Recommender


def load_run(ds: DatasetDir, run: str, checkpoint: str = "best", device: torch.device | None = None) -> LoadedRun:
    """A trained model ready for scoring, after checking it belongs to this dataset's files."""
    folder = run_dir(ds, run)
    if not folder.exists():
        raise MmsrError(f"{folder}: no such run; run `mmsr train --dataset {ds.name} --run-name {run}` first")
    config = read_run_config(folder / CONFIG_FILE)
    tc = TrainConfig(**config["train"])
    mc = ModelConfig(**{**config["model"], "modalities": tuple(config["model"]["modalities"])})
    if config.get("dataset") != ds.name:
        raise MmsrError(f"{folder}: run was trained on dataset '{config.get('dataset')}', not '{ds.name}'")
    check_model_name(mc.model)
    bundle = load_dataset(ds, mc, verify=False)
    for stage, fingerprint in config.get("fingerprints", {}).items():
        current = bundle.fingerprints.get(stage)
        if current is None:
            manifest = ds.read_manifest(stage)
            current = manifest.get("fingerprint") if manifest else None
        if current != fingerprint:
            raise MmsrError(
                f"{folder}: run was trained on other '{stage}' data than dataset '{ds.name}' holds now "
                f"(fingerprint {fingerprint} != {current}); retrain it"
            )
    if tc.drop_modality:  # the items that lost modalities in training lack them here too
        from .robustness import apply_drop

        bundle, _ = apply_drop(ds, bundle, tc.drop_modality, tc.drop_ratio, tc.seed)
    if checkpoint not in ("best", "last"):
        raise MmsrError(f"--checkpoint: expected best or last, got {checkpoint!r}")
    path = folder / (BEST_CKPT if checkpoint == "best" else LAST_CKPT)
    state = load_torch(path)
    if checkpoint == "last":
        state = state.get("model", {}) if isinstance(state, dict) else {}
    model = build_model(bundle.model_config, bundle.info)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise MmsrError(f"{path}: does not fit model {mc.model} ({str(e).splitlines()[0]})") from e
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedRun(run, folder, config, tc, bundle.model_config, bundle, model)
