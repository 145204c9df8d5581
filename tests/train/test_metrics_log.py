"""metrics.jsonl: what a resumed run reads back, and what it says when it cannot."""

import pytest

from lmforge.train.metrics import MetricsLog, read_metrics
from lmforge.utils.errors import UserError


def test_a_metrics_file_that_is_a_directory_is_one_line_naming_it(tmp_path):
    """Seen in review: resume (truncate_after -> read_jsonl) ended in IsADirectoryError."""
    (tmp_path / "metrics.jsonl").mkdir()
    log = MetricsLog(tmp_path, tensorboard=True)
    with pytest.raises(UserError, match=r"metrics\.jsonl cannot be read as the run's metrics \(Is a directory\); move it aside") as e:
        log.truncate_after(4)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="Is a directory"):
        read_metrics(tmp_path / "metrics.jsonl")
    # The refused resume started no TensorBoard event file either.
    assert not (tmp_path / "tensorboard").exists()


def test_rows_are_kept_up_to_the_step_and_tensorboard_starts_with_the_first_row(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    assert not (tmp_path / "tensorboard").exists()
    for step in (1, 2, 3):
        log.log({"step": step, "kind": "train", "loss": 1.0 / step})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    log = MetricsLog(tmp_path, tensorboard=False)
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_tensorboard_drops_the_events_past_the_step_a_run_resumes_from(tmp_path):
    """Seen in review: after a kill and a resume, TensorBoard showed the steps after the checkpoint twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for start, steps in ((0, (1, 2, 3)), (2, (3, 4))):  # killed after logging step 3; resumed from step 2
        log = MetricsLog(tmp_path, tensorboard=True)
        log.truncate_after(start)
        for step in steps:
            log.log({"step": step, "kind": "train", "loss": float(10 * start + step)})
        log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 23.0), (4, 24.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 23.0), (4, 24.0)]


def test_a_tensorboard_write_that_fails_is_one_warning_and_the_jsonl_goes_on(tmp_path, monkeypatch, capsys):
    """Seen in review: on a full disk TensorBoard's writer thread printed "Exception in thread ...
    Traceback ... OSError: [Errno 28]" and the next add_scalar raised it again. metrics.jsonl is the
    record: TensorBoard stops with one warning, the thread prints nothing, the run goes on."""
    import errno
    import os
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    printed = []
    monkeypatch.setattr(threading, "excepthook", printed.append)  # what the thread would print

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(RecordWriter, "write", full)
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log({"step": 1, "kind": "train", "loss": 1.0})
    for thread in threading.enumerate():  # the writer thread fails on the first event
        if type(thread).__module__.startswith("tensorboard."):
            thread.join(timeout=10)
    for step in (2, 3):
        log.log({"step": step, "kind": "train", "loss": 1.0 / step})
    log.close()
    assert printed == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: TensorBoard logging stopped" in err and "No space left on device" in err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_metrics_file_that_cannot_be_replaced_on_resume_is_one_line(tmp_path, monkeypatch):
    """Seen in review: `pretrain --resume` with an immutable metrics.jsonl ended in a PermissionError
    traceback; the rewritten metrics are kept and named instead."""
    import errno
    import os

    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log({"step": step, "kind": "train", "loss": 1.0})
    replace = os.replace

    def refused(src, dst):
        if str(dst) == str(log.path):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match="cannot replace .*metrics.jsonl \\(Operation not permitted.*kept in") as e:
        log.truncate_after(2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fails", ["write", "rename"])
def test_a_loss_plot_that_cannot_be_written_says_the_run_is_saved_and_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                                                fails):
    """Seen in review: on a full disk savefig left .loss.png.tmp.png behind, and the error hid that the
    final checkpoint, saved just before, is safe."""
    import errno
    import os

    from lmforge.train.metrics import plot_loss

    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2):
        log.log({"step": step, "kind": "train", "loss": 1.0 / step})
    real_fsync, replace = os.fsync, os.replace

    def fsync(fd):
        if fails == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def refused(src, dst):
        if fails == "rename":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match="the run finished and its checkpoints are saved, but .*loss.png") as e:
        plot_loss(log.path, tmp_path / "loss.png")
    assert "\n" not in str(e.value)
    left = sorted(p.name for p in tmp_path.iterdir())
    if fails == "write":
        assert "No space left on device" in str(e.value) and "--resume" in str(e.value)
        assert left == ["metrics.jsonl"]
    else:  # the drawn plot is kept, named in the error
        (kept,) = [name for name in left if name != "metrics.jsonl"]
        assert kept in str(e.value)
