"""Fuzz tests (hypothesis): the raw-data parsers and the MSGraph builder.

* `preprocess` on arbitrary raw files (bytes, broken lines, JSON and Python-literal records of
  any shape, CSV) either succeeds with consistent outputs or raises MmsrError: never another
  exception (which the CLI would report as an internal error). On well-formed files that some
  user's history satisfies it must succeed, with the users, items and samples computed here.
* :func:`mmsr_cli.graphs.build_msgraphs` on random small histories and code tables keeps the
  MSGraph invariants of paper section 4.1, stated directly here (tests/test_graphs.py compares
  against a reference construction): node counts, edges inside their graph, one self loop per
  node, item nodes deduplicated, codes shared, positions covering the history, and the same
  arrays however the samples are chunked.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmsr_cli import contracts as C
from mmsr_cli.errors import MmsrError
from mmsr_cli.graphs import REL_HETERO, REL_SELF, build_msgraphs
from mmsr_cli.preprocess import PreprocessOptions, build, n_test_items
from mmsr_cli.workdir import DatasetDir

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------
# Raw files

IDS = st.sampled_from(["a", "b", "c", "d", "e", " ", "", "x y", "é", "\t", "0", "-1"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8) | IDS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["asin", "reviewerID", "unixReviewTime", "title", "categories", "brand", "description", "imUrl"]


@st.composite
def records(draw) -> dict:
    """A record with some of the fields readers look for, each of any JSON type (or a valid one)."""
    rec = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6)):
        if name == "unixReviewTime":
            rec[name] = draw(st.integers(0, 20) | JSON_VALUES)
        elif name == "categories":
            rec[name] = draw(st.lists(st.lists(IDS, max_size=2), max_size=2) | st.lists(IDS, max_size=2) | JSON_VALUES)
        else:
            rec[name] = draw(IDS | JSON_VALUES)
    return rec


JSON_LINES = records().map(lambda r: json.dumps(r).encode())
LITERAL_LINES = records().map(lambda r: repr(r).encode())
GARBAGE_LINES = st.one_of(
    st.binary(max_size=30),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b""),
    st.just(b"\xff\xfe\x00"),
)
ITEM_IDS = st.sampled_from(["i1", "i2", "i3", "i4", "i5"])
OPTIONS = st.builds(
    PreprocessOptions,
    core=st.integers(0, 3),
    max_len=st.integers(1, 4),
    split=st.sampled_from(["loo", "ratio"]),
    test_ratio=st.sampled_from([0.2, 0.5]),
)


@st.composite
def mutated(draw, valid_lines) -> bytes:
    """A file of well-formed lines (so parsing goes on to k-core, splits and metadata), then up to
    two garbage or any-shaped record lines inserted or substituted, and sometimes a flipped byte
    or a cut at any byte; lines end in LF or CRLF."""
    lines = draw(valid_lines)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # half the files stay well-formed
        bad = draw(GARBAGE_LINES | JSON_LINES | LITERAL_LINES)
        at = draw(st.integers(0, len(lines)))
        if draw(st.booleans()) and at < len(lines):
            lines[at] = bad
        else:
            lines.insert(at, bad)
    data = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)
    if data and draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        else:
            data = data[:at]
    return data


@st.composite
def sequence_lines(draw) -> list[bytes]:
    users = draw(st.lists(st.sampled_from([f"u{k}" for k in range(8)]), min_size=1, max_size=8, unique=True))
    header = draw(st.sampled_from([b"user_id\titem_ids"] * 3 + [b"\xef\xbb\xbfuser_id\titem_ids", b"user\titems"]))
    return [header, *(f"{u}\t{' '.join(draw(st.lists(ITEM_IDS, min_size=1, max_size=7)))}".encode() for u in users)]


@st.composite
def review_lines(draw) -> list[bytes]:
    rows = []
    for _ in range(draw(st.integers(6, 25))):
        rec = {"reviewerID": draw(st.sampled_from(["A", "B", "C", "D"])), "asin": draw(ITEM_IDS),
               "unixReviewTime": draw(st.integers(0, 9))}
        rows.append((json.dumps(rec) if draw(st.booleans()) else repr(rec)).encode())
    return rows


@st.composite
def meta_lines(draw, literal: bool) -> list[bytes]:
    """Item metadata (Python literals for Amazon, JSON for items.jsonl); some fields of any shape."""
    rows = []
    for asin in draw(st.lists(ITEM_IDS, max_size=6, unique=draw(st.integers(0, 3)) > 0)):  # or a repeat
        rec = {"asin": asin, "title": draw(st.text(max_size=6)), "brand": draw(st.none() | st.text(max_size=4)),
               "categories": draw(st.lists(st.lists(st.text(max_size=4), max_size=2), max_size=2))}
        if not literal:
            rec["categories"] = rec["categories"][0] if rec["categories"] else None
        if draw(st.integers(0, 3)) == 0:
            rec.update(draw(records()))
        rows.append((repr(rec) if literal else json.dumps(rec)).encode())
    return rows


@st.composite
def csv_lines(draw) -> list[bytes]:
    header = draw(st.sampled_from([b"user,item,timestamp"] * 3 + [b"item,user,timestamp,extra", b"user,item"]))
    rows = [f"{draw(st.sampled_from(['A', 'B', 'C']))},{draw(ITEM_IDS)},{draw(st.integers(-3, 9))}".encode()
            for _ in range(draw(st.integers(6, 25)))]
    return [header, *rows]


GZIP_MODES = ["gzip", "gzip", "gzip", "gzip", "truncated gzip", "plain"]


def maybe_gzip(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "truncated gzip":
        return gzip.compress(data, mtime=0)[: max(1, len(data) // 2)]
    return data  # not gzip at all under a .gz name


@st.composite
def raw_folders(draw) -> dict[str, bytes]:
    """The raw/ files of one layout, fuzzed."""
    layout = draw(st.sampled_from(["sequences", "amazon2014", "csv"]))
    if layout == "sequences":
        files = {C.RAW_SEQUENCES: draw(mutated(sequence_lines()))}
        if draw(st.booleans()):
            files[C.RAW_ITEMS] = draw(mutated(meta_lines(literal=False)))
    elif layout == "amazon2014":
        files = {C.RAW_REVIEWS: maybe_gzip(draw(mutated(review_lines())), draw(st.sampled_from(GZIP_MODES)))}
        if draw(st.booleans()):
            files[C.RAW_META] = maybe_gzip(draw(mutated(meta_lines(literal=True))), draw(st.sampled_from(GZIP_MODES)))
    else:
        files = {"raw/interactions.csv": draw(mutated(csv_lines()))}
    return files


@FUZZ
@given(files=raw_folders(), opts=OPTIONS)
def test_preprocess_never_fails_but_with_a_one_line_mmsr_error(files, opts):
    with tempfile.TemporaryDirectory() as tmp:
        ds = DatasetDir.open(tmp, "fuzz")
        for rel, data in files.items():
            path = ds.path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            result = build(ds, opts)
        except MmsrError as e:
            assert str(e).strip() and "Traceback" not in str(e)
            return
    # A dataset came out: its samples are consistent with its item and user tables.
    n_items, n_users = result.items.num_rows, result.users.num_rows
    assert n_items > 0 and n_users > 0
    for split, table in result.samples.items():
        history = table.column("history").combine_chunks()
        lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False)
        assert np.all((lengths >= 1) & (lengths <= opts.max_len)), split
        flat = history.flatten().to_numpy(zero_copy_only=False)
        target = table.column("target").to_numpy()
        assert flat.size == 0 or (flat.min() >= 0 and flat.max() < n_items)
        assert target.size == 0 or (target.min() >= 0 and target.max() < n_items)
        users = table.column("user_idx").to_numpy()
        assert users.size == 0 or (users.min() >= 0 and users.max() < n_users)
    assert result.samples["test"].num_rows >= n_users  # every kept user has a test case


@st.composite
def satisfiable(draw) -> tuple[dict[str, list[str]], dict[str, bytes], PreprocessOptions]:
    """Well-formed histories (as sequences.tsv or as interactions.csv with increasing times) and
    options under which at least one user keeps two training items."""
    opts = draw(st.builds(PreprocessOptions, core=st.integers(0, 1), max_len=st.integers(1, 4),
                          split=st.sampled_from(["loo", "ratio"]), test_ratio=st.sampled_from([0.2, 0.5])))
    users = draw(st.lists(st.sampled_from([f"u{k}" for k in range(8)]), min_size=1, max_size=8, unique=True))
    seqs = {u: draw(st.lists(ITEM_IDS, min_size=1, max_size=9)) for u in users}
    lengths = np.array([len(v) for v in seqs.values()])
    if not (lengths - n_test_items(lengths, opts.split, opts.test_ratio) >= 2).any():
        seqs[users[0]] = draw(st.lists(ITEM_IDS, min_size=9, max_size=9))  # 9 - 4 (ratio 0.5) >= 2
    if draw(st.booleans()):
        lines = ["user_id\titem_ids", *(f"{u}\t{' '.join(items)}" for u, items in seqs.items())]
        files = {C.RAW_SEQUENCES: "\n".join(lines).encode() + b"\n"}
    else:
        rows = [(u, item) for u, items in seqs.items() for item in items]
        order = draw(st.permutations(range(len(rows))))  # file order does not matter, times do
        files = {"raw/interactions.csv": ("user,item,timestamp\n" + "".join(
            f"{rows[i][0]},{rows[i][1]},{100 + i}\n" for i in order)).encode()}
    return seqs, files, opts


@FUZZ
@given(case=satisfiable())
def test_preprocess_succeeds_on_satisfiable_inputs_with_the_expected_samples(case):
    """A preprocess that rejects every input passes the test above; this one does not."""
    seqs, files, opts = case
    with tempfile.TemporaryDirectory() as tmp:
        ds = DatasetDir.open(tmp, "fuzz")
        for rel, data in files.items():
            ds.path(rel).parent.mkdir(parents=True, exist_ok=True)
            ds.path(rel).write_bytes(data)
        result = build(ds, opts)
    kept = {u: items for u, items in seqs.items()
            if len(items) - n_test_items(np.array([len(items)]), opts.split, opts.test_ratio)[0] >= 2}
    item_id = dict(zip(result.items.column("item_idx").to_pylist(), result.items.column("item_id").to_pylist()))
    user_id = dict(zip(result.users.column("user_idx").to_pylist(), result.users.column("user_id").to_pylist()))
    assert sorted(user_id.values()) == sorted(kept)
    assert sorted(item_id.values()) == sorted({i for items in kept.values() for i in items})
    assert result.interactions.num_rows == sum(len(items) for items in kept.values())
    test = result.samples["test"].to_pylist()
    n_test = {u: int(n_test_items(np.array([len(items)]), opts.split, opts.test_ratio)[0]) for u, items in kept.items()}
    assert len(test) == sum(n_test.values())
    for row in test:  # each test target with the max_len items before it
        items = kept[user_id[row["user_idx"]]]
        pos = row["target_position"]
        assert len(items) - n_test[user_id[row["user_idx"]]] <= pos < len(items)
        assert item_id[row["target"]] == items[pos]
        assert [item_id[i] for i in row["history"]] == items[max(0, pos - opts.max_len) : pos]
    if opts.split == "loo":
        assert sorted((user_id[r["user_idx"]], item_id[r["target"]]) for r in test) == sorted(
            (u, items[-1]) for u, items in kept.items())


# ----------------------------------------------------------------------------------------------
# MSGraphs


@st.composite
def graph_inputs(draw):
    """Histories over a sparse id range (large ids stress the packed node-pair keys) and up to
    three modalities of k codes per item, some items without codes."""
    n_items = draw(st.sampled_from([1, 3, 8, 50_000]))
    used = draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=6, unique=True))
    item_codes = []
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(1, 4))
        n_codes = draw(st.sampled_from([1, 2, 5, 1000]))
        codes = np.full((n_items, k), -1, dtype=np.int64)
        for item in used:
            row = draw(st.lists(st.integers(-1, n_codes - 1), min_size=k, max_size=k))
            codes[item] = row
        item_codes.append(codes)
    histories = draw(st.lists(st.lists(st.sampled_from(used), min_size=1, max_size=12), min_size=1, max_size=6))
    return n_items, item_codes, histories


@FUZZ
@given(graph_inputs())
def test_msgraph_invariants_on_random_histories(inputs):
    n_items, item_codes, histories = inputs
    flat = np.array([v for h in histories for v in h], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    arrays = build_msgraphs(flat, ptr, item_codes, n_items)

    # The same arrays whatever the chunking (one sample per chunk here).
    chunked = build_msgraphs(flat, ptr, item_codes, n_items, chunk_entries=1)
    for name in ("node_ptr", "node_type", "node_ref", "pos_ptr", "pos", "edge_ptr", "edge_index", "edge_rel", "last_node"):
        assert np.array_equal(getattr(arrays, name), getattr(chunked, name)), name

    assert arrays.n_samples == len(histories)
    assert np.all(np.diff(arrays.node_ptr) >= 1) and np.all(np.diff(arrays.edge_ptr) >= 1)
    assert arrays.pos_ptr[-1] == len(arrays.pos) and arrays.edge_ptr[-1] == arrays.edge_index.shape[1]
    for s, history in enumerate(histories):
        g = arrays.graph(s)
        types, refs = g["node_type"].astype(int), g["node_ref"].astype(int)
        n = len(types)
        codes_of = [
            {item: {int(c) for c in codes[item] if c >= 0} for item in set(history)} for codes in item_codes
        ]
        # Nodes: each distinct item once; each code used by the history's items once per modality
        # (items sharing a code share its node); sorted by (type, ref).
        assert sorted(refs[types == 0].tolist()) == sorted(set(history))
        for m, per_item in enumerate(codes_of):
            shared = set().union(*per_item.values())
            assert sorted(refs[types == m + 1].tolist()) == sorted(shared)
        keys = list(zip(types.tolist(), refs.tolist()))
        assert keys == sorted(set(keys))
        assert types.max() <= len(item_codes)

        # Edges inside the graph, one self loop per node, no other loop, no duplicate pair.
        src, dst = g["edge_index"].astype(int)
        assert src.min() >= 0 and max(src.max(), dst.max()) < n
        loops = src == dst
        assert sorted(src[loops].tolist()) == list(range(n))
        assert np.all(g["edge_rel"][loops] == REL_SELF) and not np.any(g["edge_rel"][~loops] == REL_SELF)
        assert len(set(zip(src.tolist(), dst.tolist()))) == len(src)
        node_of = {k: i for i, k in enumerate(keys)}
        pairs = set(zip(src.tolist(), dst.tolist()))
        # Every item is linked both ways to each of its codes.
        for m, per_item in enumerate(codes_of):
            for item, codes in per_item.items():
                for c in codes:
                    a, b = node_of[(0, item)], node_of[(m + 1, c)]
                    assert (a, b) in pairs and (b, a) in pairs
        het = g["edge_rel"] == REL_HETERO
        assert np.all(types[src[het]] != types[dst[het]])
        # Adjacent distinct items are connected both ways.
        for a, b in zip(history, history[1:]):
            if a != b:
                assert (node_of[(0, a)], node_of[(0, b)]) in pairs and (node_of[(0, b)], node_of[(0, a)]) in pairs

        # Positions (counted from the end) cover the history: each position in exactly one item
        # node, the item's; a code node holds every position of the items linked to it.
        m_len = len(history)
        positions = {k: sorted(int(p) for p in ps) for k, ps in zip(keys, g["positions"])}
        item_positions = sorted(p for k, ps in positions.items() if k[0] == 0 for p in ps)
        assert item_positions == list(range(m_len))
        for t, item in enumerate(history):
            assert m_len - 1 - t in positions[(0, item)]
        for m, per_item in enumerate(codes_of):
            for c in set().union(*per_item.values()):
                expected = sorted({m_len - 1 - t for t, item in enumerate(history) if c in per_item[item]})
                assert positions[(m + 1, c)] == expected
        last = keys[int(g["last_node"])]
        assert last == (0, history[-1]) and 0 in positions[last]
