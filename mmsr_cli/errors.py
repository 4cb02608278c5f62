"""The one exception type that reaches users as a one-line message, and the typed-field check that
files read back (run configs) go through before their values reach any constructor."""

import dataclasses
import typing


class MmsrError(Exception):
    """A user-facing error: bad input, bad option, stage order. Printed as one line, exit 2.

    The message names the file (and field or line) or the option at fault, and what to do.
    """

    exit_code = 2


_JSON_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def check_typed_fields(cls, data, where: str) -> None:
    """Check a JSON object read from a file against dataclass ``cls``: no unknown field, every
    present field of its declared type (bool is not an int; tuples are JSON lists of their item
    type). ``where`` prefixes messages, e.g. ``"runs/x/config.json: field 'model"``; fields missing
    from ``data`` are left to their defaults."""
    if not isinstance(data, dict):
        raise MmsrError(f"{where}': expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise MmsrError(f"{where}.{key}': unknown field")
        hint = hints[key]
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            ok = isinstance(value, list) and all(
                isinstance(v, _JSON_TYPES[item]) and not (item is not bool and isinstance(v, bool)) for v in value)
            shown = f"a list of {item.__name__}"
        else:
            ok = isinstance(value, _JSON_TYPES[hint]) and not (hint is not bool and isinstance(value, bool))
            shown = hint.__name__
        if not ok:
            raise MmsrError(f"{where}.{key}': expected {shown}, got {type(value).__name__} {value!r}")
