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
