"""Hyper-parameter search spaces (`mmsr tune`): the paper's ranges, each model's own options, and
TOML files that narrow or replace them.

A space maps an option (a TrainConfig or ModelConfig field that `mmsr train` takes) to a
:class:`Range`, a :class:`Choice` or a fixed value. :data:`PAPER_SPACE` holds the ranges of the
paper's section 5.1 that every trained model shares (learning rate, L2 weight decay, dropout,
layers) plus the batch sizes; a model drops the options it does not read
(``models.fields_not_read``) and adds its own through its class attribute ``search_space``, written
next to its code (MMSR: ``search_space = {"fusion": (...)}``), where a tuple or list means a
:class:`Choice`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

from .errors import MmsrError
from .models import check_model_config, fields_not_read, model_class
from .models.base import ModelConfig
from .runs import TrainConfig
from .workdir import read_file_text


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (both included); integers for integer options; ``log``
    samples on a log scale; ``step`` restricts to low, low + step, ..."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Choice:
    values: tuple


Param = Union[Range, Choice, bool, int, float, str]  # a plain value: fixed, not searched

PAPER_SPACE: dict[str, Param] = {
    "lr": Range(1e-4, 1e-2, log=True),
    "weight_decay": Choice((0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
    "dropout": Range(0.0, 0.5, step=0.1),
    "layers": Range(1, 4),
    "batch_size": Choice((128, 256, 512)),
}

# Options a space may hold: TrainConfig fields first, then ModelConfig fields (`mmsr train` names).
TRAIN_OPTIONS = ("lr", "weight_decay", "clip_norm", "batch_size")
MODEL_OPTIONS = (
    "dim", "layers", "heads", "dropout", "fusion", "aggregator", "feed_forward", "invasive", "variant", "attention_dropout",
    "readout",
)


def option_type(name: str) -> type:
    """bool, int, float or str: the type of the option's default value."""
    return type(getattr(TrainConfig() if name in TRAIN_OPTIONS else ModelConfig(), name))


def as_param(value: Any) -> Param:
    """A model's ``search_space`` entry as a Param: tuples and lists become a Choice."""
    return Choice(tuple(value)) if isinstance(value, (tuple, list)) else value


def model_space(model: str) -> dict[str, Param]:
    """The search space of ``model``: the paper's shared ranges of the options it reads, then its
    class's own ``search_space`` entries."""
    ignored = set(fields_not_read(model))
    if "lr" in ignored:
        raise MmsrError(f"--model {model}: has no trained parameters, nothing to tune")
    space = {k: v for k, v in PAPER_SPACE.items() if k not in ignored}
    space.update({k: as_param(v) for k, v in model_class(model).search_space.items()})
    return space


def searched(space: dict[str, Param]) -> dict[str, Range | Choice]:
    return {k: v for k, v in space.items() if isinstance(v, (Range, Choice))}


def fixed(space: dict[str, Param]) -> dict[str, Any]:
    return {k: v for k, v in space.items() if not isinstance(v, (Range, Choice))}


# ----------------------------------------------------------------------------------------------
# TOML files


def read_space_file(path: Path, model: str, base: dict[str, Param]) -> dict[str, Param]:
    """``base`` narrowed by a TOML file: each entry replaces the option's entry (a table
    ``{low, high, log, step}`` is a Range, a list a Choice, a plain value fixes the option), other
    options keep theirs; with ``replace = true`` at the top the file's entries are the whole space.
    Errors name the file and the field."""
    try:
        data = tomllib.loads(read_file_text(Path(path)))
    except FileNotFoundError:
        raise MmsrError(f"{path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MmsrError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise MmsrError(f"{path}: cannot read ({e.strerror or e})") from None
    replace = data.pop("replace", False)
    if not isinstance(replace, bool):
        raise MmsrError(f"{path}: field 'replace': expected true or false, got {replace!r}")
    ignored = set(fields_not_read(model))
    space = {} if replace else dict(base)
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in TRAIN_OPTIONS + MODEL_OPTIONS:
            raise MmsrError(f"{path}: field '{key}': not a tunable option (one of "
                            f"{', '.join(TRAIN_OPTIONS + MODEL_OPTIONS)})")
        if name in ignored:
            raise MmsrError(f"{path}: field '{key}': not used by model {model}")
        space[name] = _param_from_toml(path, key, name, value)
    check_space(space, model, where=str(path))
    return space


def _param_from_toml(path: Path, key: str, name: str, value: Any) -> Param:
    kind = option_type(name)
    if isinstance(value, list):
        if not value:
            raise MmsrError(f"{path}: field '{key}': an empty list of choices")
        return Choice(tuple(_typed(path, key, kind, v) for v in value))
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(value):
            raise MmsrError(f"{path}: field '{key}': a range is {{ low = ..., high = ..., log = true|false, step = ... }}")
        if kind not in (int, float):
            raise MmsrError(f"{path}: field '{key}': a range needs a numeric option, '{name}' is {kind.__name__}")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise MmsrError(f"{path}: field '{key}.log': expected true or false, got {log!r}")
        step = value.get("step")
        return Range(_typed(path, f"{key}.low", kind, value["low"]), _typed(path, f"{key}.high", kind, value["high"]),
                     log, None if step is None else _typed(path, f"{key}.step", kind, step))
    return _typed(path, key, kind, value)


def _typed(path: Path, key: str, kind: type, value: Any):
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
        if kind in (int, float) else isinstance(value, kind))
    if not ok:
        raise MmsrError(f"{path}: field '{key}': expected {'an integer' if kind is int else kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def check_space(space: dict[str, Param], model: str, where: str) -> None:
    """Every value a space can give, beside the space's fixed options, must make a valid
    configuration (one-line errors otherwise)."""
    pinned = fixed(space)
    # the fixed options one by one first, so that a bad one is named, not an option checked beside it
    for name, param in [*pinned.items(), *searched(space).items()]:
        if isinstance(param, Range):
            if not (math.isfinite(param.low) and math.isfinite(param.high)) or param.low > param.high:
                raise MmsrError(f"{where}: field '{name}': low {param.low} must not exceed high {param.high}")
            if param.log and param.step is not None:
                raise MmsrError(f"{where}: field '{name}': a log range takes no step")
            if param.log and param.low <= 0:
                raise MmsrError(f"{where}: field '{name}': a log range needs low > 0")
            if param.step is not None and param.step <= 0:
                raise MmsrError(f"{where}: field '{name}': step must be > 0")
            values = (param.low, param.high)
        elif isinstance(param, Choice):
            values = param.values
        else:
            values = (param,)
        for value in values:
            try:
                configs({**(pinned if name not in pinned else {}), name: value}, model)
            except (MmsrError, ValueError) as e:
                raise MmsrError(f"{where}: field '{name}': value {value!r} is invalid ({e})") from None


def configs(options: dict[str, Any], model: str, **train_fields):
    """(TrainConfig, ModelConfig) with ``options`` over the defaults, both validated."""
    tc = TrainConfig(**{**asdict(TrainConfig()), **train_fields, "model": model,
                        **{k: v for k, v in options.items() if k in TRAIN_OPTIONS}}).validate()
    # the model's own rules (its config's validate): MMSR's variant, aggregator and fusion
    mc = check_model_config(ModelConfig(**{**asdict(ModelConfig()), "model": model,
                                           **{k: v for k, v in options.items() if k in MODEL_OPTIONS}}))
    if mc.aggregator != "han" and (mc.fusion != ModelConfig.fusion or mc.invasive):
        raise MmsrError(f"--fusion/--invasive: only used by --aggregator han, not {mc.aggregator}")
    return tc, mc


def describe(param: Param) -> str:
    """A space entry as the trials table and errors show it."""
    if isinstance(param, Range):
        return f"{param.low:g}..{param.high:g}" + (" (log)" if param.log else "") + (f" step {param.step:g}" if param.step else "")
    if isinstance(param, Choice):
        return "{" + ", ".join(str(v) for v in param.values) + "}"
    return f"= {param}"
