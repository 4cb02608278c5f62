"""Dataset folders, atomic writes, and stage manifests.

A manifest (``manifests/<stage>.json``) records what a stage read, with which options, and the
content hash of everything it wrote. A later stage calls :func:`DatasetDir.require` to refuse to
run on missing, corrupted or stale inputs with a message that says which command to run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from . import contracts as C
from .errors import MmsrError

MANIFEST_VERSION = 1

# The command that produces each stage, for "run `...` first" hints.
_STAGE_COMMAND = {
    C.STAGE_DOWNLOAD: "mmsr download",
    C.STAGE_PREPROCESS: "mmsr preprocess",
    C.STAGE_FEATURES: "mmsr extract-features --modality image|text --name {modality}",
    C.STAGE_CODES: "mmsr build-codes --modality {modality}",
    C.STAGE_GRAPHS: "mmsr build-graphs",
}


def stage_command(stage: str, dataset: str) -> str:
    base, _, modality = stage.partition(":")
    if stage == f"{C.STAGE_GRAPHS}:items":
        return f"mmsr build-graphs --no-codes --dataset {dataset}"
    cmd = _STAGE_COMMAND.get(base, f"mmsr {base}").format(modality=modality)
    return f"{cmd} --dataset {dataset}"


def resolve_workdir(workdir: str | os.PathLike | None) -> Path:
    if workdir is None:
        workdir = os.environ.get("MMSR_WORKDIR", "workdir")
    return Path(workdir).expanduser().resolve()


def validate_dataset_name(name: str) -> str:
    if not C.DATASET_NAME_RE.match(name or ""):
        raise MmsrError(
            f"--dataset: invalid name {name!r} (letters, digits, '.', '_' and '-', at most 64)"
        )
    return name


def validate_modality_name(name: str) -> str:
    if not C.MODALITY_NAME_RE.match(name or ""):
        raise MmsrError(
            f"modality name {name!r} is invalid (lower-case letter first, then a-z, 0-9, '_')"
        )
    return name


# ----------------------------------------------------------------------------------------------
# Hashing and atomic writes


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_regular_file(path: Path) -> None:
    """Refuse, before it is opened, a path that exists but is no regular file: opening a FIFO
    for reading waits for a writer forever, a device or socket holds no mmsr data, a directory
    is no file. Every reader of a file mmsr or the user wrote goes through here (hashes,
    Parquet, JSON and TOML files, checkpoints). A missing file is left to the caller's message."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise MmsrError(f"{path}: is {kind}, expected a regular file; remove or replace it")


def read_file_text(path: Path) -> str:
    """``path.read_text()`` after :func:`check_regular_file` (UTF-8; decoding errors propagate)."""
    check_regular_file(path)
    return Path(path).read_bytes().decode("utf-8")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    check_regular_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """Hash of a file, or of a directory's files (relative names and contents, sorted)."""
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            h.update(b"\0")
            h.update(file_sha256(p).encode())
        return h.hexdigest()
    return file_sha256(path)


# Temporary names: ``.<final name>.mmsr<pid>-<8 random chars><suffix>``. The pid tells a later run
# whether the writer is gone (killed mid-write), so its leftovers can be deleted safely.
_TEMP_RE = re.compile(r"\..+\.mmsr(\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9]+)*")
_cleaned_folders: set[Path] = set()


def temp_prefix(final: Path) -> str:
    """``prefix`` for tempfile.mkstemp/mkdtemp of a temporary that becomes ``final``."""
    return f".{Path(final).name}.mmsr{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no permission to ask: keep its files
        return True
    return True


def remove_dead_temporaries(folder: Path) -> None:
    """Delete the temporary files and folders in ``folder`` whose writer no longer runs (a killed
    mmsr); those of running processes stay. Done once per folder and process."""
    folder = Path(folder)
    if folder in _cleaned_folders:
        return
    _cleaned_folders.add(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP_RE.fullmatch(entry.name)
        if m is None or _process_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


# A write that fails with less than this free is a full disk, whatever the library reported: numpy's
# short write raises an OSError without errno, torch's zip writer a RuntimeError, pyarrow an
# ArrowIOError. A file system is full once a write fails; what is left is below one block.
FULL_DISK_BELOW_BYTES = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int | None:
    """Bytes the current user may still write on the file system of ``path`` (or of its nearest
    existing parent); None where that cannot be asked."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    # root may write into the blocks reserved for it; everyone else stops at f_bavail
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _raised_for_full_disk(exc: BaseException, path: Path) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    free = free_bytes(path)
    return free is not None and free < FULL_DISK_BELOW_BYTES


@contextlib.contextmanager
def full_disk_as_error(path: Path) -> Iterator[None]:
    """Any failure while writing ``path`` on a full file system -> one-line :class:`MmsrError`.

    Call it while the failed write's temporary still exists: deleting it frees the space that
    tells a full disk from another failure.
    """
    try:
        yield
    except MmsrError:
        raise
    except Exception as e:
        if _raised_for_full_disk(e, Path(path)):
            raise MmsrError(f"{path}: no space left on device; earlier outputs are kept") from e
        raise


def fsync_path(path: Path) -> None:
    """Flush a file, or every file under a folder, to the disk: a file system that allocates space
    late reports a full disk here, before the rename publishes a file it could not store."""
    path = Path(path)
    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_temporary(path: Path, suffix: str) -> Path:
    """An empty temporary next to ``path`` (its folder created), named for ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix or ".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise MmsrError(f"{path}: no space left on device; earlier outputs are kept") from e
        raise MmsrError(f"{path.parent}: cannot write here ({e.strerror})") from e
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Readers therefore see either the old complete file or the new complete file, never a
    half-written one, and a failure leaves the previous output intact; a full disk is reported as
    such however the writing library words it. Temporaries that a killed run left in the folder are
    deleted on the first write there.
    """
    path = Path(path)
    tmp_path = _new_temporary(path, suffix)
    try:
        with full_disk_as_error(path):
            yield tmp_path
            fsync_path(tmp_path)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def commit_atomic(writers: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write several outputs as one: ``writer(tmp)`` fills a temporary next to each path, and only
    when every one is complete and on the disk are they all renamed onto their paths. A failure
    while writing any of them (a full disk: the one-line error naming that file) leaves every
    earlier output as it was. The temporary keeps its path's suffix (some writers infer formats)."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in writers.items():
            path = Path(path)
            tmp = _new_temporary(path, path.suffix)
            temps.append((tmp, path))
            with full_disk_as_error(path):
                write(tmp)
                fsync_path(tmp)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()


def bytes_writer(data: bytes) -> Callable[[Path], None]:
    return lambda tmp: Path(tmp).write_bytes(data)


def torch_writer(obj: Any) -> Callable[[Path], None]:
    """``torch.save`` through a file object: given a path, torch names the archive's records after
    the file, and the temporary's random name would make equal tensors give different bytes (and
    manifest hashes)."""

    def write(tmp: Path) -> None:
        # torch: only for checkpoint writes (preprocess and download import no ML library)
        import torch

        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write


def parquet_writer(table: pa.Table, schema: pa.Schema | None = None) -> Callable[[Path], None]:
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    # No statistics timestamps or writer-dependent metadata: same input -> same bytes.
    return lambda tmp: pq.write_table(table, tmp, compression="zstd", write_statistics=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        bytes_writer(data)(tmp)


def write_torch_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch_writer(obj)(tmp)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(path: Path, table: pa.Table, schema: pa.Schema | None = None) -> None:
    with atomic_path(path, ".parquet") as tmp:
        parquet_writer(table, schema)(tmp)


def read_parquet(path: Path, schema: pa.Schema | None = None, later: tuple[str, ...] = ()) -> pa.Table:
    """The table of ``path`` with the columns of ``schema``; ``later`` columns, absent from files
    written before they existed, are filled with nulls."""
    if not path.exists():
        raise MmsrError(f"{path}: file not found")
    check_regular_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise MmsrError(f"{path}: not a readable Parquet file ({e})") from e
    if schema is not None:
        missing = [n for n in schema.names if n not in table.column_names and n not in later]
        if missing:
            raise MmsrError(f"{path}: missing column(s) {', '.join(missing)}")
        for name in later:
            if name not in table.column_names:
                table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
        table = table.select(schema.names)
    return table


# ----------------------------------------------------------------------------------------------
# Writer locks


class LockHeldError(MmsrError):
    """:func:`writer_lock` found its lock held by a live process (named in the message)."""


@contextlib.contextmanager
def writer_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while writing ``what``; a second writer gets a
    one-line error naming the holder.

    ``fcntl.flock`` rather than the filelock package: filelock truncates the lock file on every
    attempt, which would erase the holder's description a refused writer reports. The kernel drops
    the lock when its holder dies, so a killed run never blocks the next one.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 500, 0).decode("utf-8", "replace").strip() or "another process"
            raise LockHeldError(
                f"{lock_file}: {what} is being written by {holder}; wait for it to finish or stop it"
            ) from None
        try:  # who holds it, for the error above; best effort (a full disk still locks)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"mmsr pid {os.getpid()} on {platform.node()} ({' '.join(sys.argv[1:3])}), "
                          f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------------------------
# Versions recorded in manifests


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("mmsr", "torch", "torch_geometric", "numpy", "pyarrow", "polars", "scikit-learn",
                 "transformers", "torchvision"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ----------------------------------------------------------------------------------------------
# Dataset folder


def _check_manifest(manifest, path: Path, hint: str) -> None:
    """A manifest of this mmsr's format: a manifest written by another version of mmsr (or edited
    by hand) is one line naming the file and field, not a KeyError deep in a stage."""
    if not isinstance(manifest, dict):
        raise MmsrError(f"{path}: corrupt manifest (expected a JSON object); {hint}")
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise MmsrError(f"{path}: manifest_version {version!r}, this mmsr reads version {MANIFEST_VERSION} "
                        f"(written by another mmsr version); {hint}")
    for key, kind in (("outputs", dict), ("inputs", dict), ("options", dict), ("counts", dict), ("fingerprint", str)):
        value = manifest.get(key, None if key in ("outputs", "fingerprint") else {})
        ok = isinstance(value, kind) and (kind is not dict or key in ("options", "counts") or all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()))
        if not ok:
            raise MmsrError(f"{path}: field '{key}' is missing or malformed; {hint}")


@dataclass
class DatasetDir:
    workdir: Path
    name: str

    @classmethod
    def open(cls, workdir: str | os.PathLike | None, name: str) -> "DatasetDir":
        return cls(resolve_workdir(workdir), validate_dataset_name(name))

    @property
    def root(self) -> Path:
        return self.workdir / self.name

    def path(self, rel: str) -> Path:
        return self.root / rel

    @contextlib.contextmanager
    def writing(self, create: bool = False) -> Iterator["DatasetDir"]:
        """Hold the dataset's writer lock: one stage at a time writes the folder. Without
        ``create``, a folder that does not exist is not made for the lock (the stage then refuses
        its missing inputs and leaves nothing behind)."""
        if not create and not self.root.is_dir():
            yield self
            return
        with writer_lock(self.path(C.DATASET_LOCK), f"dataset {self.name}"):
            yield self

    # -- manifests ------------------------------------------------------------------------------

    def manifest_path(self, stage: str) -> Path:
        return self.root / C.MANIFESTS_DIR / (stage.replace(":", "__") + ".json")

    def read_manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        if not p.exists():
            return None
        try:
            manifest = json.loads(read_file_text(p))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MmsrError(f"{p}: corrupt manifest ({e}); re-run `{stage_command(stage, self.name)}`") from e
        _check_manifest(manifest, p, f"re-run `{stage_command(stage, self.name)}`")
        return manifest

    def stages(self, prefix: str) -> list[str]:
        """Stages with a manifest whose name starts with ``prefix`` (e.g. all ``codes:*``)."""
        d = self.root / C.MANIFESTS_DIR
        if not d.exists():
            return []
        names = sorted(p.stem.replace("__", ":") for p in d.glob("*.json"))
        return [n for n in names if n == prefix or n.startswith(prefix + ":")]

    def write_manifest(
        self,
        stage: str,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: list[str],
        options: Mapping[str, Any],
        counts: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict:
        """Record a finished stage.

        ``inputs`` maps upstream stage names to the hash recorded when this stage read them
        (use :meth:`require`'s return value); ``outputs`` are paths relative to the dataset
        folder, hashed now.
        """
        out_hashes = {}
        for rel in outputs:
            p = self.path(rel)
            if not p.exists():
                raise MmsrError(f"{p}: expected output of stage {stage} is missing")
            out_hashes[rel] = path_sha256(p)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": stage,
            "dataset": self.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
            "versions": library_versions(),
            "options": dict(options),
            "inputs": dict(inputs or {}),
            "outputs": out_hashes,
            "counts": dict(counts or {}),
        }
        if extra:
            manifest.update(extra)
        manifest["fingerprint"] = _fingerprint(out_hashes)
        write_json_atomic(self.manifest_path(stage), manifest)
        return manifest

    def require(self, stage: str, *, verify: bool = True) -> dict:
        """Return the manifest of a finished upstream stage, or raise a clear error.

        Checks that the stage ran, that its outputs still exist with the recorded content
        (``verify``), and that its own inputs are still the current outputs of their stages
        (an upstream stage re-run with other options makes everything after it stale), and so on
        up the chain: codes whose features predate a re-run of preprocess (other items, other
        numbering) are stale too, though their features manifest still matches. Outputs of the
        earlier stages need not exist any more (features may be deleted once coded).
        """
        m = self.read_manifest(stage)
        hint = f"run `{stage_command(stage, self.name)}` first"
        if m is None:
            if not self.root.exists():
                raise MmsrError(f"{self.root}: no such dataset folder; {hint}")
            raise MmsrError(f"{self.manifest_path(stage)}: stage '{stage}' has not been run; {hint}")
        for rel, digest in m["outputs"].items():
            p = self.path(rel)
            if not p.exists():
                raise MmsrError(f"{p}: output of stage '{stage}' is missing; {hint}")
            if verify and path_sha256(p) != digest:
                raise MmsrError(f"{p}: changed since stage '{stage}' wrote it; {hint}")
        for up_stage, fingerprint in m.get("inputs", {}).items():
            up = self.read_manifest(up_stage)
            if up is None or up.get("fingerprint") != fingerprint:
                raise MmsrError(
                    f"{self.manifest_path(stage)}: stage '{stage}' is stale ('{up_stage}' was re-run "
                    f"since); re-run `{stage_command(stage, self.name)}`"
                )
        todo, seen = list(m.get("inputs", {})), set()
        while todo:  # the inputs' own inputs, transitively
            source = todo.pop()
            if source in seen:
                continue
            seen.add(source)
            for up_stage, fingerprint in (self.read_manifest(source) or {}).get("inputs", {}).items():
                up = self.read_manifest(up_stage)
                if up is None or up.get("fingerprint") != fingerprint:
                    raise MmsrError(
                        f"{self.manifest_path(stage)}: stage '{stage}' is stale (its input '{source}' was "
                        f"built from '{up_stage}' data that was re-run since); re-run "
                        f"`{stage_command(source, self.name)}`, then `{stage_command(stage, self.name)}`"
                    )
                todo.append(up_stage)
        return m

    # -- logging --------------------------------------------------------------------------------

    def logger(self, stage: str) -> logging.Logger:
        """A logger writing to ``logs/<stage>.log`` (appending, one line per record)."""
        log_dir = self.root / C.LOGS_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"mmsr.{self.name}.{stage}"
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        path = log_dir / (stage.replace(":", "__") + ".log")
        if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        return logger


def _fingerprint(out_hashes: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(out_hashes):
        h.update(f"{rel}={out_hashes[rel]}\n".encode())
    return h.hexdigest()[:16]


def upstream(manifest: dict) -> dict[str, str]:
    """The ``inputs`` entry a downstream manifest records for an upstream manifest."""
    return {manifest["stage"]: manifest["fingerprint"]}
