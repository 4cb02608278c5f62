"""`mmsr build-codes`: modality features -> linear autoencoder -> K-means -> top-k modality codes.

Paper section 4.1 ("Node transformation and compositions"): each modality's feature vectors are
condensed by a linear autoencoder, clustered with K-means into ``c`` clusters per modality, and
every item is linked to its ``k`` nearest cluster centres by cosine similarity. The centre
vectors initialise the code embedding table (``e_ID_a``). With ``--no-codes`` every item is its
own modality node (the Fig. 5 baseline without modality codes).

Outputs per modality ``NAME``: ``codes/NAME.parquet`` (contracts.CODES_SCHEMA) and
``codes/NAME.pt`` = ``{"centres": [c, ae_dim], "reduced": [n_items, ae_dim]}`` (float32; rows of
items without features are zero). :func:`load_modality_info` is how the graph builder and the
models read them.
"""

from __future__ import annotations

import numpy as np

from . import contracts as C
from .errors import MmsrError
from .workdir import DatasetDir, read_parquet, validate_modality_name

CODES_MODES = ("clusters", "items")  # manifest option codes_mode: shared codes, or one per item
VARIANTS = ("codes", "items")


def available_modalities(ds: DatasetDir) -> list[str]:
    """Names of the modalities that have a build-codes manifest, sorted."""
    prefix = C.STAGE_CODES + ":"
    return sorted(s[len(prefix):] for s in ds.stages(C.STAGE_CODES) if s.startswith(prefix))


def _load_centres_file(path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors differ between torch versions
        raise MmsrError(f"{path}: not a readable codes tensor file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or "centres" not in obj or "reduced" not in obj:
        raise MmsrError(f"{path}: expected a dict with 'centres' and 'reduced' tensors")
    return obj


def load_modality_info(ds: DatasetDir, name: str, variant: str = "codes"):
    """The :class:`~mmsr_cli.models.base.ModalityInfo` of modality ``name``.

    ``variant="codes"``: the code table written by build-codes (``n_codes`` = c clusters, or
    n_items when it ran with ``--no-codes``), ``item_codes`` int64 ``[n_items, k]`` padded with
    -1 (items without features: all -1). ``variant="items"``: one node per item whatever mode
    build-codes ran in (``n_codes`` = n_items, ``centres`` = the item's reduced vector,
    ``item_codes`` = ``[[item_idx]]``, ``[[-1]]`` for items without features).
    """
    import torch

    from .models.base import ModalityInfo

    validate_modality_name(name)
    if variant not in VARIANTS:
        raise MmsrError(f"graph variant {variant!r} is unknown (expected {' or '.join(VARIANTS)})")
    manifest = ds.require(C.modality_stage(C.STAGE_CODES, name))
    table = read_parquet(ds.path(C.codes_file(name)), C.CODES_SCHEMA)
    tensors = _load_centres_file(ds.path(C.centres_file(name)))
    reduced = tensors["reduced"].to(torch.float32)
    n_items = table.num_rows
    item_idx = table.column("item_idx").to_numpy()
    if not np.array_equal(item_idx, np.arange(n_items)) or reduced.shape[0] != n_items:
        raise MmsrError(
            f"{ds.path(C.codes_file(name))}: rows are not items 0..{n_items - 1} in order, or do "
            f"not match {C.centres_file(name)}; re-run `mmsr build-codes --modality {name}`"
        )
    # Offsets/values of the list column: vectorised padding, no Python loop over items.
    codes_col = table.column("codes").combine_chunks()
    offsets = codes_col.offsets.to_numpy()
    values = codes_col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    has_codes = lengths > 0

    if variant == "items":
        item_codes = np.where(has_codes, np.arange(n_items), -1).astype(np.int64)[:, None]
        return ModalityInfo(
            name=name,
            n_codes=n_items,
            code_dim=int(reduced.shape[1]),
            centres=reduced,
            item_codes=item_codes,
        )

    centres = tensors["centres"].to(torch.float32)
    options = manifest.get("options", {})
    k_recorded = int(options.get("top_k", 1)) if options.get("codes_mode") == "clusters" else 1
    k = int(max(lengths.max(initial=0), k_recorded, 1))
    item_codes = np.full((n_items, k), -1, dtype=np.int64)
    rows = np.repeat(np.arange(n_items), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    item_codes[rows, cols] = values
    return ModalityInfo(
        name=name,
        n_codes=int(centres.shape[0]),
        code_dim=int(centres.shape[1]),
        centres=centres,
        item_codes=item_codes,
    )
