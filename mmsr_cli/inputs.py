"""What a model is built and fed from: the dataset's sizes, modalities and splits.

:func:`load_dataset` checks the upstream stages a model needs and describes the dataset for it
(:class:`DatasetBundle`); the bundle opens the model's splits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from . import codes
from . import contracts as C
from .data import SequenceSplit
from .errors import MmsrError
from .graphs import GraphSplit, graphs_stage
from .models import model_class
from .models.base import DatasetInfo, ModalityInfo, ModelConfig
from .robustness import open_split as open_robust_split
from .workdir import DatasetDir, read_parquet, validate_modality_name


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
            return open_robust_split(ds, self, split)
        if cls.input_kind == "graph":
            return GraphSplit.open(ds, split, self.model_config.graph_variant, list(self.model_config.modalities))
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
    feats, missing = codes.load_features(ds, name)
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
    cls = model_class(model_cfg.model)
    names = list(model_cfg.modalities)
    modalities: list[ModalityInfo] = []
    if cls.input_kind == "graph":
        fingerprints[graphs_stage(model_cfg.graph_variant)] = ds.require(
            graphs_stage(model_cfg.graph_variant), verify=verify
        )["fingerprint"]
        names = GraphSplit.open(ds, "train", model_cfg.graph_variant, names or None).modality_names
    elif cls.reads_codes:  # SASRecF, GRU4RecF, NOVA, DIF-SR, Trans2D
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

