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
