"""Modality-enriched Sequence Graphs (MSGraphs, paper section 4.1): construction, storage, batching.

One graph per sample (a history ``h_1..h_m``, oldest first):

* nodes: one item node per distinct item of the history, then, for each modality in the dataset's
  order, one node per distinct code used by the history's items (two items sharing a code share
  the node). Items missing a modality contribute no node of it. Within a graph nodes are ordered
  by (type, ref): items first (by item id), then each modality's codes (by code id).
* positions (section 4.2): each node holds the set of positions where it occurs, counted from the
  end of the history (0 = most recent item), so last pooling always sees position 0; a code node
  takes every position of every item linked to it.
* edges ``j -> i`` ("i aggregates from j"):
  - homogeneous, between nodes of one type, from adjacent history entries ``h_p -> h_{p+1}``
    (for codes: every code of ``h_p`` to every code of ``h_{p+1}`` of the same modality):
    REL_IN when ``j`` precedes ``i``, REL_OUT when ``j`` follows ``i``, REL_BI for both edges of a
    pair that transitions both ways somewhere in the history; a node never transitions to itself;
  - heterogeneous REL_HETERO, both ways: an item and each of its codes, and the codes of two
    different modalities of the same item;
  - one REL_SELF loop per node.

Nothing per sample is stored: the graphs are built as batches are drawn. ``mmsr build-graphs``
checks the samples and codes, builds every graph once to count nodes and edges, and records the
variant, the modalities and the counts in ``graphs/<variant>/meta.json`` and its manifest (which
make the graphs stale when the samples or codes change); :class:`GraphSplit` then turns a list of
sample indices into one disjoint batch graph by the vectorised construction of
:func:`build_msgraphs`, from the split's samples and the codes. Stored per-sample arrays took about
5 KB per training graph (600 MiB for Amazon Beauty, about 60 GB at 100 times its size); building a
batch of 512 graphs takes about 30 ms (docs/benchmarks.md, "Scale").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from . import codes
from . import contracts as C
from .contracts import REL_BI, REL_HETERO, REL_IN, REL_OUT, REL_SELF, RELATION_NAMES  # edge_rel ids
from .errors import MmsrError
from .models.base import ModalityInfo
from .workdir import (
    DatasetDir,
    fsync_path,
    full_disk_as_error,
    read_parquet,
    remove_dead_temporaries,
    temp_prefix,
    upstream,
    validate_modality_name,
)


NODE_TYPE_ITEM = 0  # modality i (0-based, in the stored order) has node type i + 1

META_FILE = "meta.json"
# Entries (history items) built at once; bounds peak memory of the vectorised construction.
CHUNK_ENTRIES = 100_000


def variant_dir(variant: str) -> str:
    """``graphs/<variant>`` relative to the dataset folder."""
    _check_variant(variant)
    return f"{C.GRAPHS_DIR}/{variant}"


def split_dir(variant: str, split: str) -> str:
    if split not in C.SPLITS:
        raise MmsrError(f"--splits: unknown split {split!r} (expected {', '.join(C.SPLITS)})")
    return f"{variant_dir(variant)}/{split}"


def graphs_stage(variant: str) -> str:
    return C.modality_stage(C.STAGE_GRAPHS, variant)


def _check_variant(variant: str) -> None:
    if variant not in C.GRAPH_VARIANTS:
        raise MmsrError(f"graph variant {variant!r} is unknown (expected {', '.join(C.GRAPH_VARIANTS)})")


# ----------------------------------------------------------------------------------------------
# Construction


@dataclass
class GraphArrays:
    """The MSGraphs of a set of samples, as flat arrays with CSR offsets per sample.

    ``node_ptr`` [S+1]: sample s owns nodes ``node_ptr[s]:node_ptr[s+1]``; ``node_type`` [N] (0 =
    item, i + 1 = modality i), ``node_ref`` [N] (item or code id); ``pos_ptr`` [N+1], ``pos`` [P]:
    node n's positions from the end of the history (0 = last); ``edge_ptr`` [S+1], ``edge_index``
    [2, E] (local node ids, row 0 source j, row 1 target i), ``edge_rel`` [E]; ``last_node`` [S]:
    local id of the last history item's node; ``target``, ``user_idx`` [S].
    """

    node_ptr: np.ndarray
    node_type: np.ndarray
    node_ref: np.ndarray
    pos_ptr: np.ndarray
    pos: np.ndarray
    edge_ptr: np.ndarray
    edge_index: np.ndarray
    edge_rel: np.ndarray
    last_node: np.ndarray
    target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    user_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def n_samples(self) -> int:
        return len(self.node_ptr) - 1

    def graph(self, s: int) -> dict[str, np.ndarray]:
        """Sample ``s``'s graph with local ids (for tests and inspection)."""
        n0, n1 = self.node_ptr[s], self.node_ptr[s + 1]
        e0, e1 = self.edge_ptr[s], self.edge_ptr[s + 1]
        return {
            "node_type": self.node_type[n0:n1],
            "node_ref": self.node_ref[n0:n1],
            "positions": [self.pos[self.pos_ptr[n] : self.pos_ptr[n + 1]] for n in range(n0, n1)],
            "edge_index": self.edge_index[:, e0:e1],
            "edge_rel": self.edge_rel[e0:e1],
            "last_node": self.last_node[s],
        }


def _segment_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])`` without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out_start = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, dtype=np.int64) - out_start, counts) + np.arange(total)


def _unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based: numpy's hash-based ``unique`` is far slower here)."""
    keys = np.sort(keys)
    if len(keys) < 2:
        return keys
    first = np.empty(len(keys), dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys[first]


def _unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each key's value, index of one key per value)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse, order[first]


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _build_chunk(
    hist: np.ndarray, hist_ptr: np.ndarray, item_codes: Sequence[np.ndarray], n_codes: Sequence[int], n_items: int
) -> GraphArrays:
    """MSGraphs of the samples whose flat histories are ``hist[hist_ptr[s]:hist_ptr[s+1]]``;
    ``item_codes`` as :func:`_prepare_codes` gives them, ``n_codes`` their code counts."""
    S = len(hist_ptr) - 1
    lengths = np.diff(hist_ptr)
    T = len(hist)
    entry_sample = np.repeat(np.arange(S, dtype=np.int64), lengths)
    entry_t = np.arange(T, dtype=np.int64) - hist_ptr[:-1][entry_sample]
    entry_pos = lengths[entry_sample] - 1 - entry_t  # distance from the end of the history

    # Nodes per type, as sorted unique (sample, ref) keys; type-local id = rank among the keys.
    item_keys, entry_item, item_first_entry = _unique_inverse(entry_sample * n_items + hist)
    type_sample = [item_keys // n_items]
    type_ref = [item_keys % n_items]
    # entry_codes[M]: [T, k_M] type-local node id of each code of each entry, -1 = none
    entry_codes: list[np.ndarray] = []
    for codes, n_c in zip(item_codes, n_codes):
        n_c = max(n_c, 1)
        ec = codes[hist]  # [T, k]
        present = ec >= 0
        keys, inv, _ = _unique_inverse((entry_sample[:, None] * n_c + ec)[present])
        local = np.full(ec.shape, -1, dtype=np.int64)
        local[present] = inv
        entry_codes.append(local)
        type_sample.append(keys // n_c)
        type_ref.append(keys % n_c)

    # Global numbering: sample s owns [node_ptr[s], node_ptr[s+1]), ordered by (type, ref).
    type_counts = [np.bincount(ts, minlength=S) for ts in type_sample]
    node_ptr = _exclusive_cumsum(np.sum(type_counts, axis=0))
    N = int(node_ptr[-1])
    nb = max(int(N).bit_length(), 1)  # node ids fit in nb bits: pairs pack into one int64 key
    mask = (1 << nb) - 1
    if 2 * nb + 3 > 62:
        raise ValueError("chunk too large to pack node pairs into int64 keys; lower chunk_entries")
    node_type = np.empty(N, dtype=np.int8)
    node_ref = np.empty(N, dtype=np.int32)
    to_global: list[np.ndarray] = []
    offset_in_sample = np.zeros(S, dtype=np.int64)  # nodes of earlier types in each sample
    for t, (ts, tr, cnt) in enumerate(zip(type_sample, type_ref, type_counts)):
        first_of_sample = _exclusive_cumsum(cnt)[:-1]
        g = np.arange(len(ts), dtype=np.int64) - first_of_sample[ts] + node_ptr[:-1][ts] + offset_in_sample[ts]
        node_type[g] = t
        node_ref[g] = tr
        to_global.append(g)
        offset_in_sample += cnt
    entry_item_g = to_global[0][entry_item]
    entry_codes_g = []
    for m, ec in enumerate(entry_codes):
        ecg = np.full(ec.shape, -1, dtype=np.int64)
        present = ec >= 0
        ecg[present] = to_global[m + 1][ec[present]]
        entry_codes_g.append(ecg)

    # Positions: (node, position) pairs, deduplicated, sorted by node then position.
    max_pos = int(lengths.max(initial=1))
    pair_node = [entry_item_g]
    pair_pos = [entry_pos]
    for ecg in entry_codes_g:
        present = ecg >= 0
        pair_node.append(ecg[present])
        pair_pos.append(np.broadcast_to(entry_pos[:, None], ecg.shape)[present])
    pos_keys = _unique(np.concatenate(pair_node) * max_pos + np.concatenate(pair_pos))
    pos_node = pos_keys // max_pos
    pos_ptr = _exclusive_cumsum(np.bincount(pos_node, minlength=N))
    pos = (pos_keys % max_pos).astype(np.int16)

    # Homogeneous transitions a -> b (a right before b), between adjacent entries of a sample.
    adjacent = np.nonzero(entry_sample[:-1] == entry_sample[1:])[0] if T > 1 else np.zeros(0, np.int64)
    fwd_a = [entry_item_g[adjacent]]
    fwd_b = [entry_item_g[adjacent + 1]]
    for ecg in entry_codes_g:
        a = np.broadcast_to(ecg[adjacent][:, :, None], (len(adjacent), ecg.shape[1], ecg.shape[1]))
        b = np.broadcast_to(ecg[adjacent + 1][:, None, :], a.shape)
        ok = (a >= 0) & (b >= 0)
        fwd_a.append(a[ok])
        fwd_b.append(b[ok])
    fa, fb = np.concatenate(fwd_a), np.concatenate(fwd_b)
    not_self = fa != fb  # a repeat or a shared code is not a transition
    fwd = _unique((fa[not_self] << nb) | fb[not_self])
    fa, fb = fwd >> nb, fwd & mask
    reverse = (fb << nb) | fa
    rev_pos = np.searchsorted(fwd, reverse)
    both_ways = fwd[np.minimum(rev_pos, len(fwd) - 1)] == reverse
    del reverse, rev_pos
    one_way = ~both_ways
    # b aggregates from a (a precedes b): IN; a aggregates from b (b follows a): OUT. A pair seen
    # both ways gets BI on a -> b here and on b -> a from its reverse transition.
    homo_src = np.concatenate([fa[one_way], fb[one_way], fa[both_ways]])
    homo_dst = np.concatenate([fb[one_way], fa[one_way], fb[both_ways]])
    homo_rel = np.concatenate(
        [
            np.full(int(one_way.sum()), REL_IN, np.int8),
            np.full(int(one_way.sum()), REL_OUT, np.int8),
            np.full(int(both_ways.sum()), REL_BI, np.int8),
        ]
    )

    # Heterogeneous, from each item node (one entry of it stands for all: an item's codes are
    # fixed): item <-> its codes (distinct within a row, so no duplicates), and codes of two
    # modalities of the same item (two items may share both codes: deduplicated).
    node_item_g = entry_item_g[item_first_entry]
    node_codes_g = [ecg[item_first_entry] for ecg in entry_codes_g]
    het_src: list[np.ndarray] = []
    het_dst: list[np.ndarray] = []
    for ncg in node_codes_g:
        items = np.broadcast_to(node_item_g[:, None], ncg.shape)
        ok = ncg >= 0
        het_src += [items[ok], ncg[ok]]
        het_dst += [ncg[ok], items[ok]]
    cross: list[np.ndarray] = []
    for m1, ncg1 in enumerate(node_codes_g):
        for m2, ncg2 in enumerate(node_codes_g):
            if m1 != m2:
                a = np.broadcast_to(ncg1[:, :, None], (len(node_item_g), ncg1.shape[1], ncg2.shape[1]))
                b = np.broadcast_to(ncg2[:, None, :], a.shape)
                ok = (a >= 0) & (b >= 0)
                cross.append((a[ok] << nb) | b[ok])
    if cross:
        cross_keys = _unique(np.concatenate(cross))
        het_src.append(cross_keys >> nb)
        het_dst.append(cross_keys & mask)
    het_src_a = np.concatenate(het_src) if het_src else np.zeros(0, np.int64)
    het_dst_a = np.concatenate(het_dst) if het_dst else np.zeros(0, np.int64)

    # All edges as one sorted key (target, source, relation): a graph's edges are contiguous
    # (node ids are grouped by sample) and sorted by target, then source. (src, dst) pairs are
    # distinct across the three groups (different node types or relations), so no dedup is needed.
    self_loops = np.arange(N, dtype=np.int64)
    rel_bits = 3  # relation ids 0..4
    keys = np.concatenate(
        [
            (((homo_dst << nb) | homo_src) << rel_bits) | homo_rel,
            (((het_dst_a << nb) | het_src_a) << rel_bits) | REL_HETERO,
            (((self_loops << nb) | self_loops) << rel_bits) | REL_SELF,
        ]
    )
    keys.sort()
    rel = (keys & ((1 << rel_bits) - 1)).astype(np.int8)
    keys >>= rel_bits
    dst = keys >> nb
    edge_ptr = np.searchsorted(dst, node_ptr)  # edges are sorted by target, targets grouped by sample
    node_local = (np.arange(N, dtype=np.int64) - np.repeat(node_ptr[:-1], np.diff(node_ptr))).astype(np.int32)
    edge_index = np.empty((2, len(keys)), dtype=np.int32)
    edge_index[1] = node_local[dst]
    del dst
    keys &= mask
    edge_index[0] = node_local[keys]
    del keys
    last_node = (entry_item_g[hist_ptr[1:] - 1] - node_ptr[:-1]).astype(np.int32)
    return GraphArrays(
        node_ptr=node_ptr,
        node_type=node_type,
        node_ref=node_ref,
        pos_ptr=pos_ptr,
        pos=pos,
        edge_ptr=edge_ptr,
        edge_index=edge_index,
        edge_rel=rel,
        last_node=last_node,
    )


def _concat(chunks: list[GraphArrays]) -> GraphArrays:
    """Join chunk results, shifting CSR offsets (local ids need no shift)."""
    if len(chunks) == 1:
        return chunks[0]

    def ptr(name: str) -> np.ndarray:
        parts, shift = [np.zeros(1, np.int64)], 0
        for ch in chunks:
            p = getattr(ch, name)
            parts.append(p[1:] + shift)
            shift += int(p[-1])
        return np.concatenate(parts)

    return GraphArrays(
        node_ptr=ptr("node_ptr"),
        node_type=np.concatenate([c.node_type for c in chunks]),
        node_ref=np.concatenate([c.node_ref for c in chunks]),
        pos_ptr=ptr("pos_ptr"),
        pos=np.concatenate([c.pos for c in chunks]),
        edge_ptr=ptr("edge_ptr"),
        edge_index=np.concatenate([c.edge_index for c in chunks], axis=1),
        edge_rel=np.concatenate([c.edge_rel for c in chunks]),
        last_node=np.concatenate([c.last_node for c in chunks]),
    )


def _distinct_codes(codes: np.ndarray) -> np.ndarray:
    """Each row's codes sorted, a code listed twice kept once (-1 fills the gaps)."""
    codes = np.sort(np.where(codes >= 0, codes, -1), axis=1)
    if codes.shape[1] > 1:
        repeated = np.zeros(codes.shape, dtype=bool)
        repeated[:, 1:] = (codes[:, 1:] == codes[:, :-1]) & (codes[:, 1:] >= 0)
        codes[repeated] = -1
    return codes


def _prepare_codes(item_codes: Sequence[np.ndarray], n_items: int) -> tuple[list[np.ndarray], list[int]]:
    """Each modality's ``[n_items, k]`` codes with repeats removed, and its number of codes."""
    codes = [_distinct_codes(np.asarray(c, dtype=np.int64).reshape(n_items, -1)) for c in item_codes]
    return codes, [int(c.max(initial=-1)) + 1 for c in codes]


def _chunk_bounds(hist_ptr: np.ndarray, chunk_entries: int) -> list[int]:
    """Sample boundaries of chunks of about ``chunk_entries`` history entries (at least one sample)."""
    S = len(hist_ptr) - 1
    bounds = [0]
    while bounds[-1] < S:
        start = bounds[-1]
        stop = int(np.searchsorted(hist_ptr, hist_ptr[start] + chunk_entries, side="right")) - 1
        bounds.append(min(S, max(stop, start + 1)))
    return bounds


def iter_msgraphs(
    hist: np.ndarray,
    hist_ptr: np.ndarray,
    item_codes: Sequence[np.ndarray],
    n_items: int,
    *,
    chunk_entries: int = CHUNK_ENTRIES,
):
    """The MSGraphs of all samples (see :func:`build_msgraphs`), one :class:`GraphArrays` per chunk
    of about ``chunk_entries`` history entries: memory bounded by the chunk, whatever the split."""
    hist_ptr = np.asarray(hist_ptr, dtype=np.int64)
    codes, n_codes = _prepare_codes(item_codes, n_items)
    if np.any(np.diff(hist_ptr) < 1):
        raise ValueError("every sample needs a non-empty history")
    bounds = _chunk_bounds(hist_ptr, chunk_entries)
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        e0, e1 = hist_ptr[s0], hist_ptr[s1]
        yield _build_chunk(np.asarray(hist[e0:e1], dtype=np.int64), hist_ptr[s0 : s1 + 1] - e0, codes, n_codes, n_items)


def build_msgraphs(hist: np.ndarray, hist_ptr: np.ndarray, item_codes: Sequence[np.ndarray], n_items: int, *,
                   chunk_entries: int = CHUNK_ENTRIES) -> GraphArrays:
    """MSGraphs of all samples: ``hist`` are the flat histories (oldest first), ``hist_ptr`` [S+1]
    their offsets, ``item_codes`` one ``[n_items, k]`` array per modality (-1 = no code).

    Samples are processed in chunks of about ``chunk_entries`` history entries, each fully
    vectorised, then joined. A sample's graph depends on its history and the codes only, not on
    the other samples of its chunk or batch.
    """
    hist_ptr = np.asarray(hist_ptr, dtype=np.int64)
    if len(hist_ptr) == 1:
        codes, n_codes = _prepare_codes(item_codes, n_items)
        return _build_chunk(np.zeros(0, np.int64), np.zeros(1, np.int64), codes, n_codes, n_items)
    return _concat(list(iter_msgraphs(hist, hist_ptr, item_codes, n_items, chunk_entries=chunk_entries)))


# ----------------------------------------------------------------------------------------------
# The build-graphs stage


@dataclass
class BuildGraphsOptions:
    modalities: list[str] | None = None  # None: every modality with codes
    no_codes: bool = False  # variant "items": one node per item and modality, nothing shared
    splits: tuple[str, ...] = C.SPLITS

    @property
    def variant(self) -> str:
        return "items" if self.no_codes else "codes"


@dataclass
class BuildGraphsResult:
    variant: str
    modalities: list[str]
    counts: dict
    seconds: float
    bytes_written: int


def _load_modality_info(ds: DatasetDir, name: str, variant: str) -> ModalityInfo:
    return codes.load_modality_info(ds, name, variant)


def _available_modalities(ds: DatasetDir) -> list[str]:
    return list(codes.available_modalities(ds))


def _read_samples(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flat history, offsets, target, user_idx, sample_idx) of a samples file."""
    table = read_parquet(path, C.SAMPLES_SCHEMA)
    history = table.column("history").combine_chunks()
    if history.null_count:
        raise MmsrError(f"{path}: field 'history' has null entries")
    lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False).astype(np.int64)
    # int32 as stored: half the memory of int64 for the largest array (chunks widen their slice)
    flat = pc.list_flatten(history).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    ptr = _exclusive_cumsum(lengths)

    def col(name: str) -> np.ndarray:
        c = table.column(name)
        if c.null_count:
            raise MmsrError(f"{path}: field '{name}' has null entries")
        return c.to_numpy()

    return flat, ptr, col("target"), col("user_idx"), col("sample_idx")


def _n_items(ds: DatasetDir) -> int:
    path = ds.path(C.ITEMS)
    if not path.exists():
        raise MmsrError(f"{path}: file not found; run `mmsr preprocess --dataset {ds.name}` first")
    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise MmsrError(f"{path}: not a readable Parquet file ({e})") from e


def _check_samples(path: Path, flat, ptr, target, sample_idx, n_items: int) -> None:
    lengths = np.diff(ptr)
    bad = np.nonzero(lengths < 1)[0]
    if len(bad):
        raise MmsrError(f"{path}: sample_idx {int(sample_idx[bad[0]])}: empty history")
    for name, values in (("history", flat), ("target", target)):
        out = np.nonzero((values < 0) | (values >= n_items))[0]
        if len(out):
            row = int(np.searchsorted(ptr, out[0], side="right") - 1) if name == "history" else int(out[0])
            raise MmsrError(
                f"{path}: sample_idx {int(sample_idx[row])}: field '{name}' holds item {int(values[out[0]])} "
                f"outside 0..{n_items - 1} of {C.ITEMS}; re-run `mmsr preprocess --dataset {path.parent.name}`"
            )
    if int(lengths.max(initial=0)) > np.iinfo(np.int16).max:
        raise MmsrError(f"{path}: histories longer than {np.iinfo(np.int16).max} are not supported")


def _split_counts(flat: np.ndarray, ptr: np.ndarray, item_codes: Sequence[np.ndarray], n_items: int, advance=None) -> dict:
    """Nodes, edges and positions of a split's graphs, built chunk by chunk and let go."""
    nodes = edges = positions = 0
    for chunk in iter_msgraphs(flat, ptr, item_codes, n_items):
        nodes += int(chunk.node_ptr[-1])
        edges += int(chunk.edge_ptr[-1])
        positions += int(chunk.pos_ptr[-1])
        if advance is not None:
            advance(chunk.n_samples)
    S = len(ptr) - 1
    return {
        "samples": S,
        "nodes": nodes,
        "edges": edges,
        "positions": positions,
        "mean_nodes": round(nodes / max(S, 1), 3),
        "mean_edges": round(edges / max(S, 1), 3),
    }


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put ``tmp`` where ``final`` is, keeping the previous folder until the new one is in place."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(final.with_name(final.name + ".old")), dir=final.parent))
        os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old / final.name, final)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def build_graphs(ds: DatasetDir, opts: BuildGraphsOptions, progress=None) -> BuildGraphsResult:
    """Check the chosen splits' samples and the codes, build every graph once to count nodes and
    edges, and record the ``graphs:<variant>`` manifest and ``meta.json`` (batches build their
    graphs when drawn: :class:`GraphSplit`)."""
    t0 = time.perf_counter()
    variant = opts.variant
    log = ds.logger(graphs_stage(variant))
    splits = list(dict.fromkeys(opts.splits))
    if not splits:
        raise MmsrError("--splits: at least one split is needed")
    for split in splits:
        split_dir(variant, split)  # validates the name
    pre = ds.require(C.STAGE_PREPROCESS)
    inputs = upstream(pre)

    available = _available_modalities(ds)
    if opts.modalities is None:
        names = available
    else:
        names = [validate_modality_name(m) for m in opts.modalities]
        if len(set(names)) != len(names):
            raise MmsrError(f"--modalities: a modality is named twice in {','.join(names)}")
        missing = [m for m in names if m not in available]
        if missing:
            have = ", ".join(available) or "none"
            raise MmsrError(
                f"--modalities: no codes for {', '.join(missing)} (built: {have}); "
                f"run `mmsr build-codes --modality {missing[0]} --dataset {ds.name}` first"
            )
    n_items = _n_items(ds)
    infos: list[ModalityInfo] = []
    for name in names:
        inputs.update(upstream(ds.require(C.modality_stage(C.STAGE_CODES, name))))
        info = _load_modality_info(ds, name, variant)
        codes = np.asarray(info.item_codes) if info.item_codes is not None else None
        if codes is None or codes.ndim != 2 or codes.shape[0] != n_items:
            shape = None if codes is None else tuple(codes.shape)
            raise MmsrError(
                f"{ds.path(C.codes_file(name))}: codes of modality '{name}' have shape {shape}, expected "
                f"[{n_items}, k]; re-run `mmsr build-codes --modality {name} --dataset {ds.name}`"
            )
        if codes.size and (codes.max() >= info.n_codes or codes.min() < -1):
            raise MmsrError(
                f"{ds.path(C.codes_file(name))}: code ids outside 0..{info.n_codes - 1}; "
                f"re-run `mmsr build-codes --modality {name} --dataset {ds.name}`"
            )
        infos.append(info)
    item_codes = [np.asarray(i.item_codes, dtype=np.int64) for i in infos]

    root = ds.path(variant_dir(variant))
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(root.parent)  # folders of a killed earlier run
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(root), dir=root.parent))
    counts: dict = {}
    try:
        with full_disk_as_error(root):  # numpy reports a short write without an errno
            for split in splits:
                path = ds.path(C.samples_file(split))
                flat, ptr, target, user_idx, sample_idx = _read_samples(path)
                _check_samples(path, flat, ptr, target, sample_idx, n_items)
                ts = time.perf_counter()
                task = progress.add_task(f"graphs {split}", total=len(ptr) - 1) if progress is not None else None
                counts[split] = _split_counts(
                    flat, ptr, item_codes, n_items, (lambda n: progress.advance(task, n)) if progress is not None else None
                )
                counts[split]["seconds"] = round(time.perf_counter() - ts, 3)
                log.info("%s: %s", split, counts[split])
                del flat, ptr, target, user_idx, sample_idx
            meta = {
                "variant": variant,
                "modalities": names,
                "n_items": n_items,
                "n_codes": {i.name: int(i.n_codes) for i in infos},
                "codes_per_item": {i.name: int(np.asarray(i.item_codes).shape[1]) for i in infos},
                "splits": splits,
                # no timings here: identical inputs must give identical bytes (and fingerprint)
                "counts": {sp: {k: v for k, v in c.items() if k != "seconds"} for sp, c in counts.items()},
                "relations": dict(enumerate(RELATION_NAMES)),
                "node_types": ["item", *names],
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            fsync_path(tmp)
            _replace_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    rel_root = variant_dir(variant)
    outputs = [f"{rel_root}/{META_FILE}"]
    ds.write_manifest(
        graphs_stage(variant),
        inputs=inputs,
        outputs=outputs,
        options={"modalities": names, "variant": variant, "splits": splits},
        counts=counts,
    )
    bytes_written = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    seconds = time.perf_counter() - t0
    log.info("done in %.1fs, %d bytes", seconds, bytes_written)
    return BuildGraphsResult(variant, names, counts, seconds, bytes_written)


# ----------------------------------------------------------------------------------------------
# Reading and batching


class GraphSplit:
    """One split's MSGraphs, built per batch by :meth:`collate` (base.SplitData) from the split's
    histories and the item codes of ``modalities`` (node type i + 1 = ``modalities[i]``)."""

    def __init__(
        self,
        hist: np.ndarray,
        hist_ptr: np.ndarray,
        target: np.ndarray,
        user_idx: np.ndarray,
        modalities: Sequence[ModalityInfo],
        n_items: int,
        variant: str = "codes",
    ):
        self.hist = np.asarray(hist)  # flat histories, oldest first (int32 as read)
        self.hist_ptr = np.asarray(hist_ptr, dtype=np.int64)
        self.target = np.asarray(target)
        self.user_idx = np.asarray(user_idx)
        self.n_items = n_items
        self._variant = variant
        self._names = [m.name for m in modalities]
        for m in modalities:
            if m.item_codes is None:
                raise MmsrError(f"modality '{m.name}' has no item codes")
        self._codes, self._n_codes = _prepare_codes([np.asarray(m.item_codes) for m in modalities], n_items)

    @classmethod
    def open(
        cls, ds: DatasetDir, split: str, variant: str = "codes", modalities: Sequence[str] | None = None
    ) -> "GraphSplit":
        """The split as build-graphs recorded it (refused when stale), with ``modalities`` (a subset
        of the recorded ones, in any order; default all, in the recorded order)."""
        split_dir(variant, split)  # validates the names
        manifest = ds.require(graphs_stage(variant))  # refuses graphs of other samples or codes
        if split not in manifest["options"].get("splits", ()):
            raise MmsrError(
                f"{ds.path(variant_dir(variant))}: split '{split}' was not built; run `mmsr build-graphs --splits {split}"
                f"{' --no-codes' if variant == 'items' else ''} --dataset {ds.name}` first"
            )
        stored = list(manifest["options"]["modalities"])
        names = stored if modalities is None else list(modalities)
        unknown = [m for m in names if m not in stored]
        if unknown or len(set(names)) != len(names):
            raise MmsrError(
                f"--modalities: {','.join(names)} is not a subset of the modalities the graphs were "
                f"built with ({', '.join(stored) or 'none'}); re-run `mmsr build-graphs` with them"
            )
        n_items = _n_items(ds)
        path = ds.path(C.samples_file(split))
        flat, ptr, target, user_idx, sample_idx = _read_samples(path)
        _check_samples(path, flat, ptr, target, sample_idx, n_items)
        infos = [_load_modality_info(ds, name, variant) for name in names]
        return cls(flat, ptr, target, user_idx, infos, n_items, variant)

    @property
    def modality_names(self) -> list[str]:
        """Modalities in the batches, in node-type order: node type i + 1 is modality_names[i]."""
        return list(self._names)

    @property
    def variant(self) -> str:
        return self._variant

    def __len__(self) -> int:
        return len(self.target)

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """One disjoint graph of the samples ``indices`` (in that order, repeats allowed); ids are
        batch-global. Equal to collating the same samples from :func:`build_msgraphs` of the split."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        S = len(self)
        if len(idx) and (idx.min() < -S or idx.max() >= S):
            raise IndexError(f"sample index out of range 0..{S - 1}")
        idx = np.where(idx < 0, idx + S, idx)
        start, stop = self.hist_ptr[idx], self.hist_ptr[idx + 1]
        lengths = stop - start
        hist = self.hist[_segment_ranges(start, lengths)].astype(np.int64)
        arrays = _build_chunk(hist, _exclusive_cumsum(lengths), self._codes, self._n_codes, self.n_items)
        arrays.target = self.target[idx]
        arrays.user_idx = self.user_idx[idx]
        return _collate_arrays(vars(arrays), np.arange(len(idx), dtype=np.int64))


def _collate_arrays(a: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """One disjoint batch graph of samples ``idx`` of the arrays ``a`` (:class:`GraphArrays`'
    fields): local ids become batch-global ids."""
    B = len(idx)

    n_start = np.asarray(a["node_ptr"][idx])
    n_count = np.asarray(a["node_ptr"][idx + 1]) - n_start
    node_src = _segment_ranges(n_start, n_count)  # node ids of ``a`` in batch order
    node_graph = np.repeat(np.arange(B, dtype=np.int64), n_count)
    node_base = np.cumsum(n_count) - n_count  # first batch node id of each sample
    node_type = a["node_type"][node_src].astype(np.int64)
    node_ref = a["node_ref"][node_src].astype(np.int64)

    p_start = np.asarray(a["pos_ptr"][node_src])
    p_count = np.asarray(a["pos_ptr"][node_src + 1]) - p_start
    pos_index = a["pos"][_segment_ranges(p_start, p_count)].astype(np.int64)
    pos_node = np.repeat(np.arange(len(node_src), dtype=np.int64), p_count)

    e_start = np.asarray(a["edge_ptr"][idx])
    e_count = np.asarray(a["edge_ptr"][idx + 1]) - e_start
    edge_src = _segment_ranges(e_start, e_count)
    edge_index = a["edge_index"][:, edge_src].astype(np.int64) + np.repeat(node_base, e_count)[None, :]
    edge_rel = a["edge_rel"][edge_src].astype(np.int64)
    last_node = a["last_node"][idx].astype(np.int64) + node_base

    t = torch.from_numpy
    return {
        "node_type": t(np.ascontiguousarray(node_type)),
        "node_ref": t(np.ascontiguousarray(node_ref)),
        "pos_index": t(np.ascontiguousarray(pos_index)),
        "pos_node": t(np.ascontiguousarray(pos_node)),
        "edge_index": t(np.ascontiguousarray(edge_index)),
        "edge_rel": t(np.ascontiguousarray(edge_rel)),
        "node_graph": t(np.ascontiguousarray(node_graph)),
        "last_node": t(np.ascontiguousarray(last_node)),
        "target": t(np.asarray(a["target"][idx]).astype(np.int64)),
        "user_idx": t(np.asarray(a["user_idx"][idx]).astype(np.int64)),
    }


def collate_histories(
    histories: Sequence[Sequence[int]] | np.ndarray,
    modalities: Sequence[ModalityInfo],
    n_items: int,
    *,
    max_len: int | None = None,
    target: np.ndarray | None = None,
    user_idx: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """The batch (:meth:`GraphSplit.collate` keys and format) of arbitrary histories, built in memory.

    ``histories``: one sequence of item ids per sample, oldest first (a 2-D array: one per row);
    ``modalities``: the modalities' ``item_codes`` ([n_items, k], -1 = none), whose order gives the
    node types (type i + 1 = ``modalities[i]``), as in a :class:`GraphSplit` with those modalities.
    With ``max_len``, longer histories keep their most recent ``max_len`` items. ``target`` and
    ``user_idx`` default to zeros and 0..B-1. Equals :meth:`GraphSplit.collate` of the same samples
    (same construction, :func:`build_msgraphs`).
    """
    seqs = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    if max_len is not None:
        if max_len < 1:
            raise MmsrError(f"max_len must be >= 1, got {max_len}")
        seqs = [h[-max_len:] for h in seqs]
    B = len(seqs)
    lengths = np.array([len(h) for h in seqs], dtype=np.int64)
    if B and lengths.min() < 1:
        raise MmsrError(f"history {int(np.argmin(lengths))} of the batch is empty")
    flat = np.concatenate(seqs) if B else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_items):
        raise MmsrError(f"history item ids must be in 0..{n_items - 1}, got {int(flat.min())}..{int(flat.max())}")
    codes = []
    for m in modalities:
        if m.item_codes is None:
            raise MmsrError(f"modality '{m.name}' has no item codes")
        codes.append(np.asarray(m.item_codes, dtype=np.int64))
    arrays = build_msgraphs(flat, _exclusive_cumsum(lengths), codes, n_items)
    arrays.target = np.zeros(B, np.int64) if target is None else np.asarray(target).reshape(B)
    arrays.user_idx = np.arange(B, dtype=np.int64) if user_idx is None else np.asarray(user_idx).reshape(B)
    return _collate_arrays(vars(arrays), np.arange(B, dtype=np.int64))


def to_hetero_data(batch: dict[str, torch.Tensor], modality_names: Sequence[str]):
    """A collated batch as a ``torch_geometric.data.HeteroData``.

    Node types: "item" and the modality names (batch node type i + 1 = ``modality_names[i]``);
    each node store holds ``node_ref`` (item or code id), ``batch`` (sample index), ``global_id``
    (batch-global node id), ``num_nodes`` and its positions (``pos_index``, ``pos_node`` local to
    the type). Edge types: ``(t, r, t)`` for r in self/in/out/bi and ``(t, "hetero", t')`` for
    t != t', all present (possibly empty) so every batch has the same metadata; ``edge_index`` uses
    per-type local ids, source in row 0. The item store also holds ``last`` (local id of each
    sample's last item) and the data holds ``target`` and ``user_idx``.
    """
    # torch_geometric.data: only for the HeteroData export, not for building graphs
    from torch_geometric.data import HeteroData

    type_names = ["item", *modality_names]
    node_type = batch["node_type"]
    if len(node_type) and int(node_type.max()) >= len(type_names):
        raise ValueError(f"batch has node type {int(node_type.max())} but only {len(type_names)} names")
    local = torch.empty_like(node_type)
    data = HeteroData()
    for t, name in enumerate(type_names):
        mask = node_type == t
        ids = mask.nonzero().view(-1)
        local[ids] = torch.arange(len(ids))
        store = data[name]
        store.num_nodes = len(ids)
        store.node_ref = batch["node_ref"][ids]
        store.batch = batch["node_graph"][ids]
        store.global_id = ids
        pmask = mask[batch["pos_node"]]
        store.pos_index = batch["pos_index"][pmask]
        store.pos_node = local[batch["pos_node"][pmask]]
    src, dst = batch["edge_index"]
    src_t, dst_t, rel = node_type[src], node_type[dst], batch["edge_rel"]
    for ts, s_name in enumerate(type_names):
        for td, d_name in enumerate(type_names):
            rels = (REL_SELF, REL_IN, REL_OUT, REL_BI) if ts == td else (REL_HETERO,)
            for r in rels:
                sel = (src_t == ts) & (dst_t == td) & (rel == r)
                data[s_name, RELATION_NAMES[r], d_name].edge_index = torch.stack([local[src[sel]], local[dst[sel]]])
    data["item"].last = local[batch["last_node"]]
    data.target = batch["target"]
    data.user_idx = batch["user_idx"]
    return data
