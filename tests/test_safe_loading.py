"""Nothing in a workdir is unpickled: checkpoints and tensors load with ``weights_only=True``.

A source scan over ``mmsr_cli/`` refuses ``torch.load`` without ``weights_only=True``,
``np.load(allow_pickle=True)``, the pickle family of modules and builtin ``eval``/``exec``; and
crafted checkpoints whose unpickling would run code are refused with one line (or, for a
resumable features chunk, recomputed) without running it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsr_cli import contracts as C
from mmsr_cli.features import FeatureOptions, run

from conftest import one_error_line

from test_features import make_items
from test_training import make_toy

PACKAGE = Path(__file__).resolve().parents[1] / "mmsr_cli"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Places in ``source`` that could unpickle (or evaluate) data, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            constant = lambda key: getattr(kwargs.get(key), "value", None)  # noqa: E731
            if owner == "torch" and name == "load" and constant("weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load" and "allow_pickle" in kwargs and constant("allow_pickle") is not False:
                found.append(f"{where}: np.load with allow_pickle")
            if name in ("read_pickle", "load_pickle") or (owner == "jit" and name == "load"):
                found.append(f"{where}: {name}")
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{where}: builtin {func.id}")
    return found


def test_the_scan_finds_each_unsafe_pattern():
    bad = """
import pickle
from joblib import load
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
pd.read_pickle(path)
eval(text)
"""
    assert len(unsafe_loads(bad)) == 7
    good = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, mmap_mode='r')\nast.literal_eval(t)\nm.eval()\n"
    assert unsafe_loads(good) == []


def test_mmsr_cli_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert found == []


# ----------------------------------------------------------------------------------------------
# Crafted checkpoints


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a torch checkpoint that runs code when fully unpickled."""
    torch.save({"model": {"weight": torch.zeros(2)}, "x": Payload(marker)}, path)


def test_the_payload_is_live_without_weights_only(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()  # so the refusals below are refusals of working exploits


@pytest.mark.parametrize("checkpoint", ["best.pt", "last.pt"])
def test_crafted_run_checkpoints_are_refused_in_one_line(cli, tmp_path, checkpoint):
    ds = make_toy(tmp_path)
    common = ["--workdir", ds.workdir, "--dataset", ds.name]
    assert cli(["train", *common, "--model", "pop"]).exit_code == 0
    path = ds.path(f"{C.RUNS_DIR}/pop-loo-s0/{checkpoint}")
    marker = tmp_path / "ran"
    plant(path, marker)
    if checkpoint == "best.pt":
        r = cli(["evaluate", *common, "--run", "pop-loo-s0"])
    else:  # a resumed train reads last.pt
        r = cli(["train", *common, "--model", "pop"])
    line = one_error_line(r)
    assert f"{path}: not a readable checkpoint (UnpicklingError" in line
    assert not marker.exists()


def test_a_crafted_features_chunk_is_recomputed_not_run(cli, tmp_path):
    folder = tmp_path / "toy" / "raw" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    rows = [{"image_path": f"raw/images/{i}.png"} for i in range(4)]
    ds = make_items(tmp_path, rows)
    opts = dict(modality="image", model="mobilenet_v3_small", weights="none", chunk_size=2, batch_size=2, workers=1)

    class Stop(Exception):
        pass

    def stop(ci):
        raise Stop

    with pytest.raises(Stop):
        run(ds, FeatureOptions(**opts), on_chunk=stop)
    chunk = ds.path(f"{C.FEATURES_DIR}/image.partial/chunk_00000.pt")
    assert chunk.exists()
    marker = tmp_path / "ran"
    plant(chunk, marker)
    result = run(ds, FeatureOptions(**opts))
    assert result.resumed_chunks == 0 and result.n_computed == 4 and not marker.exists()

    clean = make_items(tmp_path, rows, "clean")
    shutil.copytree(ds.path(C.RAW_DIR), clean.path(C.RAW_DIR))
    run(clean, FeatureOptions(**opts))
    a = torch.load(ds.path(C.features_tensor_file("image")), weights_only=True)
    b = torch.load(clean.path(C.features_tensor_file("image")), weights_only=True)
    assert torch.equal(a["features"], b["features"])


def test_a_crafted_codes_file_is_refused(tmp_path):
    """evaluate/recommend load a run without re-hashing its inputs (verify=False): the codes
    tensor is read with weights_only=True, and a crafted one is refused."""
    from mmsr_cli.codes import _load_centres_file
    from mmsr_cli.errors import MmsrError

    marker = tmp_path / "ran"
    path = tmp_path / "codes.pt"
    plant(path, marker)
    with pytest.raises(MmsrError, match=r"codes.pt: not a readable codes tensor file \(UnpicklingError"):
        _load_centres_file(path)
    assert not marker.exists()
