"""bench/distributed_train.py: a process count it cannot run, and a run that fails, end in one line and a non-zero exit."""

import pytest
from conftest import bench_module


def test_a_process_count_that_does_not_divide_the_micro_batches_is_refused(monkeypatch, capsys):
    """Seen in review: --nprocs 3 with 2 global micro-batches printed nothing and exited 0."""
    bench = bench_module("distributed_train", monkeypatch)
    monkeypatch.setattr("sys.argv", ["distributed_train.py", "--nprocs", "1", "3"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --nprocs 3 does not divide --global-micro-batches 2; pass process counts that divide it, or more micro-batches")


@pytest.mark.slow
def test_a_failing_run_says_why_in_lmforges_words(monkeypatch, capsys):
    """Seen in review: --batch-size 0 ended in a CalledProcessError traceback; lmforge's own line was swallowed."""
    bench = bench_module("distributed_train", monkeypatch)
    monkeypatch.setattr("sys.argv", ["distributed_train.py", "--nprocs", "1", "--batch-size", "0", "--steps", "10"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == ("distributed_train: the run on 1 process(es) failed: "
                            "lmforge: error: train.batch_size must be >= 1, got 0")
