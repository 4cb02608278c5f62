"""`mmsr tune`: a validation-driven hyper-parameter search with Optuna.

A study searches one model's space (space.py: the paper's ranges, the model's own options,
a TOML file's narrowing) on one dataset, with fixed training options (epochs, patience, seed,
metric). It lives in ``<dataset>/tune/studies.sqlite3`` (Optuna's RDB storage), so that:

* every trial is an ordinary run, ``runs/tune-<study>-t<NNN>/`` (config, checkpoints, history),
  trained by ``training.train``; it reports its best validation metric so far after each epoch
  and the median pruner stops trials below the median of earlier ones at the same epoch (from
  epoch ``prune_after`` on; 0 turns pruning off);
* trial 0 of a new study runs the defaults of `mmsr train` (where the space holds them);
* a killed `tune` resumes where it stopped: a trial whose process died stops beating (Optuna's
  heartbeat), is marked failed and queued again with the same options, and the retry continues its
  run from ``last.pt``; ``--trials N`` counts the study's finished trials (complete, pruned, or
  ended by an error such as a diverging loss), so no trial is lost or counted twice;
* a trial whose process was only silent (stopped, as by SIGSTOP or a suspended shell, or starved
  past the grace period) and is still alive holds its run's lock: the retry waits for that lock
  rather than fail, and the silent process, once it runs again, finds its trial failed at its next
  report and lets go of the run, which the retry then continues from ``last.pt``;
* two `tune` processes on one study share the work: a file lock makes "count the trials, start
  one" a single step, so together they run N trials;
* it writes the best trial's options as ``tune/<study>.toml``, which `mmsr train --config` takes.
  They come from the study's settings and the trial's parameters, not from the trial's run
  folder, so a study keeps its results when trial runs are deleted (their checkpoints are most
  of its disk) or the storage file is carried to another workdir; a trial that died there
  starts again from its first epoch where its ``last.pt`` is gone.

Only the train and valid splits are read: trials are chosen, pruned and ranked on validation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import contracts as C
from .errors import MmsrError
from .inputs import load_dataset
from .models import fields_not_read
from .runs import TrainConfig, default_run_name
from . import space as S
from .training import train
from .workdir import DatasetDir, LockHeldError, full_disk_as_error, write_bytes_atomic

HEARTBEAT_SECONDS = 10  # a running trial records a heartbeat this often
GRACE_SECONDS = 30  # ... and is taken as dead (killed) when silent this long
STARTUP_TRIALS = 5  # TPE samples at random until this many trials have finished
PRUNE_AFTER_TRIALS = 3  # the median pruner waits for this many finished trials ...
PRUNE_AFTER_EPOCHS = 2  # ... and, by default, prunes a trial from this epoch on


@dataclass
class TuneSettings:
    """What identifies a study besides its name; a resumed study must be given the same."""

    model: str
    epochs: int
    patience: int
    seed: int
    metric: str
    space: dict[str, Any]  # option -> Range | Choice | fixed value
    prune_after: int = PRUNE_AFTER_EPOCHS  # first epoch the median pruner may stop a trial; 0: never

    def record(self) -> dict:
        return {**asdict(self), "space": {k: S.describe(v) for k, v in sorted(self.space.items())}}

    def pruner(self):
        optuna = _optuna()
        if self.prune_after == 0:
            return optuna.pruners.NopPruner()
        # Optuna's first prunable step is n_warmup_steps; a trial reports epochs 1, 2, ... as steps
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=self.prune_after)


@dataclass
class TrialRow:
    number: int
    state: str  # complete, pruned, error, killed, running, waiting
    value: float | None
    epochs: int | None
    run: str
    params: dict[str, Any]
    note: str = ""


@dataclass
class TuneResult:
    study: str
    metric: str
    trials: list[TrialRow]
    finished: int
    best: TrialRow | None
    defaults: TrialRow | None  # trial 0, the defaults of `mmsr train`
    config_file: Path | None
    seconds: float
    searched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.best is None:
            return f"study {self.study}: {self.finished} finished trial(s), none completed; no config written"
        default = f", defaults {self.defaults.value:.4f}" if self.defaults and self.defaults.value is not None else ""
        return (f"study {self.study}: {self.finished} finished trial(s) in {self.seconds:.0f} s; best valid {self.metric} "
                f"{self.best.value:.4f} (trial {self.best.number}, run {self.best.run}){default} -> {self.config_file}")


def parse_timeout(value: str | None) -> float | None:
    """``90``, ``90s``, ``30m``, ``2h`` -> seconds (None: no limit)."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value)
    if not match or float(match.group(1)) <= 0:
        raise MmsrError(f"--timeout: expected a positive duration such as 600, 600s, 30m or 2h, got {value!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def default_study_name(ds: DatasetDir, model: str, seed: int) -> str:
    return default_run_name(ds, TrainConfig(model=model, seed=seed))


class _StudyLock:
    """An exclusive lock on the study (a file beside the storage): released by the trial once it
    exists in the storage, so that counting trials and starting one is a single step."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _optuna():
    try:
        # optuna: only for `mmsr tune`
        import optuna
    except ImportError as e:
        raise MmsrError(f"mmsr tune needs Optuna: pip install optuna ({e})") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()  # trial failures are reported in one line, by us
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_study(ds: DatasetDir, name: str, settings: TuneSettings):
    """The study ``name`` of the dataset's storage; created with ``settings`` (and trial 0 queued
    with the defaults) or checked against them."""
    optuna = _optuna()
    # optuna: only for `mmsr tune`
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if not C.DATASET_NAME_RE.match(name):
        raise MmsrError(f"--study: invalid name {name!r} (letters, digits, '.', '_' and '-')")
    path = ds.path(C.TUNE_STORAGE)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = RDBStorage(
        f"sqlite:///{path}",
        engine_kwargs={"connect_args": {"timeout": 60}},
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
    )
    lock = _StudyLock(path.with_suffix(".lock"))
    lock.acquire()
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=settings.pruner(),
                                    load_if_exists=True)
        record = settings.record()
        old = study.user_attrs.get("settings")
        if old is not None and "prune_after" not in old:  # a study from before --prune-after pruned from epoch 2
            old = {**old, "prune_after": PRUNE_AFTER_EPOCHS}
        if old is None:
            study.set_user_attr("settings", record)
            defaults = _defaults_in(S.searched(settings.space), settings.model)
            study.enqueue_trial(defaults, user_attrs={"defaults": True})
        elif old != record:
            key = next(k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k))
            raise MmsrError(f"--study {name}: the study exists with another {key} ({json.dumps(old.get(key))}); "
                            f"give it the same options or another --study")
        return study, lock
    finally:
        lock.release()


def _defaults_in(space: dict, model: str) -> dict[str, Any]:
    """`mmsr train`'s default of each searched option that its range or choices hold."""
    tc, mc = S.configs({}, model)
    defaults = {**asdict(tc), **asdict(mc)}
    out = {}
    for name, param in space.items():
        value = defaults[name]
        if (isinstance(param, S.Choice) and value in param.values) or (
                isinstance(param, S.Range) and param.low <= value <= param.high):
            out[name] = value
    return out


def trial_options(space: dict, params: dict[str, Any]) -> dict[str, Any]:
    """The options a trial trains with: the space's fixed ones and the trial's ``params``, a
    stepped float as the search drew it (0.30000000000000004 -> 0.3, as :func:`_suggest` returns it)."""
    searched = S.searched(space)
    drawn = {k: round(v, 12) if isinstance(searched.get(k), S.Range) and searched[k].step and isinstance(v, float) else v
             for k, v in params.items()}
    return {**S.fixed(space), **drawn}


def _suggest(trial, name: str, param) -> Any:
    if isinstance(param, S.Choice):
        return trial.suggest_categorical(name, list(param.values))
    if S.option_type(name) is int:
        return trial.suggest_int(name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    value = trial.suggest_float(name, float(param.low), float(param.high), step=param.step, log=param.log)
    return round(value, 12) if param.step else value  # 0.30000000000000004 -> 0.3


def tune(
    ds: DatasetDir,
    settings: TuneSettings,
    trials: int,
    *,
    study_name: str | None = None,
    timeout: float | None = None,
    device: str = "auto",
    on_trial: Callable[[TrialRow], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run the study until it has ``trials`` finished trials (or ``timeout`` seconds have passed:
    no trial starts after that), then write the best options; see the module docstring. ``on_trial``
    sees each trial this process ends, ``on_note`` a line when a retry waits for a live holder of its
    run or this process's trial was taken over by a retry. A full
    disk (however SQLite words it) is the one-line error; a storage it left half set up is removed."""
    C.RANGE_TRIALS.check("--trials", trials)
    C.RANGE_PRUNE_AFTER.check("--prune-after", settings.prune_after)
    S.check_space(settings.space, settings.model, where="--space")
    if not S.searched(settings.space):
        raise MmsrError("--space: no option is searched (every entry is fixed)")
    base_tc, base_mc = S.configs(S.fixed(settings.space), settings.model, epochs=settings.epochs,
                                 patience=settings.patience, seed=settings.seed, metric=settings.metric, device=device)
    load_dataset(ds, base_mc)  # a missing or stale stage is one error now, not one per trial
    name = study_name or default_study_name(ds, settings.model, settings.seed)
    storage = ds.path(C.TUNE_STORAGE)
    created = [p for p in (storage.parent, storage, storage.with_suffix(".lock")) if not p.exists()]
    opened: list[bool] = []
    try:
        # SQLite says "database or disk is full" without an errno: the free space tells (workdir)
        with full_disk_as_error(storage):
            return _tune(ds, settings, trials, name, timeout, device, on_trial, on_note or (lambda line: None), opened)
    except MmsrError as e:
        if "no space left on device" in str(e) and not opened:  # a storage it could not even set up: removed
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
        raise


def _tune(ds: DatasetDir, settings: TuneSettings, trials: int, name: str, timeout: float | None, device: str,
          on_trial: Callable[[TrialRow], None] | None, on_note: Callable[[str], None], opened: list[bool]) -> TuneResult:
    optuna = _optuna()
    study, lock = open_study(ds, name, settings)
    opened.append(True)
    t0 = time.perf_counter()
    deadline = None if timeout is None else t0 + timeout

    ran: list[int] = []  # the trial this process is running

    def objective(trial) -> float:
        lock.release()  # the trial exists: other processes may count it now
        ran.append(trial.number)
        run = trial.user_attrs.get("run")  # set: a retry of a killed trial, which resumes its run
        resume = run is not None
        if run is None:
            run = f"tune-{name}-t{trial.number:03d}"
            trial.set_user_attr("run", run)
        options = trial_options(settings.space, {k: _suggest(trial, k, p) for k, p in S.searched(settings.space).items()})
        best = -math.inf

        def on_epoch(row: dict) -> None:
            nonlocal best
            best = max(best, row["valid"][settings.metric])
            trial.report(best, row["epoch"])
            trial.set_user_attr("epochs", row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}")

        try:
            tc, mc = S.configs(options, settings.model, run_name=run, epochs=settings.epochs, patience=settings.patience,
                               seed=settings.seed, metric=settings.metric, device=device)
            waited = False
            while True:
                try:
                    result = train(ds, tc, mc, resume=resume, on_epoch=on_epoch)
                    break
                except LockHeldError as e:
                    if not resume:
                        raise
                    # The "dead" trial's process lives (it was stopped, not killed) and holds the run:
                    # it lets go at its next report (see below) or when it dies; this trial beats meanwhile.
                    if not waited:
                        on_note(f"trial {trial.number} (a retry) waits for its run: {e}")
                        waited = True
                    time.sleep(HEARTBEAT_SECONDS)
        except MmsrError as e:
            trial.set_user_attr("error", str(e))
            raise
        return result.best_valid[settings.metric]

    while True:
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # killed trials -> failed, queued again
            states = [_state(t) for t in study.get_trials(deepcopy=False)]
            finished, running = sum(s in FINISHED for s in states), states.count("running")
            if finished >= trials or (deadline is not None and time.perf_counter() > deadline):
                break
            if finished + running >= trials:  # the rest is running, here or elsewhere (or dead)
                lock.release()
                time.sleep(HEARTBEAT_SECONDS)
                continue
            # seeded by the trial's number: a resumed or second process draws other options
            study.sampler = optuna.samplers.TPESampler(
                n_startup_trials=STARTUP_TRIALS, seed=int(np.random.SeedSequence([settings.seed, len(states)]).generate_state(1)[0]))
            try:
                study.optimize(objective, n_trials=1, catch=(MmsrError,))
            except ValueError:
                # Another process failed this trial as silent and queued its retry: the trial's report
                # raised, and Optuna's final tell refuses a finished trial ("Cannot tell a FAIL trial").
                # The run is the retry's now; nothing is lost.
                taken = _trial(study, ran[-1]) if ran else None
                if taken is None or _state(taken) != "killed":
                    raise
                on_note(f"trial {taken.number} was taken over by its retry (this process was silent for over "
                        f"{GRACE_SECONDS} s); the retry continues run {taken.user_attrs.get('run')}")
                ran.clear()
        finally:
            lock.release()
        if ran and on_trial is not None:
            on_trial(next(r for r in trial_rows(study) if r.number == ran[-1]))
            ran.clear()
    return finish(ds, study, name, settings, time.perf_counter() - t0)


FINISHED = ("complete", "pruned", "error")


def _trial(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _state(t) -> str:
    state = t.state.name.lower()
    if state == "fail":
        return "error" if "error" in t.user_attrs else "killed"
    return state


def trial_rows(study) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = _state(t)
        note = t.user_attrs.get("error", "")
        if state == "killed":
            note = "process died; queued again"
        elif t.user_attrs.get("defaults"):
            note = "defaults"
        rows.append(TrialRow(t.number, state, t.value if t.value is not None else _last(t), t.user_attrs.get("epochs"),
                             t.user_attrs.get("run", ""), dict(t.params), note))
    return rows


def _last(t) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def finish(ds: DatasetDir, study, name: str, settings: TuneSettings, seconds: float) -> TuneResult:
    """The trials table and the best trial's config file."""
    rows = trial_rows(study)
    complete = [r for r in rows if r.state == "complete"]
    best = max(complete, key=lambda r: (r.value, -r.number)) if complete else None
    defaults = next((r for r in rows if r.note == "defaults" and r.state == "complete"), None)
    path = None
    if best is not None:
        path = ds.path(C.tune_config_file(name))
        write_bytes_atomic(path, best_config_toml(ds, name, settings, best).encode())
    searched = sorted({k for r in rows for k in r.params})
    return TuneResult(name, settings.metric, rows, sum(r.state in FINISHED for r in rows), best, defaults, path,
                      seconds, searched)


def best_config_toml(ds: DatasetDir, name: str, settings: TuneSettings, best: TrialRow) -> str:
    """A config file for `mmsr train --config`: the study's fixed options and the best trial's,
    with its epoch budget, seed and metric (built as the trial's own options were)."""
    tc, mc = S.configs(trial_options(settings.space, best.params), settings.model, epochs=settings.epochs,
                       patience=settings.patience, seed=settings.seed, metric=settings.metric)
    train, model = asdict(tc), asdict(mc)
    options = {"model": settings.model}
    for key in ("epochs", "patience", "seed", "metric", *S.TRAIN_OPTIONS):
        options[key] = train[key]
    for key in S.MODEL_OPTIONS:
        options[key] = model[key]
    ignored = set(fields_not_read(settings.model))
    lines = [f"# mmsr tune: best trial of study {name} on dataset {ds.name}: trial {best.number} (run {best.run}),",
             f"# valid {settings.metric} {best.value:.6f}. Train with: mmsr train --config <this file>",
             f"dataset = {json.dumps(ds.name)}", "", "[train]"]
    for key, value in options.items():
        if key not in ignored:
            lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)
