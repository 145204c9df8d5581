"""Atomic file and directory writes: readers see the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmforge.utils.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create directory `path` (and its parents) if missing; a path that cannot be a directory there
    (a file is in the way, a read-only location) is a one-line UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), Path(e.filename or path))
        raise UserError(f"cannot create directory {path}: {blocker} is a file; pass another output path") from None
    except OSError as e:
        raise UserError(f"cannot create directory {path} ({e.strerror}); pass an output path in a writable location") from None
    return path


def _unwritable(directory: Path, e: OSError) -> UserError:
    return UserError(f"cannot write in {directory} ({e.strerror}); pass an output path in a writable location")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a file path to write")
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    On any exception the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    ensure_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual mode
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:  # an interrupt between the two renames: put the old one back
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(path: str | os.PathLike, marker: str, what: str) -> None:
    """`path` is about to be replaced wholesale (`atomic_dir`): refuse unless it is absent, an empty
    directory, or holds `marker`, i.e. is an earlier output of the same kind."""
    path = Path(path)
    if path.exists() and not (path / marker).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} exists and is not {what}; pass a new --out or remove it")


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in `path`; a missing or malformed file is a one-line UserError ending in `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt (not valid JSON: {str(e).splitlines()[0]}); {fix}") from None
    except OSError as e:  # a directory, a path through a file, no permission
        raise UserError(f"{path} cannot be read ({e.strerror}); {fix}") from None


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any, str | None]]:
    """(line number, value, None) for each non-blank line of a JSON-lines file, or (line number, None,
    why) for a line that is not JSON; what a bad line means is the caller's to say."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line), None))
        except json.JSONDecodeError as e:
            rows.append((number, None, e.msg))
    return rows


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
