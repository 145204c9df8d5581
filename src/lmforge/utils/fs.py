"""Atomic file and directory writes: readers see the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lmforge.utils.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: str | os.PathLike) -> None:
    """Give a file written through a private temporary file (mkstemp's, or safetensors' own since
    0.8) the mode an ordinary open() would have: 0o666 less the umask, so that another account (a
    server, a colleague) reads it as it reads the JSON beside it."""
    os.chmod(path, 0o666 & ~_umask())


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


def _not_empty(path: str | os.PathLike) -> None:
    if not str(path).strip():  # an unset variable: not the current directory by accident
        raise UserError("the output path is empty; pass the directory to write, e.g. --out out")


def check_writable_dir(path: str | os.PathLike) -> None:
    """Check that files can be created in directory `path` before the long work that writes them:
    an empty path, a file in the way or a folder that cannot be written is a one-line UserError now,
    not after the work. The folders made to check it are removed again, so that a failure later
    leaves nothing behind."""
    _not_empty(path)
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        ensure_dir(path)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _unwritable(path, e) from None
    finally:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a file path to write")
    if path.exists() and not path.is_file():  # a device (/dev/null) or pipe: the rename would put a file in its place
        raise UserError(f"{path} is not a regular file; pass a file path to write")
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    written = False
    try:
        usual_mode(tmp)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        written = True
        os.replace(tmp, path)
    except BaseException as e:
        if written and isinstance(e, OSError):  # a refused rename (an immutable `path`): the output is kept
            raise _refused(path, Path(tmp), e) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def out_dir(path: str | os.PathLike) -> Path:
    """`path`, an output directory about to be replaced as a whole, made absolute (so that its
    temporary sibling has a name); an empty path and the current directory or one holding it are a
    one-line UserError: replacing those would pull the folder out from under the shell."""
    _not_empty(path)
    absolute = Path(os.path.abspath(path))  # not resolve(): a symlink named as `path` is what gets replaced
    try:
        here: Path | None = Path.cwd()
    except OSError:  # the current directory was deleted: it holds nothing to protect
        here = None
    if (here is not None and (absolute == here or absolute in here.parents)) or not absolute.name:
        which = "the current directory" if absolute == here else f"{absolute}, which holds the current directory,"
        raise UserError(f"--out {path} is {which} and would be replaced as a whole; pass a new directory, e.g. --out out")
    return absolute


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    The temporary directory is made first, so an unwritable parent shows before the work that fills
    it. An exception inside the block removes it and leaves `path` as it was. A finished output is
    never thrown away: a rename the filesystem refuses (an immutable or read-only `path`) leaves
    `path` as it was and is a one-line UserError naming the kept output, which may have taken hours
    to make. An interrupt while renaming puts `path` back and removes the output, as any interrupt.
    """
    path = out_dir(path)
    ensure_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual mode
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _swap_in(tmp, path)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refused(path: Path, tmp: Path, e: OSError) -> UserError:
    """The one line for a finished output (`tmp`) that the filesystem would not rename to `path`: it
    is kept, and named, since it may have taken hours to make."""
    kept = f"the new output is kept in {tmp}"
    if not (path.exists() or path.is_symlink()):
        return UserError(f"cannot write {path} ({e.strerror}); {kept}: rename it to {path.name} once that is possible")
    return UserError(f"cannot replace {path} ({e.strerror}; is it immutable, or on a read-only mount?); it was left "
                     f"as it was, and {kept}: put it in its place once {path.name} can be replaced")


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`. An existing `path` is first renamed into a new hidden
    directory (a fresh name, so that no folder of the user's is ever taken for a backup) and
    deleted after; when the new one cannot take its place, it is put back."""
    if not (path.exists() or path.is_symlink()):
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _refused(path, tmp, e) from None
        return

    try:
        backup = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    except OSError as e:
        raise _refused(path, tmp, e) from None
    aside = backup / path.name
    try:
        os.replace(path, aside)
    except OSError as e:
        backup.rmdir()
        raise _refused(path, tmp, e) from None
    try:
        os.replace(tmp, path)
    except BaseException as e:  # an interrupt or a refusal between the two renames: put the old one back
        try:
            os.replace(aside, path)
        except OSError as again:
            raise UserError(f"cannot replace {path} ({again.strerror}); its previous content is in {aside}: rename it "
                            f"back to {path}; the new output is kept in {tmp}") from None
        backup.rmdir()
        if isinstance(e, OSError):
            raise _refused(path, tmp, e) from None
        raise
    shutil.rmtree(backup, ignore_errors=True)


# What only training writes (see lmforge.checkpoint): a directory holding one of these is a checkpoint
# a run resumes from, or the run directory itself, and no other output may replace it.
_RUN_FILES = ("optimizer.safetensors", "dcp", "metrics.jsonl")


def _run_state(path: Path) -> str | None:
    """The entry of `path` that marks it as a training checkpoint or run directory, or None."""
    for name in _RUN_FILES:
        if (path / name).exists():
            return name
    steps = [p.name for p in path.glob("step-*") if p.is_dir()]
    if steps:  # the latest by number (step-1000000 after step-999999), as the message names it
        return max(steps, key=lambda name: (name[5:].isdigit(), len(name), name))
    state = path / "trainer_state.json"  # merge-lora writes one without a step: that output is no run
    with contextlib.suppress(OSError, ValueError):
        if state.is_file() and "step" in json.loads(state.read_text(encoding="utf-8")):
            return state.name
    return None


def _holds_key(marker: Path, key: str) -> bool:
    try:
        value = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and key in value


def relation(out: Path, source: Path) -> str | None:
    """How `out` lies to `source` ("is", "is inside", "holds"), symlinks followed; None if apart."""
    out, source = Path(os.path.realpath(out)), Path(os.path.realpath(source))
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "holds"
    return None


def check_replaceable(path: str | os.PathLike, marker: str, what: str, *, key: str | None = None,
                      sources: Iterable[str | os.PathLike] = (), training: bool = False) -> None:
    """`path` is about to be replaced wholesale (`atomic_dir`): refuse unless it is absent, an empty
    directory, or an earlier output of the same kind: it holds `marker` (a JSON object holding `key`,
    when given). Never replaced: one of `sources` (the input being converted) or a directory inside or
    around one, and, unless `training` (a run writing its own step), a training checkpoint or run."""
    shown = path
    path = out_dir(path)
    for source in sources:
        how = relation(path, Path(source))
        if how:
            raise UserError(f"--out {shown} {how} the source {source}, which writing {what} there would destroy; "
                            "pass an --out outside it")
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{shown} exists and is not {what}; pass a new --out or remove it")
    if not any(path.iterdir()):
        return
    state = None if training else _run_state(path)
    if state is not None:
        raise UserError(f"{shown} is a training checkpoint or run (it holds {state}), which replacing it with {what} "
                        "would lose; pass a new --out")
    if not (path / marker).is_file() or (key is not None and not _holds_key(path / marker, key)):
        names = sorted(entry.name for entry in path.iterdir())
        held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{shown} exists and is not {what} (it holds {held}); pass a new --out or remove it")


def check_only_outputs(path: Path, ours: Callable[[Path], bool], verb: str, what: str) -> None:
    """`path`, an earlier output about to be replaced whole, may hold only entries `verb` writes (those
    `ours` accepts): any other (the user's notes, a corpus) is named, as replacing `what` would delete it."""
    for entry in sorted(path.iterdir()):
        if not ours(entry):
            raise UserError(f"{path} holds {entry.name}, which `{verb}` did not write and which replacing {what} "
                            "would delete; move it out, or pass a new --out")


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


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """The JSON object of `what` (settings of some kind) in `path`; a missing or malformed file, or
    another kind of JSON value, is a one-line UserError ending in `fix`."""
    value = read_json(path, fix)
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object of {what}; {fix}")
    return value


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
