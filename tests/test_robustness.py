"""Missing and perturbed modalities (paper section 5.4 / Figure 4, Figure 1): robustness.py and
`mmsr train|evaluate --drop-modality/--drop-ratio`, `mmsr evaluate --perturb`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli import robustness as R
from mmsr_cli.errors import MmsrError
from mmsr_cli.graphs import REL_HETERO, REL_SELF, GraphSplit, collate_histories
from mmsr_cli.models.base import DatasetInfo, ModalityInfo, ModelConfig
from mmsr_cli.models.sasrecf import SASRecF
from mmsr_cli.models.mmsr import MMSR
from mmsr_cli.workdir import DatasetDir

from conftest import run_cli
from test_training import N_TOY_ITEMS, make_coded_toy, one_error_line


def modality(name: str, codes: list[list[int]], n_codes: int = 3) -> ModalityInfo:
    return ModalityInfo(name, n_codes, 4, torch.randn(n_codes, 4), np.array(codes, dtype=np.int64))


# Items 0-3. Modality "pic" (codes 0-2, k = 2) and "words" (item 3 has none).
PIC = [[0, -1], [0, 1], [1, -1], [2, -1]]
WORDS = [[0], [1], [1], [-1]]


def nodes_of(batch, node_type: int) -> list[int]:
    return sorted(batch["node_ref"][batch["node_type"] == node_type].tolist())


def edges(batch) -> set[tuple]:
    key = list(zip(batch["node_type"].tolist(), batch["node_ref"].tolist()))
    src, dst = batch["edge_index"].tolist()
    return {(key[j], key[i], r) for j, i, r in zip(src, dst, batch["edge_rel"].tolist())}


def positions(batch, node: tuple) -> list[int]:
    ids = [n for n, k in enumerate(zip(batch["node_type"].tolist(), batch["node_ref"].tolist())) if k == node]
    return sorted(p for p, n in zip(batch["pos_index"].tolist(), batch["pos_node"].tolist()) if n in ids)


# ----------------------------------------------------------------------------------------------
# Node removal in MMSR's graphs


def test_dropped_items_lose_their_modality_nodes_and_everything_they_brought():
    """History 0, 1, 2: item 1 loses 'pic' -> its pic links, its pic positions and the pic
    transitions through it go; item 2 also loses it -> pic code 1 is linked by nobody and vanishes."""
    clean = collate_histories([[0, 1, 2]], [modality("pic", PIC), modality("words", WORDS)], 4)
    assert nodes_of(clean, 1) == [0, 1] and len(clean["node_type"]) == 3 + 2 + 2
    assert ((1, 0), (1, 1), 1) in edges(clean)  # pic transition 0 -> 1 (via item 1's codes)
    assert positions(clean, (1, 0)) == [1, 2]

    one = [list(r) for r in PIC]
    one[1] = [-1, -1]
    batch = collate_histories([[0, 1, 2]], [modality("pic", one), modality("words", WORDS)], 4)
    assert len(batch["node_type"]) == 7  # codes 0 and 1 are still linked by items 0 and 2
    het = {(a, b) for a, b, r in edges(batch) if r == REL_HETERO}
    assert ((0, 1), (1, 0)) not in het and ((0, 1), (1, 1)) not in het  # item 1 -/- its pic codes
    assert ((0, 0), (1, 0)) in het and ((0, 2), (1, 1)) in het
    assert ((0, 1), (2, 1)) in het  # its words code stays
    assert positions(batch, (1, 0)) == [2]  # only item 0 (position 2 from the end) is left
    assert not [e for e in edges(batch) if e[0][0] == 1 and e[1][0] == 1 and e[2] != REL_SELF]  # no pic transitions

    two = [list(r) for r in one]
    two[2] = [-1, -1]
    batch = collate_histories([[0, 1, 2]], [modality("pic", two), modality("words", WORDS)], 4)
    assert nodes_of(batch, 1) == [0]  # code 1 removed, not kept as a zero vector
    assert len(batch["node_type"]) == 6
    assert all(k != (1, 1) for e in edges(batch) for k in e[:2])
    # MMSR propagates over the smaller graph: one state per remaining node.
    info = DatasetInfo(4, 1, 5, [modality("pic", two), modality("words", WORDS)])
    model = MMSR(ModelConfig(dim=8, layers=1), info).eval()
    assert model.node_states(batch).shape == (6, 8)


def test_drop_share_is_exact_seeded_and_only_among_items_that_have_the_modality():
    codes = np.full((200, 2), -1)
    codes[:150, 0] = np.arange(150) % 7  # 150 items have the modality
    a = R.dropped_items(codes, 0.3, seed=1, name="pic")
    assert len(a) == 45 and len(set(a.tolist())) == 45 and a.max() < 150
    assert np.array_equal(a, R.dropped_items(codes, 0.3, seed=1, name="pic"))  # reproducible
    assert not np.array_equal(a, R.dropped_items(codes, 0.3, seed=2, name="pic"))
    assert not np.array_equal(a, R.dropped_items(codes, 0.3, seed=1, name="words"))  # per modality
    mods, counts = R.drop_modalities([modality("pic", codes, 7), modality("words", codes, 7)], ["pic"], 0.3, 1)
    assert counts == {"pic": 45}
    assert np.array_equal(np.nonzero((mods[0].item_codes >= 0).any(1))[0], np.setdiff1d(np.arange(150), a))
    assert mods[1].item_codes is not None and np.array_equal(mods[1].item_codes, codes)  # not selected


def test_selectors_by_kind_name_and_all():
    kinds = {"photo": "image", "title": "text", "meta": "text", "image": None}
    assert R.select_modalities("text", kinds) == ["title", "meta"]
    assert R.select_modalities("image", kinds) == ["photo", "image"]  # kind image, or named so
    assert R.select_modalities("all", kinds) == ["photo", "title", "meta", "image"]
    assert R.select_modalities("meta", kinds) == ["meta"]
    with pytest.raises(MmsrError, match=r"--drop-modality: unknown modality 'sound' \(the run's modalities: photo \(image\)"):
        R.select_modalities("sound", kinds)
    with pytest.raises(MmsrError, match="the run has no image modality"):
        R.select_modalities("image", {"title": "text"})


def test_sasrecf_channel_of_dropped_items_is_masked():
    torch.manual_seed(0)
    info = DatasetInfo(4, 1, 5, [modality("pic", PIC)])
    model = SASRecF(ModelConfig(model="sasrecf", dim=8, heads=2), info).eval()
    history = torch.tensor([[4, 4, 0, 1, 2]])
    batch = {"history": history, "lengths": torch.tensor([3]), "target": torch.tensor([3]), "user_idx": torch.tensor([0])}
    before = model.score(batch)
    assert bool(model.modality_channel(0, torch.tensor([1]))[1])
    dropped, _ = R.drop_modalities(info.modalities, ["pic"], 0.5, seed=3)  # 2 of the 4 items
    gone = np.nonzero((dropped[0].item_codes < 0).all(1))[0]
    assert len(gone) == 2
    model.set_item_codes(dropped)
    emb, available = model.modality_channel(0, torch.from_numpy(gone))
    assert not available.any() and torch.count_nonzero(emb) == 0
    # Same as a model built on data where those items never had the modality.
    fresh = SASRecF(ModelConfig(model="sasrecf", dim=8, heads=2), DatasetInfo(4, 1, 5, dropped)).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(model.score(batch), fresh.score(batch))
    assert gone.tolist() == [2, 3]  # item 2 is in the history: its scores change
    assert not torch.allclose(model.score(batch), before)


def test_disordered_keeps_each_history_s_items_and_is_seeded():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=50)
    ptr = np.concatenate([[0], np.cumsum(lengths)])
    flat = rng.integers(0, 30, size=ptr[-1])
    out = R.disorder_histories(flat, ptr, seed=4)
    for s in range(50):
        assert sorted(out[ptr[s] : ptr[s + 1]]) == sorted(flat[ptr[s] : ptr[s + 1]])
    assert not np.array_equal(out, flat)
    assert np.array_equal(out, R.disorder_histories(flat, ptr, seed=4))
    assert not np.array_equal(out, R.disorder_histories(flat, ptr, seed=5))


def test_mismatched_displaces_the_given_share_of_items_per_modality():
    n = 100
    codes = np.stack([np.arange(n), np.arange(n) + 1000], axis=1)  # every item's codes are unique
    codes[90:] = -1  # 90 items have the modality
    (pic,), counts = R.mismatch_modalities([modality("pic", codes, 2000)], 0.4, seed=0)
    changed = np.nonzero((pic.item_codes != codes).any(1))[0]
    assert counts == {"pic": 36} and len(changed) == 36 and changed.max() < 90
    # each displaced item holds the codes of another displaced item: a permutation of their codes
    assert sorted(map(tuple, pic.item_codes[changed])) == sorted(map(tuple, codes[changed]))
    again, _ = R.mismatch_modalities([modality("pic", codes, 2000)], 0.4, seed=0)
    assert np.array_equal(again[0].item_codes, pic.item_codes)


def test_setting_names_and_one_line_option_errors():
    assert R.Setting.from_options() is None
    assert R.Setting.from_options("text", 0.3).name == "drop-text-0.3"
    assert C.metrics_file("test", R.Setting.from_options("all", 0.5, seed=2).name) == "metrics_test_drop-all-0.5-s2.json"
    assert R.Setting.from_options(perturb="disordered").name == "disordered"
    assert R.Setting.from_options(perturb="mismatched").name == "mismatched-0.5"
    for args, message in [
        (("text", 0.0), "--drop-ratio: must be a number strictly between 0 and 1, got 0.0"),
        (("text", 1.0), "strictly between 0 and 1, got 1.0"),
        (("text", None), "--drop-modality text: needs --drop-ratio"),
        ((None, 0.2), "--drop-ratio: needs --drop-modality"),
        (("Bad Name", 0.2), "--drop-modality: 'Bad Name' is not image, text, all or a modality name"),
        ((None, None, "shuffled"), "--perturb: expected disordered or mismatched"),
        (("text", 0.2, "disordered"), "give either --drop-modality or --perturb"),
        ((None, None, "disordered", 0.3), "--perturb-ratio: only for --perturb mismatched"),
        ((None, None, None, 0.3), "--perturb-ratio: needs --perturb mismatched"),
        ((None, None, "mismatched", 2.0), "--perturb-ratio: must be a number strictly between 0 and 1"),
    ]:
        with pytest.raises(MmsrError, match=message.replace("(", r"\(").replace(")", r"\)")):
            R.Setting.from_options(*args)


# ----------------------------------------------------------------------------------------------
# Through the CLI: tiny runs on the toy chains with two hand-made code modalities


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> DatasetDir:
    ds = make_coded_toy(tmp_path_factory.mktemp("work"))
    common = ["train", "--workdir", ds.workdir, "--dataset", ds.name]
    small = ["--epochs", "1", "--max-steps", "2", "--dim", "8", "--layers", "1", "--batch-size", "32"]
    for args in (["--model", "mmsr", *small], ["--model", "sasrecf", "--heads", "2", *small], ["--model", "pop"]):
        r = run_cli([*common, *args])
        assert r.exit_code == 0, r.stderr
    return ds


def evaluate(ds: DatasetDir, *args):
    return run_cli(["evaluate", "--workdir", ds.workdir, "--dataset", ds.name, *args])


def metrics(ds: DatasetDir, run: str, name: str) -> dict:
    return json.loads(ds.path(f"{C.RUNS_DIR}/{run}/{name}").read_text())


def test_history_graphs_equal_the_stored_graphs_when_nothing_is_dropped(coded):
    from dataclasses import replace

    from mmsr_cli.inputs import HistoryGraphSplit, load_dataset

    bundle = load_dataset(coded, ModelConfig(model="mmsr"))
    stored = GraphSplit.open(coded, "test", modalities=list(bundle.model_config.modalities))
    built = replace(bundle, rebuild_graphs=True).open_split(coded, "test")
    assert isinstance(built, HistoryGraphSplit) and isinstance(bundle.open_split(coded, "test"), GraphSplit)
    idx = np.array([3, 0, 11, 7])
    a, b = stored.collate(idx), built.collate(idx)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_drop_and_perturb_write_separate_metrics_files(coded):
    assert evaluate(coded, "--run", "mmsr-loo-s0").exit_code == 0
    clean_bytes = coded.path("runs/mmsr-loo-s0/metrics_test.json").read_bytes()
    clean = json.loads(clean_bytes)
    assert "setting" not in clean
    layer = clean["gates"][0]  # MMSR with adaptive fusion: gate statistics per node type
    assert set(layer) == {"item", "image", "title"}
    assert layer["item"]["nodes"] > 0 and layer["item"]["hohe_share"] + layer["item"]["heho_share"] == pytest.approx(1)

    r = evaluate(coded, "--run", "mmsr-loo-s0", "--drop-modality", "text", "--drop-ratio", "0.5")
    assert r.exit_code == 0, r.stderr
    assert "metrics_test_drop-text-0.5.json" in r.stderr and "drop-text-0.5" in r.stdout
    rec = metrics(coded, "mmsr-loo-s0", "metrics_test_drop-text-0.5.json")
    assert rec["setting"] == {"name": "drop-text-0.5", "seed": 0, "drop_modality": "text", "drop_ratio": 0.5,
                              "dropped_items": {"title": 9}}  # half of the 17 items with codes, rounded
    # fewer title nodes met by the gates than in the clean evaluation; image untouched
    assert rec["gates"][0]["title"]["nodes"] < layer["title"]["nodes"]
    assert rec["gates"][0]["image"]["nodes"] == layer["image"]["nodes"]
    assert coded.path("runs/mmsr-loo-s0/metrics_test.json").read_bytes() == clean_bytes

    for args, name in [
        (["--perturb", "disordered"], "metrics_test_disordered.json"),
        (["--perturb", "mismatched", "--perturb-ratio", "0.3", "--seed", "2"], "metrics_test_mismatched-0.3-s2.json"),
    ]:
        for run in ("mmsr-loo-s0", "sasrecf-loo-s0"):
            r = evaluate(coded, "--run", run, *args)
            assert r.exit_code == 0, r.stderr
            assert metrics(coded, run, name)["n"] == clean["n"]
    assert metrics(coded, "sasrecf-loo-s0", "metrics_test_mismatched-0.3-s2.json")["setting"]["displaced_items"] == {
        "image": 5, "title": 5}
    # Pop ignores histories: disordered is fine and changes nothing; mismatched has nothing to displace
    assert evaluate(coded, "--run", "pop-loo-s0").exit_code == 0
    assert evaluate(coded, "--run", "pop-loo-s0", "--perturb", "disordered").exit_code == 0
    assert metrics(coded, "pop-loo-s0", "metrics_test_disordered.json")["metrics"] == metrics(coded, "pop-loo-s0", "metrics_test.json")["metrics"]
    r = evaluate(coded, "--run", "pop-loo-s0", "--perturb", "mismatched")
    assert "--perturb mismatched: model pop reads no modality codes" in one_error_line(r)


def test_sasrecf_drop_masks_the_channel_at_evaluation(coded):
    r = evaluate(coded, "--run", "sasrecf-loo-s0", "--drop-modality", "all", "--drop-ratio", "0.9")
    assert r.exit_code == 0, r.stderr
    rec = metrics(coded, "sasrecf-loo-s0", "metrics_test_drop-all-0.9.json")
    assert rec["setting"]["dropped_items"] == {"image": 15, "title": 15}
    assert "gates" not in rec


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--drop-modality", "text", "--drop-ratio", "0"], "--drop-ratio: must be a number strictly between 0 and 1, got 0.0"),
        (["--drop-modality", "text", "--drop-ratio", "1.5"], "strictly between 0 and 1, got 1.5"),
        (["--drop-modality", "sound", "--drop-ratio", "0.3"], "--drop-modality: unknown modality 'sound' (the run's modalities: image (image), title (text))"),
        (["--drop-ratio", "0.3"], "--drop-ratio: needs --drop-modality"),
        (["--perturb", "mismatched", "--drop-modality", "text", "--drop-ratio", "0.3"], "give either --drop-modality or --perturb"),
    ],
)
def test_evaluate_bad_robustness_options(coded, args, expected):
    before = sorted(p.name for p in coded.path("runs/mmsr-loo-s0").iterdir())
    assert expected in one_error_line(evaluate(coded, "--run", "mmsr-loo-s0", *args))
    assert sorted(p.name for p in coded.path("runs/mmsr-loo-s0").iterdir()) == before


def test_train_with_dropped_modalities_records_and_reapplies_the_drop(coded):
    base = ["train", "--workdir", coded.workdir, "--dataset", coded.name, "--epochs", "1", "--max-steps", "2",
            "--dim", "8", "--layers", "1", "--batch-size", "32", "--model", "mmsr"]
    r = run_cli([*base, "--drop-modality", "image", "--drop-ratio", "0.5", "--seed", "1"])
    assert r.exit_code == 0, r.stderr
    run = "mmsr-loo-drop-image-0.5-s1"
    config = json.loads(coded.path(f"runs/{run}/config.json").read_text())
    assert config["train"]["drop_modality"] == "image" and config["train"]["drop_ratio"] == 0.5
    assert config["codes"]["image"]["codes_mode"] == "clusters" and config["codes"]["image"]["top_k"] == 1
    assert evaluate(coded, "--run", run).exit_code == 0
    gates = metrics(coded, run, "metrics_test.json")["gates"][0]
    clean = metrics(coded, "mmsr-loo-s0", "metrics_test.json")["gates"][0]
    assert gates["image"]["nodes"] < clean["image"]["nodes"] and gates["title"]["nodes"] == clean["title"]["nodes"]
    assert "--drop-modality: model sasrec reads no modality codes" in one_error_line(
        run_cli([*base[:-1], "sasrec", "--drop-modality", "text", "--drop-ratio", "0.2"]))
    assert "--drop-ratio: needs --drop-modality" in one_error_line(run_cli([*base, "--drop-ratio", "0.2"]))


# ----------------------------------------------------------------------------------------------
# The settings change what is scored: `evaluate`'s ranks equal those of a hand-perturbed input
# and differ from the clean ranks (an evaluate that records a setting but scores clean data fails)


class HandGraphs:
    """The test split as per-batch MSGraphs of ``histories`` under ``modalities`` (build-graphs'
    construction, graphs.collate_histories), built here rather than by inputs.GraphInput.open_split."""

    def __init__(self, samples, modalities, info):
        self.samples, self.modalities, self.info = samples, modalities, info

    def __len__(self) -> int:
        return len(self.samples)

    def collate(self, idx):
        s = self.samples
        return collate_histories([s.flat[s.ptr[r] : s.ptr[r + 1]] for r in idx], self.modalities, self.info.n_items,
                                 max_len=self.info.max_len, target=s.target[idx], user_idx=s.user_idx[idx])


def hand_ranks(ds: DatasetDir, run: str, modalities=None, flat=None) -> np.ndarray:
    """Test ranks of ``run`` scored on the clean samples with the histories replaced by ``flat``
    and/or the item codes replaced by ``modalities``."""
    from dataclasses import replace

    from mmsr_cli.data import SequenceSplit
    from mmsr_cli.evaluation import evaluate_split
    from mmsr_cli.models import build_model
    from mmsr_cli.runs import load_run

    loaded = load_run(ds, run, "best", torch.device("cpu"))
    info = loaded.bundle.info
    samples = SequenceSplit.open(ds, "test", info.max_len, info.n_items)
    if flat is not None:
        samples = replace(samples, flat=flat)
    model, data = loaded.model, samples
    if modalities is not None and model.input_kind == "sequence":  # code channels read the codes at build
        model = build_model(loaded.model_config, replace(info, modalities=modalities))
        model.load_state_dict(loaded.model.state_dict())
    if model.input_kind == "graph":
        data = HandGraphs(samples, info.modalities if modalities is None else modalities, info)
    ranks: list[torch.Tensor] = []
    evaluate_split(model, data, 1000, torch.device("cpu"), ranks=ranks)
    return torch.cat(ranks).numpy()


def stored_ranks(ds: DatasetDir, run: str, setting: str = "") -> np.ndarray:
    from mmsr_cli.significance import read_ranks

    return read_ranks(ds.path(f"{C.RUNS_DIR}/{run}/{C.ranks_file('test', setting)}"))


@pytest.mark.parametrize("run", ["mmsr-loo-s0", "sasrecf-loo-s0"])
def test_perturbed_and_dropped_evaluations_score_the_perturbed_inputs(coded, run):
    from mmsr_cli.data import SequenceSplit
    from mmsr_cli.runs import load_run

    assert evaluate(coded, "--run", run).exit_code == 0
    clean = stored_ranks(coded, run)
    assert np.array_equal(clean, hand_ranks(coded, run))  # the hand path reproduces the clean evaluation
    info = load_run(coded, run, "best", torch.device("cpu")).bundle.info
    samples = SequenceSplit.open(coded, "test", info.max_len, info.n_items)

    cases = [
        # Figure 1: every history shuffled (seed 0), the item codes untouched
        (["--perturb", "disordered"], "disordered", dict(flat=R.disorder_histories(samples.flat, samples.ptr, seed=0))),
        # Figure 1: 30 % of each modality's items swap their codes (seed 2)
        (["--perturb", "mismatched", "--perturb-ratio", "0.3", "--seed", "2"], "mismatched-0.3-s2",
         dict(modalities=R.mismatch_modalities(info.modalities, 0.3, seed=2)[0])),
        # Figure 4: 90 % of the items lose both modalities (seed 0)
        (["--drop-modality", "all", "--drop-ratio", "0.9"], "drop-all-0.9",
         dict(modalities=R.drop_modalities(info.modalities, ["image", "title"], 0.9, seed=0)[0])),
    ]
    for args, setting, change in cases:
        r = evaluate(coded, "--run", run, *args)
        assert r.exit_code == 0, r.stderr
        got = stored_ranks(coded, run, setting)
        assert np.array_equal(got, hand_ranks(coded, run, **change)), setting
        assert not np.array_equal(got, clean), f"{setting}: the same ranks as the clean evaluation"
        # the metrics file holds the means of these ranks
        rec = metrics(coded, run, C.metrics_file("test", setting))
        assert rec["metrics"]["hr@10"] == pytest.approx(np.mean(got <= 10), abs=1e-12)
        assert rec["metrics"]["mrr@20"] == pytest.approx(np.mean(np.where(got <= 20, 1 / got, 0)), abs=1e-12)
