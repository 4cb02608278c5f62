"""Missing and perturbed modalities: paper section 5.4 (Figure 4) and the case study of Figure 1.

**Missing modalities** (``--drop-modality image|text|all|NAME --drop-ratio R``): for each selected
modality, a share R of the items that have it lose it, chosen with a seeded RNG (independently per
modality; ``all`` selects every modality, ``image``/``text`` every modality of that kind as
extract-features recorded it, NAME one modality). A dropped item's codes become -1 in
``ModalityInfo.item_codes``, the mark build-codes gives items without features, so:

* MMSR: the item's nodes of that modality are *removed* from every graph, never replaced by
  default vectors (section 5.4): the graphs are built per batch from the samples' histories with
  those codes (inputs.HistoryGraphSplit, build-graphs' vectorised construction, so a code node
  no item of the sample links to any more disappears with its edges and positions, and the
  transitions and cross-modality links the item contributed go with it). The stored graphs of
  build-graphs cannot be edited in place: an edge or position of a shared code node does not say
  which item it came from.
* SASRec^F and the other code-channel models (``ModalityCodeChannels``): the channel is masked as
  a missing modality (zero channel, ``available`` False).

**Perturbations** (evaluation only):

* ``disordered``: the item order of every history is shuffled (seeded); the items stay the same;
* ``mismatched``: a share R of the items that have a modality take the codes of other such items
  (a random cyclic shift among the chosen items, so each of them gets another item's codes),
  independently per modality: the sequence is kept, the item-modality match is broken.

Every choice depends only on (seed, modality name), so a run and its evaluations agree on the
items, whatever other modalities there are.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import contracts as C
from .errors import MmsrError
from .models.base import DatasetInfo, ModalityInfo

DROP_ALL = "all"
PERTURBATIONS = (C.PERTURB_DISORDERED, C.PERTURB_MISMATCHED)
DEFAULT_MISMATCH_RATIO = 0.5


def check_ratio(value: float, option: str) -> float:
    C.RANGE_RATIO.check(option, value)
    return float(value)


def check_drop_options(modality: str | None, ratio: float | None) -> tuple[str, float] | None:
    """(selector, ratio) of ``--drop-modality``/``--drop-ratio``, None when neither is given."""
    if not modality and ratio is None:
        return None
    if not modality:
        raise MmsrError("--drop-ratio: needs --drop-modality image|text|all|NAME")
    if ratio is None:
        raise MmsrError(f"--drop-modality {modality}: needs --drop-ratio R (0 < R < 1)")
    if modality not in (*C.MODALITY_KINDS, DROP_ALL) and not C.MODALITY_NAME_RE.match(modality):
        raise MmsrError(f"--drop-modality: {modality!r} is not image, text, all or a modality name")
    return modality, check_ratio(ratio, "--drop-ratio")


@dataclass(frozen=True)
class Setting:
    """An evaluation condition other than the clean one (at most one of drop and perturb)."""

    drop_modality: str = ""  # image | text | all | NAME
    drop_ratio: float = 0.0
    perturb: str = ""  # disordered | mismatched
    perturb_ratio: float = 0.0  # mismatched only
    seed: int = 0

    @classmethod
    def from_options(
        cls,
        drop_modality: str | None = None,
        drop_ratio: float | None = None,
        perturb: str | None = None,
        perturb_ratio: float | None = None,
        seed: int = 0,
    ) -> "Setting | None":
        """The setting of evaluate's options (one-line errors), None for the clean evaluation."""
        drop = check_drop_options(drop_modality, drop_ratio)
        if perturb is None and perturb_ratio is not None:
            raise MmsrError("--perturb-ratio: needs --perturb mismatched")
        if perturb is not None:
            if perturb not in PERTURBATIONS:
                raise MmsrError(f"--perturb: expected {' or '.join(PERTURBATIONS)}, got {perturb!r}")
            if drop is not None:
                raise MmsrError("--perturb: give either --drop-modality or --perturb, not both")
            if perturb == C.PERTURB_DISORDERED:
                if perturb_ratio is not None:
                    raise MmsrError("--perturb-ratio: only for --perturb mismatched (disordered shuffles every history)")
                return cls(perturb=perturb, seed=seed)
            ratio = DEFAULT_MISMATCH_RATIO if perturb_ratio is None else check_ratio(perturb_ratio, "--perturb-ratio")
            return cls(perturb=perturb, perturb_ratio=ratio, seed=seed)
        if drop is None:
            return None
        return cls(drop_modality=drop[0], drop_ratio=drop[1], seed=seed)

    @property
    def name(self) -> str:
        """The metrics file suffix (contracts.metrics_file)."""
        if self.drop_modality:
            return C.drop_setting(self.drop_modality, self.drop_ratio, self.seed)
        return C.perturb_setting(self.perturb, self.perturb_ratio, self.seed)

    def record(self) -> dict:
        out: dict = {"name": self.name, "seed": self.seed}
        if self.drop_modality:
            out.update(drop_modality=self.drop_modality, drop_ratio=self.drop_ratio)
        else:
            out.update(perturb=self.perturb)
            if self.perturb == C.PERTURB_MISMATCHED:
                out["perturb_ratio"] = self.perturb_ratio
        return out


# ----------------------------------------------------------------------------------------------
# Which modalities, which items


def modality_kinds(ds, names: Sequence[str]) -> dict[str, str | None]:
    """Each modality's kind (image/text) from its extract-features manifest; None if unrecorded."""
    kinds: dict[str, str | None] = {}
    for name in names:
        manifest = ds.read_manifest(C.modality_stage(C.STAGE_FEATURES, name)) or {}
        kind = (manifest.get("options") or {}).get("modality")
        kinds[name] = kind if kind in C.MODALITY_KINDS else None
    return kinds


def select_modalities(selector: str, kinds: dict[str, str | None], option: str = "--drop-modality") -> list[str]:
    """The modalities ``selector`` names: all, every one of a kind (or so named), or one by name."""
    names = list(kinds)
    shown = ", ".join(f"{n} ({kinds[n] or 'kind not recorded'})" for n in names) or "none"
    if selector == DROP_ALL:
        chosen = names
    elif selector in C.MODALITY_KINDS:
        chosen = [n for n in names if kinds[n] == selector or (kinds[n] is None and n == selector)]
        if not chosen:
            raise MmsrError(f"{option} {selector}: the run has no {selector} modality (its modalities: {shown})")
    else:
        chosen = [n for n in names if n == selector]
        if not chosen:
            raise MmsrError(f"{option}: unknown modality {selector!r} (the run's modalities: {shown})")
    if not chosen:
        raise MmsrError(f"{option} {selector}: the run reads no modality codes")
    return chosen


def _rng(seed: int, purpose: str, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode()), zlib.crc32(name.encode())])


def _share(ratio: float, n: int) -> int:
    return min(n, int(math.floor(ratio * n + 0.5)))


def items_with_codes(item_codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(item_codes)
    return np.nonzero((codes.reshape(len(codes), -1) >= 0).any(axis=1))[0]


def dropped_items(item_codes: np.ndarray, ratio: float, seed: int, name: str) -> np.ndarray:
    """Sorted ids of the round(ratio * n) items, among the n that have modality ``name``, that lose it."""
    present = items_with_codes(item_codes)
    chosen = _rng(seed, "drop", name).choice(present, size=_share(ratio, len(present)), replace=False)
    return np.sort(chosen)


def drop_modalities(
    modalities: Sequence[ModalityInfo], selected: Sequence[str], ratio: float, seed: int
) -> tuple[list[ModalityInfo], dict[str, int]]:
    """Copies of ``modalities`` whose selected ones have a share ``ratio`` of their items' codes set
    to -1 (missing); also the number of items dropped per modality."""
    out, counts = [], {}
    for m in modalities:
        if m.name not in selected:
            out.append(m)
            continue
        codes = np.array(m.item_codes, dtype=np.int64, copy=True)
        gone = dropped_items(codes, ratio, seed, m.name)
        codes[gone] = -1
        counts[m.name] = int(len(gone))
        out.append(replace(m, item_codes=codes))
    return out, counts


def mismatch_modalities(
    modalities: Sequence[ModalityInfo], ratio: float, seed: int
) -> tuple[list[ModalityInfo], dict[str, int]]:
    """Copies of ``modalities`` where, per modality, round(ratio * n) of the n items with codes take
    the codes of another of them (a cyclic shift of a random order: nobody keeps their own); at
    least two items when ``ratio`` picks one. Also the number of displaced items per modality."""
    out, counts = [], {}
    for m in modalities:
        codes = np.asarray(m.item_codes, dtype=np.int64)
        present = items_with_codes(codes)
        k = _share(ratio, len(present))
        if k == 1 and len(present) >= 2:
            k = 2
        if k < 2:
            k = 0
        receivers = _rng(seed, "mismatch", m.name).choice(present, size=k, replace=False)
        new = codes.copy()
        new[receivers] = codes[np.roll(receivers, 1)]  # receiver i gets the codes of receiver i-1
        counts[m.name] = int(k)
        out.append(replace(m, item_codes=new))
    return out, counts


def disorder_histories(flat: np.ndarray, ptr: np.ndarray, seed: int) -> np.ndarray:
    """``flat`` with the items of each history ``flat[ptr[s]:ptr[s+1]]`` in a random (seeded) order."""
    flat = np.asarray(flat)
    ptr = np.asarray(ptr, dtype=np.int64)
    segment = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    keys = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(b"disorder")]).random(len(flat))
    return flat[np.lexsort((keys, segment))]


# ----------------------------------------------------------------------------------------------
# Applying a setting to a run's data and model


def apply_drop(ds, bundle, selector: str, ratio: float, seed: int, option: str = "--drop-modality"):
    """``bundle`` (inputs.DatasetBundle) with the selected modalities dropped for a share of items;
    graph models then build their graphs per batch from these codes. Returns (bundle, counts)."""
    info: DatasetInfo = bundle.info
    if not info.modalities:
        raise MmsrError(
            f"{option}: model {bundle.model_config.model} reads no modality codes (MMSR and the "
            f"code-channel models sasrecf, gru4recf, nova, difsr, trans2d do)"
        )
    names = [m.name for m in info.modalities]
    selected = select_modalities(selector, modality_kinds(ds, names), option)
    modalities, counts = drop_modalities(info.modalities, selected, ratio, seed)
    return replace(bundle, info=replace(info, modalities=modalities), rebuild_graphs=True), counts


def apply_mismatch(bundle, ratio: float, seed: int):
    info: DatasetInfo = bundle.info
    if not info.modalities:
        raise MmsrError(
            f"--perturb mismatched: model {bundle.model_config.model} reads no modality codes, so "
            f"there is nothing to displace (use --perturb disordered)"
        )
    modalities, counts = mismatch_modalities(info.modalities, ratio, seed)
    return replace(bundle, info=replace(info, modalities=modalities), rebuild_graphs=True), counts
