"""A training run's folder, its config and its experiment: everything that names or reads a run.

A run lives in ``<dataset>/runs/<run>/`` (file names in contracts: ``RUN_*``):

* ``config.json``: :class:`TrainConfig`, the model's config, dataset sizes, the build-codes options
  and the fingerprints of the stages the run read (preprocess, codes:<m>, graphs:<variant>), so
  `evaluate`/`recommend` can refuse a checkpoint that does not belong to the dataset's current
  files (:func:`read_run_config` checks it field by field against the typed configs);
* ``last.pt`` / ``best.pt``: checkpoints, tensors and plain containers only
  (``torch.load(weights_only=True)``);
* ``history.json``, ``history.csv``, ``curve.png``: written by training.py.

An experiment is a run's config without what only tells repetitions apart (seed, name, device):
:func:`experiment_key` groups runs over seeds, :func:`describe_experiment` labels them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import contracts as C
from .errors import MmsrError, check_typed_fields, parse_list
from .inputs import DatasetBundle, load_dataset
from .metrics import check_metric
from .models import build_model, check_model_config, check_model_name, fields_not_read
from .models.aggregators import check_aggregator
from .models.base import ModelConfig, Recommender
from .models.layers import FUSION_MODES
from .robustness import apply_drop, check_drop_options
from .runtime import code_version
from .workdir import DatasetDir, check_regular_file, read_file_text, write_torch_atomic

# Options that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("epochs", "device")
# Options that are not part of an experiment's identity when comparing runs over seeds.
NOT_EXPERIMENT = ("seed", "run_name", "device")


@dataclass
class TrainConfig:
    """How a model is trained (the ``train`` section of config.json); ``validate`` checks every
    field as the command line does."""

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


# The `mmsr train` option of a config field where it is not the field's name: the flags that
# switch a default off (--no-pos-emb: pos_emb False; --no-codes: graph_variant "items").
OPTION_NAMES = {"pos_emb": "no-pos-emb", "type_emb": "no-type-emb", "graph_variant": "no-codes"}
HAN_ONLY = ("fusion", "invasive", "attention_dropout")  # the options of MMSR's HAN-GNN layers alone


def train_configs(model: str, **given: Any) -> tuple[TrainConfig, ModelConfig]:
    """The TrainConfig and ModelConfig of a run of ``model`` from the options given (TrainConfig
    and ModelConfig fields; None: not given, the default), checked as `mmsr train` checks them,
    one line naming the option: an option the model does not read is refused, so are MMSR's
    HAN-GNN options with another --aggregator; ``modalities`` may be the option's comma-separated
    form. A script calling :func:`training.train` through this gets the command's checks."""
    check_model_name(model)
    given = {k: v for k, v in given.items() if v is not None}
    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(ModelConfig)}
    if set(given) - known:
        raise TypeError(f"train_configs: unknown fields {sorted(set(given) - known)}")
    for name in fields_not_read(model):
        if name in given:
            raise MmsrError(f"--{OPTION_NAMES.get(name, name.replace('_', '-'))}: not used by model {model}")
    aggregator = given.get("aggregator")
    if aggregator is not None and check_aggregator(aggregator) != "han":
        for name in HAN_ONLY:
            if name in given:
                raise MmsrError(f"--{name.replace('_', '-')}: only used by --aggregator han, not {aggregator}")
    if "fusion" in given and given["fusion"] not in FUSION_MODES:
        raise MmsrError(f"--fusion: expected one of {', '.join(FUSION_MODES)}, got {given['fusion']!r}")
    modalities = given.pop("modalities", ())
    names = parse_list(modalities, "--modalities") if isinstance(modalities, str) else list(modalities)
    drop = check_drop_options(given.pop("drop_modality", None), given.pop("drop_ratio", None))
    if len(set(names)) != len(names):
        shown = modalities if isinstance(modalities, str) else ",".join(names)
        raise MmsrError(f"--modalities: a modality is named twice in {shown}")
    train = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
    tc = TrainConfig(**{**train, "model": model, "drop_modality": drop[0] if drop else "",
                        "drop_ratio": drop[1] if drop else 0.0}).validate()
    options = {f.name: given[f.name] for f in fields(ModelConfig) if f.name in given}
    return tc, ModelConfig(**{**options, "model": model, "modalities": tuple(names)})


def default_run_name(ds: DatasetDir, cfg: TrainConfig, model: ModelConfig | None = None) -> str:
    """``<model>-<split>-s<seed>``, the split as preprocess made it: ``loo`` or ``ratio<r>``
    (``<model>-<split>-drop-<modality>-<ratio>-s<seed>`` when training drops modalities;
    ``<model>-<aggregator>-...`` when ``model`` has an aggregator other than the default)."""
    opts = ds.require(C.STAGE_PREPROCESS, verify=False).get("options", {})
    split = opts.get("split", "loo")
    if split == "ratio":
        split = f"ratio{opts.get('test_ratio')}"
    if cfg.drop_modality:
        split = f"{split}-{C.drop_setting(cfg.drop_modality, cfg.drop_ratio)}"
    name = cfg.model
    if model is not None and model.aggregator != ModelConfig.aggregator:
        name = f"{name}-{model.aggregator}"
    return f"{name}-{split}-s{cfg.seed}"


def run_dir(ds: DatasetDir, run: str) -> Path:
    if not C.DATASET_NAME_RE.match(run or ""):
        raise MmsrError(f"--run: invalid run name {run!r}")
    return ds.path(f"{C.RUNS_DIR}/{run}")


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
        # the code of the run's latest training session (a resumed run may have changed code);
        # not part of what a resume must match (config_difference)
        "code": code_version(),
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
        cfg = json.loads(read_file_text(path))
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


def config_difference(old: dict, new: dict) -> str | None:
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
    check_regular_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or foreign pickle: one line, not a traceback
        raise MmsrError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


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
    config = read_run_config(folder / C.RUN_CONFIG)
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
        bundle, _ = apply_drop(ds, bundle, tc.drop_modality, tc.drop_ratio, tc.seed)
    if checkpoint not in ("best", "last"):
        raise MmsrError(f"--checkpoint: expected best or last, got {checkpoint!r}")
    path = folder / (C.RUN_BEST_CKPT if checkpoint == "best" else C.RUN_LAST_CKPT)
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


# ----------------------------------------------------------------------------------------------
# Experiments: runs that differ only by seed


def experiment_key(config: dict) -> str:
    """A run's configuration without what only distinguishes repetitions (seed, name, device)."""
    config = with_config_defaults(config)  # fields added after a run was trained count with their defaults
    train = {k: v for k, v in config["train"].items() if k not in NOT_EXPERIMENT}
    key = {"model": config["model"], "train": train, "dataset": config["dataset"], "codes": config.get("codes") or {}}
    return json.dumps(key, sort_keys=True)


def describe_experiment(config: dict, exact: bool = False) -> str:
    """Short label of an experiment: the model plus the options that differ from the defaults
    (floats to 4 significant digits, as tuned learning rates come; ``exact``: as stored)."""
    mdef, tdef = asdict(ModelConfig()), asdict(TrainConfig())
    parts = [config["model"]["model"]]
    for key, value in config["model"].items():
        if key in ("model", "max_len") or key not in mdef:
            continue
        default = list(mdef[key]) if isinstance(mdef[key], tuple) else mdef[key]
        if value != default:
            parts.append(option_token(key, value, exact))
    for key, value in config["train"].items():
        if key in NOT_EXPERIMENT or key == "model" or value == tdef.get(key):
            continue
        parts.append(option_token(key, value, exact))
    return " ".join(parts)


def option_token(key: str, value, exact: bool = False) -> str:
    """``key=value`` as experiment labels write a config field (lists comma-joined, floats to 4
    significant digits unless ``exact``)."""
    if isinstance(value, list):
        return f"{key}={','.join(value)}"
    if isinstance(value, float) and not exact:
        return f"{key}={value:.4g}"
    return f"{key}={value}"


def compare_runs(records: list[dict]) -> list[dict]:
    """Group evaluated runs by experiment (config minus seed): mean and std (ddof 0) per metric."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(experiment_key(r["config"]), []).append(r)
    out = []
    for members in groups.values():
        members.sort(key=lambda r: (r["config"]["train"]["seed"], r["run"]))  # seeds listed in order
        names = list(members[0]["metrics"])
        values = {m: np.array([r["metrics"][m] for r in members], dtype=np.float64) for m in names}
        out.append(
            {
                "experiment": describe_experiment(members[0]["config"]),
                "model": members[0]["config"]["model"]["model"],
                "runs": [r["run"] for r in members],
                "seeds": [r["config"]["train"]["seed"] for r in members],
                "mean": {m: float(v.mean()) for m, v in values.items()},
                "std": {m: float(v.std()) for m, v in values.items()},
            }
        )
    labels = [g["experiment"] for g in out]
    for g, members in zip(out, groups.values()):  # options that differ past 4 digits: as stored
        if labels.count(g["experiment"]) > 1:
            g["experiment"] = describe_experiment(members[0]["config"], exact=True)
    labels = [g["experiment"] for g in out]
    for g, members in zip(out, groups.values()):  # same options, other codes: name the codes
        if labels.count(g["experiment"]) > 1:
            config = members[0]["config"]
            if config.get("codes"):
                g["experiment"] += " " + describe_codes(config["codes"])
            elif "codes" not in config:  # an old run whose codes were rebuilt since (training.recorded_codes)
                g["experiment"] += " codes-unknown"
    return out


def describe_codes(codes: dict) -> str:
    """``c=30 k=3`` (or ``no-codes``) of a run config's codes record; per modality when they differ."""

    def one(o: dict) -> str:
        return "no-codes" if o.get("codes_mode") == "items" else f"c={o.get('clusters')} k={o.get('top_k')}"

    parts = {name: one(o) for name, o in sorted(codes.items())}
    if len(set(parts.values())) == 1:
        return next(iter(parts.values()))
    return " ".join(f"{name}:{v}" for name, v in parts.items())
