"""The CLI shell: config files, one-line errors, exit codes (mmsr_cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import pytest
import typer

from mmsr_cli import app as app_module
from mmsr_cli.app import ConfigOpt, DatasetOpt, WorkdirOpt, parse_list
from mmsr_cli.errors import MmsrError


@pytest.fixture
def probe_command():
    """Register a throw-away command that echoes its options, then remove it."""
    seen = {}

    @app_module.app.command("probe-options")
    def probe(
        dataset: DatasetOpt = "demo",
        workdir: WorkdirOpt = None,
        lr: Annotated[float, typer.Option("--lr")] = 0.1,
        layers: Annotated[int, typer.Option("--layers")] = 1,
        names: Annotated[str, typer.Option("--names")] = "a",
        fail: Annotated[bool, typer.Option("--fail")] = False,
        config: ConfigOpt = None,
    ):
        if fail:
            raise MmsrError("items.jsonl:3: field 'asin' missing")
        seen.update(dataset=dataset, lr=lr, layers=layers, names=names, workdir=workdir)

    yield seen
    app_module.app.registered_commands = [
        c for c in app_module.app.registered_commands if c.name != "probe-options"
    ]


def test_config_file_sets_defaults_and_flags_win(cli, probe_command, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('dataset = "beauty"\n[probe-options]\nlr = 0.01\nlayers = 3\nnames = ["x", "y"]\n')
    r = cli(["probe-options", "--config", cfg, "--layers", "4"])
    assert r.exit_code == 0, r.stderr
    assert probe_command == {**probe_command, "dataset": "beauty", "lr": 0.01, "layers": 4, "names": "x,y"}


def test_config_unknown_key_is_one_line_error(cli, probe_command, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[probe-options]\nlrr = 0.01\n")
    r = cli(["probe-options", "--config", cfg])
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown option 'lrr'" in r.stderr


def test_config_missing_and_invalid_files(cli, probe_command, tmp_path):
    r = cli(["probe-options", "--config", tmp_path / "nope.toml"])
    assert r.exit_code == 2 and "nope.toml: file not found" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [")
    r = cli(["probe-options", "--config", bad])
    assert r.exit_code == 2 and "bad.toml: not valid TOML" in r.stderr


def test_workdir_from_environment(cli, probe_command, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSR_WORKDIR", str(tmp_path / "wd"))
    assert cli(["probe-options"]).exit_code == 0
    assert str(probe_command["workdir"]) == str(tmp_path / "wd")


def test_errors_are_one_line_without_traceback(cli, probe_command):
    r = cli(["probe-options", "--fail"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "mmsr: error: items.jsonl:3: field 'asin' missing"
    r = cli(["probe-options", "--lr", "fast"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = cli(["no-such-command"])
    assert r.exit_code == 2 and "No such command" in r.stderr


def test_version(cli):
    r = cli(["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("mmsr ")


def test_parse_list():
    assert parse_list("a, b", "--x") == ["a", "b"]
    assert parse_list(None, "--x") == []
    with pytest.raises(MmsrError, match="--x"):
        parse_list("a,,b", "--x")
