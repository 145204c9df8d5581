"""Outputs that replace a directory wholesale: what they may replace, and how a failed swap ends."""

import errno
import json
import os
import re
import stat
import tempfile

import pytest

from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_dir, check_replaceable, check_writable_dir


def _checkpoint(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"format": 1, "model": {}}))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("kind,why", [
    ("optimizer", "optimizer.safetensors"),
    ("trainer_state", "trainer_state.json"),
    ("metrics", "metrics.jsonl"),
    ("run", "step-000004"),
])
def test_a_training_checkpoint_or_run_is_never_replaced(kind, why, tmp_path):
    path = _checkpoint(tmp_path / "out")
    if kind == "optimizer":
        (path / "optimizer.safetensors").write_bytes(b"state")
    elif kind == "trainer_state":
        (path / "trainer_state.json").write_text(json.dumps({"step": 4}))
    elif kind == "metrics":
        (path / "metrics.jsonl").write_text("{}\n")
    else:
        _checkpoint(path / "step-000004")
    with pytest.raises(UserError, match=f"{why}.*pass a new --out") as err:
        check_replaceable(path, "config.json", "a checkpoint directory")
    assert "\n" not in str(err.value)


def test_an_earlier_output_of_the_same_kind_is_replaceable_and_another_kind_is_not(tmp_path):
    ours = _checkpoint(tmp_path / "ours")
    (ours / "trainer_state.json").write_text(json.dumps({"task": None, "merged_from": "x"}))  # merge-lora's: no step
    check_replaceable(ours, "config.json", "a checkpoint directory", key="model")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    check_replaceable(hf, "config.json", "a model directory", key="model_type")
    with pytest.raises(UserError, match="hf exists and is not a checkpoint directory"):
        check_replaceable(hf, "config.json", "a checkpoint directory", key="model")
    with pytest.raises(UserError, match="ours exists and is not a model directory"):
        check_replaceable(ours, "config.json", "a model directory", key="model_type")


@pytest.mark.parametrize("where,says", [("same", "is the source"), ("inside", "is inside the source"),
                                        ("holds", "holds the source")])
def test_the_source_is_never_the_output(where, says, tmp_path):
    src = tmp_path / "a" / "src"
    src.mkdir(parents=True)
    out = {"same": src, "inside": src / "sub", "holds": tmp_path / "a"}[where]
    with pytest.raises(UserError, match=says):
        check_replaceable(out, "config.json", "a checkpoint directory", sources=[src])
    check_replaceable(tmp_path / "elsewhere", "config.json", "a checkpoint directory", sources=[src])


@pytest.mark.parametrize("out", ["", ".", "./"])
def test_an_empty_path_or_the_current_directory_is_refused_in_one_line(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # empty: replacing it would still pull it from under the shell
    for call in (lambda: check_replaceable(out, "meta.json", "a prepared data directory"),
                 lambda: atomic_dir(out).__enter__()):
        with pytest.raises(UserError, match="current directory|empty") as err:
            call()
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_relative_path_without_a_folder_part_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir("out") as tmp:
        (tmp / "f").write_text("new")
    assert (tmp_path / "out" / "f").read_text() == "new"


@pytest.mark.parametrize("fails", ["aside", "in"])
def test_a_swap_the_filesystem_refuses_keeps_the_old_directory_and_the_new_output(fails, tmp_path, monkeypatch):
    """`chattr +i out` makes renaming `out` aside fail with EPERM; a failure of the second rename puts it back.
    The finished output may have taken hours: it is kept, and the one-line error names it."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "f").write_text("old")
    replace = os.replace

    def refused(src, dst):
        if (fails == "aside" and str(src) == str(target)) or (fails == "in" and str(dst) == str(target) and ".tmp" in str(src)):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match=f"cannot replace {target} \\(Operation not permitted") as err:
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("new")
    assert "\n" not in str(err.value) and f"the new output is kept in {tmp}" in str(err.value)
    assert (target / "f").read_text() == "old" and (tmp / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tmp.name, "out"])  # no backup folder left


def test_a_new_directory_that_cannot_be_renamed_in_is_one_line_naming_the_kept_output(tmp_path, monkeypatch):
    replace = os.replace

    def refused(src, dst):
        if ".tmp" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match="cannot write .*new") as err:
        with atomic_dir(tmp_path / "new") as tmp:
            (tmp / "f").write_text("new")
    assert f"kept in {tmp}" in str(err.value) and (tmp / "f").read_text() == "new"
    assert list(tmp_path.iterdir()) == [tmp]


def test_an_interrupt_while_swapping_puts_the_old_directory_back_and_removes_the_new(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "f").write_text("old")
    replace = os.replace

    def interrupted(src, dst):
        if str(dst) == str(target) and ".tmp" in str(src):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_folder_beside_the_output_is_never_taken_for_its_backup(tmp_path):
    """The old output is renamed aside under a fresh name: a `.out.old` of the user's was deleted
    without a word when that was the fixed name of the backup."""
    (tmp_path / "out").mkdir()
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "mine").write_text("keep me")
    for content in ("first", "second"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text(content)
    assert (tmp_path / "out" / "f").read_text() == "second"
    assert (tmp_path / ".out.old" / "mine").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "out"]


def test_a_symlinked_output_is_replaced_and_its_target_kept(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("old")
    (tmp_path / "out").symlink_to(tmp_path / "real")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "f").read_text() == "new"
    assert (tmp_path / "real" / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]


def test_check_writable_dir_fails_in_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    for out, message in (("", "output path is empty"), (tmp_path / "afile" / "sub", "afile is a file"),
                         (tmp_path / "afile", "afile is a file")):
        with pytest.raises(UserError, match=message) as err:
            check_writable_dir(out)
        assert "\n" not in str(err.value)
    check_writable_dir(tmp_path / "new" / "deeper")  # writable: the folders made to check it are gone again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

    def unwritable(*args, **kwargs):  # a folder without write permission (root writes anywhere, so simulated)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", unwritable)
    with pytest.raises(UserError, match=r"cannot write in .*new \(Permission denied\)"):
        check_writable_dir(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_file_write_never_puts_a_file_in_place_of_a_device_or_pipe(tmp_path):
    """The write goes to a temporary file renamed over the target: over /dev/null or a FIFO that
    rename would replace the device with a file (as root, /dev/full had become one)."""
    from lmforge.utils.fs import atomic_write_text

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    atomic_write_text(tmp_path / "plain.txt", "x")  # a plain file, new or existing, is written as before
    atomic_write_text(tmp_path / "plain.txt", "y")
    assert (tmp_path / "plain.txt").read_text() == "y"


def test_a_file_that_cannot_be_replaced_is_one_line_naming_the_kept_output(tmp_path, monkeypatch):
    """An immutable target (chattr +i) refuses the rename: the finished output (predictions, metrics)
    stays in its temporary file, named, and the target keeps its old content."""
    from lmforge.utils.fs import atomic_write_text

    target = tmp_path / "preds.jsonl"
    target.write_text("old")
    replace = os.replace

    def refused(src, dst):
        if str(dst) == str(target):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match=f"cannot replace {target} \\(Operation not permitted") as err:
        atomic_write_text(target, "new")
    (kept,) = [p for p in tmp_path.iterdir() if p != target]
    assert "\n" not in str(err.value) and f"the new output is kept in {kept}" in str(err.value)
    assert target.read_text() == "old" and kept.read_text() == "new"


def test_a_file_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A disk filling up mid-write is no finished output: nothing is kept, the error is the disk's."""
    from lmforge.utils.fs import atomic_write_text

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(tmp_path / "f.txt", "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("up", [1, 2])
def test_a_folder_holding_the_current_directory_is_refused_and_kept(up, tmp_path, monkeypatch):
    """Replacing a parent of the current directory would pull the shell's folder out from under it."""
    here = tmp_path / "a" / "b" / "c"
    here.mkdir(parents=True)
    (here / "f").write_text("keep me")
    monkeypatch.chdir(here)
    out = here.parents[up - 1]
    for call in (lambda: check_replaceable(out, "meta.json", "a prepared data directory"),
                 lambda: atomic_dir(out).__enter__()):
        with pytest.raises(UserError, match=re.escape(f"--out {out} is {out}, which holds the current directory, and "
                                                      "would be replaced as a whole")) as err:
            call()
        assert "\n" not in str(err.value)
    assert (here / "f").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    check_replaceable(here / "sub", "meta.json", "a prepared data directory")  # a folder inside it is fine


@pytest.mark.parametrize("link_to,says", [("out", "is the source"), ("out/sub", "holds the source")])
def test_a_source_reached_through_a_symlink_into_the_output_is_the_output(link_to, says, tmp_path):
    out = _checkpoint(tmp_path / "out")
    (out / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / link_to)
    with pytest.raises(UserError, match=re.escape(f"--out {out} {says} {tmp_path / 'link'}, which writing")):
        check_replaceable(out, "config.json", "a checkpoint directory", key="model", sources=[tmp_path / "link"])
    (tmp_path / "outlink").symlink_to(tmp_path / link_to)  # the output named through a symlink to the source
    with pytest.raises(UserError, match=re.escape(f"--out {tmp_path / 'outlink'} is the source {tmp_path / link_to},")):
        check_replaceable(tmp_path / "outlink", "config.json", "a checkpoint directory", key="model",
                          sources=[tmp_path / link_to])


def test_a_hidden_file_of_the_users_in_an_earlier_output_is_named_and_kept(tmp_path):
    """Hidden entries count as any other: `.notes` in an earlier tokenizer folder is not the tokenizer's."""
    from lmforge.data import train_tokenizer
    from lmforge.utils.fs import check_only_outputs

    (tmp_path / "corpus.txt").write_text("to be or not to be\n" * 20)
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / ".notes").write_text("keep me")
    says = (f"{out} holds .notes, which `lmforge tokenizer train` did not write and which replacing the tokenizer "
            "folder would delete; move it out, or pass a new --out")
    with pytest.raises(UserError, match=f"^{re.escape(says)}$"):
        train_tokenizer([tmp_path / "corpus.txt"], 300, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".notes", "tokenizer.json"]
    assert (out / ".notes").read_text() == "keep me" and (out / "tokenizer.json").read_text() == "{}"
    with pytest.raises(UserError, match=r"holds \.notes, which `x` did not write"):
        check_only_outputs(out, lambda entry: entry.name == "tokenizer.json", "x", "it")
    check_only_outputs(out, lambda entry: entry.name in ("tokenizer.json", ".notes"), "x", "it")
