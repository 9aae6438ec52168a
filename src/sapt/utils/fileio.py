"""Atomic writes: every artifact appears whole under its final name or not at all.

A write that fails (a full disk, a quota) raises `WriteError` naming the file, and leaves the file as it was
(absent, or its previous content): nothing half-written appears under a final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .cli import first_line


EXIT_WRITE = 74  # exit status of a command stopped by a WriteError (sysexits' EX_IOERR)


class WriteError(OSError):
    """A file could not be written; it was left as it was. Its message is one line naming the file."""

    def __init__(self, path: str | Path, reason: str, errno: int | None = None):
        super().__init__(errno, reason, str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


TEMPORARY_SUFFIX = ".tmp"  # `.<name>.<random>.tmp`: a file's next content until it is renamed into place


def temporary_beside(path: Path) -> str:
    """A new empty temporary file beside `path`, for its next content."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.close(fd)
        return tmp
    except OSError as err:
        raise WriteError(path, err.strerror or first_line(err), err.errno) from err


def remove_temporaries(folder: str | Path, name: str | None = None, recursive: bool = False) -> None:
    """Remove the temporaries that writes killed mid-way left in `folder` (and below, if `recursive`): of
    every file, or of the files named `name`. Only where nobody else is writing (a run under its lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    prefix = f".{name}." if name else "."
    for path in folder.rglob("*") if recursive else folder.iterdir():
        if path.name.startswith(prefix) and path.name.endswith(TEMPORARY_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds. An OSError
    on the way becomes a WriteError naming `path`."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err.strerror or first_line(err), err.errno) from err
        raise


def read_json(path: str | Path, error: type[Exception], what: str = "file"):
    """Parse a JSON file; any problem raises `error` with one line naming the file (`what` it is)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} is missing") from None
    except IsADirectoryError:
        raise error(f"{path}: expected a {what}, found a folder") from None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: malformed JSON (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:  # e.g. integers too long to convert, nesting too deep
        raise error(f"{path}: malformed JSON ({first_line(err)[:120]})") from None


def write_bytes_if_changed(path: str | Path, data: bytes) -> bool:
    """Atomic write of a shared data file (mode 0644) that leaves an identical file untouched (mtime
    included); True if written."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; data files are meant to be shared
    return True


def write_files_atomic(files: dict[Path, bytes]) -> None:
    """Write every file (mode 0644) under a temporary name first, then rename them all into place: a failed
    write leaves them all as they were."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, payload in files.items():
            staged.append((temporary_beside(path), path))
            Path(staged[-1][0]).write_bytes(payload)
            os.chmod(staged[-1][0], 0o644)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException as err:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            path = staged[-1][1] if staged else next(iter(files))
            raise WriteError(path, err.strerror or first_line(err), err.errno) from err
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, records) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def save_tensors_atomic(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors import SafetensorError  # here: readers of JSON records need not load torch
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=metadata)
        except SafetensorError as err:  # safetensors reports its I/O errors (a full disk) as its own
            raise WriteError(path, first_line(err)) from err


@contextmanager
def staged_folder(out_dir: Path, check_still_free: Callable[[Path], None]):
    """Yield a hidden staging folder beside `out_dir` to fill; when the block succeeds it takes `out_dir`'s
    place (which must still pass `check_still_free`: nobody filled it meanwhile), when it fails it is
    removed. The folder appears whole or not at all."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield staging
        check_still_free(out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_jsonl_prefix(path: str | Path) -> list:
    """The records of a JSON-lines file up to its first incomplete line (a kill can cut the last one)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
