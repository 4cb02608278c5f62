"""The one exception type that reaches users as a one-line message, and the typed-field check that
files read back (run configs) go through before their values reach any constructor."""

import dataclasses
import errno
import re
import resource
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


@dataclasses.dataclass(frozen=True)
class Range:
    """The accepted values of a numeric option, ``lo .. hi`` with each end included unless marked
    open. One object per option, used where the option is parsed (``app.ranged``) and where a
    library caller or a file read back (a run's config.json) hands the same value over."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = True

    def describe(self) -> str:
        if self.integer:
            return f"an integer in {self.lo}..{self.hi}"
        if self.lo_open and self.hi_open:
            return f"a number strictly between {self.lo} and {self.hi}"
        return f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def check(self, option: str, value) -> None:
        """``MmsrError`` naming ``option`` unless ``value`` is in range (NaN never is)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        if ok and self.integer and isinstance(value, float):
            ok = False
        if ok:
            ok = (self.lo < value if self.lo_open else self.lo <= value) and (
                value < self.hi if self.hi_open else value <= self.hi)
        if not ok:
            raise MmsrError(f"{option}: must be {self.describe()}, got {value}")


def parse_list(value: str | None, option: str) -> list[str]:
    """Comma-separated option value -> list of non-empty stripped strings (None: empty)."""
    if value is None:
        return []
    items = [v.strip() for v in value.split(",")]
    if any(not v for v in items):
        raise MmsrError(f"{option}: empty entry in {value!r}")
    return items


# ----------------------------------------------------------------------------------------------
# Allocator failures: memory, not mmsr

# How the libraries say that an allocation was refused: torch's CPU allocator ("DefaultCPUAllocator:
# can't allocate memory"), C++'s std::bad_alloc, CUDA's "out of memory", the loader's failed mmap of
# a shared library ("failed to map segment from shared object") and strerror(ENOMEM).
_OOM_MARKERS = ("can't allocate memory", "bad_alloc", "out of memory", "cannot allocate memory",
                "failed to map segment")
_THREAD_NOT_STARTED = "can't start new thread"  # CPython's text when pthread_create fails


def allocator_failure(exc: BaseException | None) -> BaseException | None:
    """The refused allocation in ``exc`` or the exceptions it was raised from (a reader that turned
    it into "not a readable file"), or None: MemoryError (numpy's and pyarrow's included), OSError
    ENOMEM, and the RuntimeError/ImportError/OSError texts of :data:`_OOM_MARKERS`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
            return exc
        if isinstance(exc, (RuntimeError, ImportError, OSError)) and not isinstance(exc, MmsrError):
            text = str(exc).lower()
            if any(marker in text for marker in _OOM_MARKERS):
                return exc
            # a thread whose stack could not be mapped (TensorBoard's writer, the collating thread):
            # under an address-space limit that is the refused allocation; without one it may be
            # the thread limit, so it stays an internal error there
            if _THREAD_NOT_STARTED in text and resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
                return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def out_of_memory_message(exc: BaseException) -> str:
    """One line saying what ran out (GPU memory, the address-space limit, the machine's memory),
    how much was asked for when the library says so, and what is free now."""
    text = " ".join(str(exc).split())
    asked = re.search(r"(?:tried to allocate|allocate) (\d+(?:\.\d+)?) ?(bytes|[KMG]iB)", text)
    size = ""
    if asked:
        scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[asked.group(2)]
        size = f" ({_gib(float(asked.group(1)) * scale)} asked for)"
    if "cuda" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return f"out of GPU memory{size}; lower --batch-size or use --device cpu"
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    try:  # importing psutil can itself fail when memory has run out: the line then goes without it
        import psutil

        vm = psutil.virtual_memory()
        free = f"; {_gib(vm.available)} of {_gib(vm.total)} available now"
    except (ImportError, MemoryError, OSError):
        free = ""
    if limit != resource.RLIM_INFINITY:
        return (f"out of memory: an allocation{size} passed the address-space limit of {_gib(limit)} "
                f"(ulimit -v){free}; raise the limit or lower --batch-size")
    return f"out of memory: an allocation{size} was refused{free}; free memory or lower --batch-size"
