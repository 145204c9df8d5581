"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard, plotted as PNG."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_write_bytes, atomic_write_text, read_jsonl


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self._tb = None
        self._tensorboard = tensorboard  # the writer starts with the first row: a refused resume leaves no event file
        self._purge_step: int | None = None

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run rewrites what the interrupted one logged after it), in
        TensorBoard too: its events past `step` are dropped when it reads the directory."""
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._purge_step = step + 1

    def last(self, kind: str) -> dict[str, Any] | None:
        """The last row of `kind` ("train", "val") logged so far, or None."""
        return next((r for r in reversed(read_metrics(self.path)) if r.get("kind") == kind), None)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        try:
            if self._tensorboard and self._tb is None:
                from torch.utils.tensorboard import SummaryWriter  # imported lazily: it takes a second

                _quiet_tensorboard_thread()
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
            if self._tb is not None:
                for key, value in row.items():
                    if key not in ("step", "kind") and isinstance(value, (int, float)):
                        self._tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])
        except OSError as e:
            self._tensorboard_failed(e)

    def _tensorboard_failed(self, e: OSError) -> None:
        """TensorBoard only mirrors metrics.jsonl: a failed event write (a full disk, raised here from
        its writer thread) turns it off with one warning, and the run goes on; a disk that is full
        indeed fails the next checkpoint or metrics row, which says so in one line."""
        self._tensorboard, tb, self._tb = False, self._tb, None
        # tqdm.write: a line of its own above the progress bar, not glued to its end
        tqdm.write(f"lmforge: warning: TensorBoard logging stopped: cannot write {self.run_dir / 'tensorboard'} "
                   f"({e.strerror or e}); metrics.jsonl keeps the record", file=sys.stderr)
        if tb is not None:
            with contextlib.suppress(OSError):  # the same failure again, on the events still buffered
                tb.close()

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as e:
                self._tensorboard_failed(e)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes events on a thread, which prints a traceback when a write fails (a full disk)
    before the next `add_scalar` raises the same error where MetricsLog reports it in one line: leave
    that thread's OSErrors to MetricsLog. Every other thread, and every other error, is printed."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):  # installed already
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, less a torn last line.

    `MetricsLog.log` appends, so a process killed (or a disk filled) mid-write leaves part of a row
    at the end: that row's step comes after the last checkpoint and is logged again on resume. A bad
    row before the last one is not what an interrupted append leaves, and is named instead.
    """
    if not path.exists():
        return []
    try:
        lines = read_jsonl(path)
    except OSError as e:  # a directory in its place, no permission
        raise UserError(f"{path} cannot be read as the run's metrics ({e.strerror}); move it aside (each checkpoint "
                        "keeps a copy of the metrics) and resume") from None
    rows = []
    for n, (number, row, error) in enumerate(lines, 1):
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif n < len(lines):
            why = error or f"a {type(row).__name__}"
            raise UserError(f"{path}:{number} is not a JSON object with a step ({why}); delete that line (or the file: "
                            "each checkpoint keeps a copy) and resume")
    return rows


def plot_loss(metrics_path: Path, out_png: Path) -> Path:
    """Training and validation loss against step, as a PNG next to the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()  # drawn in memory, written as any output: no temporary file left on a full disk
    fig.savefig(png, format="png")
    plt.close(fig)
    # The plot comes after the final checkpoint: its error says that the run is not lost. An error,
    # not a warning: the summary's "loss curve: PATH" would name a missing or an earlier run's plot.
    saved = "the run finished and its checkpoints are saved, but"
    try:
        atomic_write_bytes(out_png, png.getvalue())
    except OSError as e:
        raise UserError(f"{saved} {out_png} cannot be written ({e.strerror}); free space and run the same command "
                        "with --resume to draw the loss curve") from None
    except UserError as e:
        raise UserError(f"{saved} {e}") from None
    return out_png


class NoMetrics(MetricsLog):
    """What a rank other than 0 logs to: nothing (rank 0 writes the run's metrics)."""

    def __init__(self) -> None:
        self.path, self.run_dir, self._tb, self._tensorboard = None, None, None, False

    def truncate_after(self, step: int) -> None:
        pass

    def last(self, kind: str) -> dict[str, Any] | None:
        return None

    def log(self, row: dict[str, Any]) -> None:
        pass
