"""What a model is built and fed from: its input kind, the dataset's sizes, modalities and splits.

A model names its input kind (``Recommender.input_kind``); the kind's object here owns what differs
between kinds, so training, evaluation, robustness and recommend ask it instead of branching:

* ``sequence``: padded histories (data.SequenceSplit); code-channel models (``reads_codes``:
  SASRecF, GRU4RecF, NOVA, DIF-SR, Trans2D) also read ``codes:<m>``;
* ``graph``: MSGraphs (MMSR): stored by build-graphs (``graphs:<variant>``), or built per batch
  from the histories when the codes or histories differ from those the graphs were built from
  (dropped, displaced or disordered: robustness.py);
* ``user-item``: the collaborative models (MMGCN, MGAT, BM3): the training user-item pairs and the
  items' extracted features (``features:<m>``), fed by user (the samples' ``user_idx``).

Each kind says which modalities a config reads and the stages they come from
(:meth:`InputKind.modalities`), opens a split (:meth:`InputKind.open_split`) and makes batches
from any histories (:meth:`InputKind.history_batches`, `mmsr recommend`). :func:`load_dataset`
checks the upstream stages and describes the dataset (:class:`DatasetBundle`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import torch

from . import codes
from . import contracts as C
from .data import SequenceSplit, pad_histories
from .errors import MmsrError
from .graphs import GraphSplit, collate_histories, graphs_stage
from .models import model_class
from .models.base import DatasetInfo, ModalityInfo, ModelConfig
from .robustness import disorder_histories
from .workdir import DatasetDir, read_parquet, validate_modality_name


@dataclass
class DatasetBundle:
    """What a model of a given config is built and fed from."""

    info: DatasetInfo
    fingerprints: dict[str, str]
    model_config: ModelConfig  # with the modalities resolved
    # info's item codes differ from those build-graphs used (dropped modalities): graph models
    # build their graphs per batch from the samples (HistoryGraphSplit)
    rebuild_graphs: bool = False

    @property
    def kind(self) -> "InputKind":
        return input_kind(self.model_config.model)

    def open_split(self, ds: DatasetDir, split: str, disorder_seed: int | None = None):
        """The split the model reads (histories shuffled with ``disorder_seed``: robustness)."""
        return self.kind.open_split(ds, self, split, disorder_seed)


def open_samples(ds: DatasetDir, info: DatasetInfo, split: str, disorder_seed: int | None = None) -> SequenceSplit:
    """A split's samples, each history's items shuffled (seeded) when ``disorder_seed`` is set."""
    samples = SequenceSplit.open(ds, split, info.max_len, info.n_items)
    if disorder_seed is not None:
        samples = replace(samples, flat=disorder_histories(samples.flat, samples.ptr, disorder_seed))
    return samples


class HistoryGraphSplit:
    """A split's samples as MSGraphs built per batch (base.SplitData), from the histories and the
    item codes of ``modalities`` (node type i + 1 = modalities[i]) by build-graphs' construction
    (graphs.collate_histories): equal to the stored graphs when codes and histories are unchanged."""

    def __init__(self, samples: SequenceSplit, modalities: Sequence[ModalityInfo], n_items: int, max_len: int):
        self.samples = samples  # flat histories, offsets, targets, users
        self.modalities = list(modalities)
        self.n_items = n_items
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.samples)

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        s = self.samples
        histories = [s.flat[s.ptr[r] : s.ptr[r + 1]] for r in idx]
        return collate_histories(
            histories, self.modalities, self.n_items, max_len=self.max_len,
            target=s.target[idx], user_idx=s.user_idx[idx],
        )


Batches = Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]


class InputKind:
    """What a model of one input kind reads; see the module docstring."""

    name: ClassVar[str] = ""
    needs_interactions: ClassVar[bool] = False  # DatasetInfo.train_interactions
    needs_item_features: ClassVar[bool] = False  # DatasetInfo.item_features (features:<m>)

    def modalities(self, ds: DatasetDir, cfg: ModelConfig, verify: bool) -> tuple[list[str], dict[str, str]]:
        """(modality names the model reads, {stage: fingerprint} of the stages they come from)."""
        if cfg.modalities:
            raise MmsrError(f"--modalities: model {cfg.model} uses no modalities")
        return [], {}

    def open_split(self, ds: DatasetDir, bundle: DatasetBundle, split: str, disorder_seed: int | None = None):
        return open_samples(ds, bundle.info, split, disorder_seed)

    def history_batches(self, info: DatasetInfo, flat: np.ndarray, ptr: np.ndarray, rows: np.ndarray,
                        batch_size: int) -> Batches:
        """Batches (rows, batch) of the histories ``flat[ptr[r]:ptr[r+1]]`` of ``rows``, each cut
        to the ``info.max_len`` most recent items (`mmsr recommend`: users' latest histories)."""
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            history, lengths = pad_histories(flat, ptr, batch_rows, info.max_len, info.n_items)
            yield batch_rows, {
                "history": torch.from_numpy(history),
                "lengths": torch.from_numpy(lengths),
                "target": torch.zeros(len(batch_rows), dtype=torch.long),
                "user_idx": torch.from_numpy(batch_rows.astype(np.int64)),
            }


def _codes_stages(ds: DatasetDir, names: list[str], verify: bool) -> dict[str, str]:
    stages = [C.modality_stage(C.STAGE_CODES, name) for name in names]
    return {stage: ds.require(stage, verify=verify)["fingerprint"] for stage in stages}


class SequenceInput(InputKind):
    name = "sequence"

    def modalities(self, ds: DatasetDir, cfg: ModelConfig, verify: bool) -> tuple[list[str], dict[str, str]]:
        if not model_class(cfg.model).reads_codes:
            return super().modalities(ds, cfg, verify)
        names = list(cfg.modalities) or list(codes.available_modalities(ds))
        if not names:
            raise MmsrError(
                f"--model {cfg.model}: dataset '{ds.name}' has no modality codes; run "
                f"`mmsr build-codes --modality NAME --dataset {ds.name}` first"
            )
        return names, _codes_stages(ds, names, verify)


class GraphInput(InputKind):
    name = "graph"

    def modalities(self, ds: DatasetDir, cfg: ModelConfig, verify: bool) -> tuple[list[str], dict[str, str]]:
        stage = graphs_stage(cfg.graph_variant)
        fingerprints = {stage: ds.require(stage, verify=verify)["fingerprint"]}
        names = GraphSplit.open(ds, "train", cfg.graph_variant, list(cfg.modalities) or None).modality_names
        return names, {**fingerprints, **_codes_stages(ds, names, verify)}

    def open_split(self, ds: DatasetDir, bundle: DatasetBundle, split: str, disorder_seed: int | None = None):
        if not bundle.rebuild_graphs and disorder_seed is None:
            cfg = bundle.model_config
            return GraphSplit.open(ds, split, cfg.graph_variant, list(cfg.modalities))
        info = bundle.info
        return HistoryGraphSplit(open_samples(ds, info, split, disorder_seed), info.modalities, info.n_items, info.max_len)

    def history_batches(self, info: DatasetInfo, flat: np.ndarray, ptr: np.ndarray, rows: np.ndarray,
                        batch_size: int) -> Batches:
        """MSGraph batches (GraphSplit.collate format) built in memory by build-graphs'
        construction with the modality codes in ``info`` (node types in ``info.modalities`` order)."""
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            histories = [flat[ptr[r] : ptr[r + 1]] for r in batch_rows]
            yield batch_rows, collate_histories(
                histories, info.modalities, info.n_items, max_len=info.max_len, user_idx=batch_rows
            )


class UserItemInput(InputKind):
    name = "user-item"
    needs_interactions = True
    needs_item_features = True

    def modalities(self, ds: DatasetDir, cfg: ModelConfig, verify: bool) -> tuple[list[str], dict[str, str]]:
        names = list(cfg.modalities) or feature_modalities(ds)
        if not names:
            raise MmsrError(
                f"--model {cfg.model}: dataset '{ds.name}' has no item features; run "
                f"`mmsr extract-features --modality image|text --dataset {ds.name}` first"
            )
        fingerprints = {}
        for name in names:
            validate_modality_name(name)
            stage = C.modality_stage(C.STAGE_FEATURES, name)
            fingerprints[stage] = ds.require(stage, verify=verify)["fingerprint"]
        return names, fingerprints


KINDS: dict[str, InputKind] = {k.name: k for k in (SequenceInput(), GraphInput(), UserItemInput())}


def input_kind(model: str) -> InputKind:
    """The input kind of model ``model`` (its class's ``input_kind``)."""
    name = model_class(model).input_kind
    if name not in KINDS:
        raise MmsrError(f"model {model}: unknown input kind {name!r} (expected one of {', '.join(KINDS)})")
    return KINDS[name]


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
    kind = input_kind(model_cfg.model)
    names, stages = kind.modalities(ds, model_cfg, verify)
    fingerprints.update(stages)
    item_features = {name: load_item_features(ds, name, n_items) for name in names} if kind.needs_item_features else {}
    modalities: list[ModalityInfo] = [] if kind.needs_item_features else [
        codes.load_modality_info(ds, name, variant=model_cfg.graph_variant) for name in names
    ]
    info = DatasetInfo(
        n_items=n_items,
        n_users=n_users,
        max_len=max_len,
        modalities=modalities,
        item_popularity=train_target_counts(ds, n_items),
        train_interactions=train_interactions(ds, n_users, n_items) if kind.needs_interactions else None,
        item_features=item_features,
    )
    resolved = ModelConfig(**{**asdict(model_cfg), "modalities": tuple(names), "max_len": max_len})
    return DatasetBundle(info, fingerprints, resolved)

