"""Data contracts between pipeline stages: file names, Parquet schemas and stage names.

Every stage reads and writes only through the names defined here, so the layout of a dataset
folder (``<workdir>/<dataset>/``) is documented in one place:

    raw/                         download: source files exactly as fetched (or ingested --from)
      sequences.tsv, items.jsonl   sequence format (synthetic, ../shared/data), or
      reviews.json.gz, meta.json.gz  Amazon 2014 review + metadata files, or
      interactions.csv|parquet     generic (user, item, timestamp) log, or
      amazon2023/                  Amazon Reviews 2023 files in the release's layout (sources/amazon2023.py)
      images/<item_id>.<ext>       item images (optional)
    items.parquet                preprocess: one row per kept item, dense ``item_idx``
    users.parquet                preprocess: one row per kept user, dense ``user_idx``
    interactions.parquet         preprocess: kept interactions in chronological order
    samples_{train,valid,test}.parquet  preprocess: (history, target) samples
    features/<modality>.pt       extract-features: float tensor [n_items, dim] (+ mask)
    features/<modality>.parquet  extract-features: item_idx -> row, missing flag
    codes/<modality>.parquet     build-codes: item_idx -> top-k code ids and cosine sims
    codes/<modality>.pt          build-codes: centre vectors [c, ae_dim]
    graphs/<variant>/<split>/    build-graphs: flat numpy arrays, memory-mapped by train
                                 (variant "codes", or "items" with --no-codes; see graphs.py)
    runs/<run_name>/...          train: checkpoints, config, metrics history
    manifests/<stage>.json       one manifest per stage (see workdir.py)
    logs/<stage>.log             log file of each stage

Conventions: item and user indices are dense, 0-based ``int32``; there is no padding id in any
file (padding is a batching concern of the models). Histories are stored oldest first, at most
``max_len`` items (the most recent ones).
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

from .errors import Range

# ----------------------------------------------------------------------------------------------
# Dataset names and the datasets `download` knows.

DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODALITY_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# ----------------------------------------------------------------------------------------------
# Numeric option ranges: each is checked where its option is parsed (app.ranged) and again where
# a library caller or a run's config.json hands the value over (the options' validate()). Upper
# bounds keep a typo from becoming an out-of-memory crash: no command needs more than 4 GiB on
# the synthetic set at the largest batch sizes.

RANGE_SEED = Range(0, 2**32 - 1)  # numpy's seeds
RANGE_RATIO = Range(0, 1, lo_open=True, hi_open=True, integer=False)  # --test-ratio, --drop-ratio, --perturb-ratio
RANGE_LR = Range(0, 10, lo_open=True, integer=False)
# download
RANGE_DOWNLOAD_WORKERS = Range(1, 64)
RANGE_RETRIES = Range(0, 100)
RANGE_TIMEOUT = Range(0, 3600, lo_open=True, integer=False)
# preprocess
RANGE_CORE = Range(0, 1000)
RANGE_MAX_LEN = Range(1, 1000)
# extract-features: a batch of 128 images at 224 px keeps ResNet-50's activations near 1.5 GB
RANGE_FEATURE_BATCH = Range(1, 128)
RANGE_FEATURE_CHUNK = Range(1, 16384)
RANGE_TEXT_TOKENS = Range(1, 512)  # the position limit of the text encoders we ship
RANGE_DECODE_WORKERS = Range(1, 8)  # each decoding thread may hold one image of up to ~320 MB
# build-codes
RANGE_AE_DIM = Range(1, 2048)
RANGE_CLUSTERS = Range(1, 10000)
RANGE_CODES_TOP_K = Range(1, 100)
RANGE_AE_EPOCHS = Range(1, 100000)
RANGE_AE_PATIENCE = Range(1, 10000)
RANGE_KMEANS_ITEMS = Range(0, 2**31 - 1)  # build-codes --kmeans-items; 0 = fit on every item
# train (and the run configs read back)
RANGE_EPOCHS = Range(1, 10000)
RANGE_TRAIN_BATCH = Range(1, 4096)
RANGE_PATIENCE = Range(0, 10000)
RANGE_MAX_STEPS = Range(0, 10**9)
RANGE_WEIGHT_DECAY = Range(0, 10, integer=False)
RANGE_CLIP_NORM = Range(0, 1e6, integer=False)
RANGE_DROPOUT = Range(0, 1, hi_open=True, integer=False)
RANGE_DIM = Range(1, 1024)
RANGE_LAYERS = Range(1, 16)
RANGE_HEADS = Range(1, 64)
# recommend
RANGE_TOP_K = Range(1, 1000)
# tune (its trials train with --epochs and --patience as above)
RANGE_TRIALS = Range(1, 10000)
RANGE_PRUNE_AFTER = Range(0, 10000)  # tune --prune-after; 0 = no pruning

# ----------------------------------------------------------------------------------------------
# Stage names (manifest keys). Per-modality stages are suffixed with ":<modality>".

STAGE_DOWNLOAD = "download"
STAGE_PREPROCESS = "preprocess"
STAGE_FEATURES = "features"  # features:<modality>
STAGE_CODES = "codes"  # codes:<modality>
STAGE_GRAPHS = "graphs"


def modality_stage(stage: str, modality: str) -> str:
    return f"{stage}:{modality}"


# ----------------------------------------------------------------------------------------------
# File names, relative to the dataset folder.

RAW_DIR = "raw"
RAW_SEQUENCES = "raw/sequences.tsv"
RAW_ITEMS = "raw/items.jsonl"
RAW_REVIEWS = "raw/reviews.json.gz"
RAW_META = "raw/meta.json.gz"
RAW_IMAGES_DIR = "raw/images"

ITEMS = "items.parquet"
USERS = "users.parquet"
INTERACTIONS = "interactions.parquet"
SPLITS = ("train", "valid", "test")


def samples_file(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return f"samples_{split}.parquet"


FEATURES_DIR = "features"
CODES_DIR = "codes"
GRAPHS_DIR = "graphs"
RUNS_DIR = "runs"
MANIFESTS_DIR = "manifests"
LOGS_DIR = "logs"
# Writer locks live beside the logs: process state, not outputs (nothing hashes or compares them).
DATASET_LOCK = f"{LOGS_DIR}/dataset.lock"  # held by every stage that writes the dataset folder


def run_lock(run: str) -> str:
    """Held by `train` while it writes runs/<run>/."""
    return f"{LOGS_DIR}/run-{run}.lock"


TUNE_DIR = "tune"  # `mmsr tune`: its Optuna studies (SQLite) and the best options of each
TUNE_STORAGE = f"{TUNE_DIR}/studies.sqlite3"


def tune_config_file(study: str) -> str:
    """The best options of a study, as a config file `mmsr train --config` takes."""
    return f"{TUNE_DIR}/{study}.toml"


def features_tensor_file(modality: str) -> str:
    return f"{FEATURES_DIR}/{modality}.pt"


def features_index_file(modality: str) -> str:
    return f"{FEATURES_DIR}/{modality}.parquet"


def codes_file(modality: str) -> str:
    return f"{CODES_DIR}/{modality}.parquet"


def centres_file(modality: str) -> str:
    return f"{CODES_DIR}/{modality}.pt"


# ----------------------------------------------------------------------------------------------
# Parquet schemas. Writers cast to these; readers may rely on them.

# Columns added to items.parquet after datasets were first prepared: readers fill them with nulls
# when an older file lacks them (preprocess writes them).
ITEMS_LATER_COLUMNS = ("features",)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),  # original id (ASIN)
        pa.field("title", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("brand", pa.string()),
        pa.field("description", pa.string()),
        pa.field("features", pa.list_(pa.string())),  # Amazon 2023 bullet points; null elsewhere
        pa.field("image_path", pa.string()),  # relative to the dataset folder; null if none
        pa.field("n_interactions", pa.int32(), nullable=False),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("n_interactions", pa.int32(), nullable=False),
    ]
)

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds; file order where absent
        pa.field("position", pa.int32(), nullable=False),  # 0-based rank in the user's sequence
    ]
)

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_idx", pa.int64(), nullable=False),
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("history", pa.list_(pa.int32()), nullable=False),  # oldest first, <= max_len
        pa.field("target", pa.int32(), nullable=False),
        pa.field("target_position", pa.int32(), nullable=False),  # position of target in sequence
    ]
)

FEATURE_INDEX_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),  # row in the features tensor
        pa.field("missing", pa.bool_(), nullable=False),  # True: no usable input, row is not a feature
        pa.field("reason", pa.string()),  # why missing (e.g. "image file not found"), else null
    ]
)

CODES_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("codes", pa.list_(pa.int32()), nullable=False),  # empty list: item has no codes
        pa.field("similarities", pa.list_(pa.float32()), nullable=False),
    ]
)


# ----------------------------------------------------------------------------------------------
# Item images: raw/images/<safe name>.<ext>. Item ids come from untrusted metadata, so they are
# turned into a file name that cannot escape the images folder.

# User and item ids are compared exactly across files (a log's item against items.jsonl, an image
# name, --users): a control character or surrounding whitespace would make the same id two ids
# and silently lose its metadata, so the source readers refuse them (no stripping anywhere).
ID_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def id_problem(value: str) -> str | None:
    """Why ``value`` is not a usable user or item id, or None when it is."""
    m = ID_CONTROL_RE.search(value)
    if m is not None:
        return f"has a control character (U+{ord(m.group()):04X}) at position {m.start()}"
    if value != value.strip():
        return "has leading or trailing whitespace"
    return None


_SAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def safe_item_filename(item_id: str) -> str:
    """A file-system-safe, collision-free stem for an item id (no '/', no leading '.')."""
    stem = _SAFE_CHARS.sub("_", item_id).lstrip(".")[:80]
    if stem != item_id or not stem:
        stem = f"{stem}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"
    return stem


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")

# Kinds of modality `extract-features --modality` records (robustness selects modalities by kind).
MODALITY_KINDS = ("image", "text")

# Graph variants built by `build-graphs`: modality nodes are shared codes, or one node per item.
GRAPH_VARIANTS = ("codes", "items")

# Relations of a graph's ``edge_rel`` (graphs.py writes them, models/layers.py and
# models/aggregators.py read them): homogeneous SELF/IN/OUT/BI between nodes of one type,
# HETERO between an item and its modality nodes.
RELATION_NAMES = ("self", "in", "out", "bi", "hetero")
REL_SELF, REL_IN, REL_OUT, REL_BI, REL_HETERO = range(len(RELATION_NAMES))

# ----------------------------------------------------------------------------------------------
# A training run's files (runs/<run>/, runs.py)

RUN_CONFIG = "config.json"  # the typed train and model configs, dataset sizes, upstream fingerprints
RUN_LAST_CKPT = "last.pt"  # model, optimizer, epoch, RNG states: what --resume continues from
RUN_BEST_CKPT = "best.pt"  # the model's state_dict at the best validation epoch
RUN_HISTORY_JSON = "history.json"
RUN_HISTORY_CSV = "history.csv"
RUN_CURVE_PNG = "curve.png"
STAGE_TRAIN = "train"  # the log name of `mmsr train`

# ----------------------------------------------------------------------------------------------
# Evaluation outputs of a run (runs/<run>/): clean metrics, and one file per robustness setting
# (`mmsr evaluate --drop-modality/--perturb`, see robustness.py), never overwriting the clean one.

PERTURB_DISORDERED = "disordered"
PERTURB_MISMATCHED = "mismatched"


def metrics_file(split: str, setting: str = "") -> str:
    """``metrics_<split>.json``, or ``metrics_<split>_<setting>.json`` for a robustness setting."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return f"metrics_{split}_{setting}.json" if setting else f"metrics_{split}.json"


def ranks_file(split: str, setting: str = "") -> str:
    """``ranks_<split>[_<setting>].npy``: the rank of each sample's target (int32, sample order),
    written by `mmsr evaluate` beside the metrics file of the same name (paired significance tests)."""
    return metrics_file(split, setting).replace("metrics_", "ranks_", 1).removesuffix(".json") + ".npy"


def _seed_suffix(seed: int) -> str:
    return f"-s{seed}" if seed else ""


def drop_setting(modality: str, ratio: float, seed: int = 0) -> str:
    """``drop-<image|text|all|NAME>-<ratio>`` (``-s<seed>`` for a seed other than 0)."""
    return f"drop-{modality}-{ratio:g}{_seed_suffix(seed)}"


def perturb_setting(kind: str, ratio: float = 0.0, seed: int = 0) -> str:
    """``disordered`` or ``mismatched-<ratio>`` (``-s<seed>`` for a seed other than 0)."""
    if kind == PERTURB_DISORDERED:
        return f"{kind}{_seed_suffix(seed)}"
    if kind == PERTURB_MISMATCHED:
        return f"{kind}-{ratio:g}{_seed_suffix(seed)}"
    raise ValueError(f"unknown perturbation {kind!r}")
