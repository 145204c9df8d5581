"""The table a scaling study is fitted from: `DIR/results.jsonl`, one JSON object per training run.

Each line describes one finished run:

    key              type                        required  meaning
    params           int                         yes       every parameter, embeddings included, tied
                                                           weights once (Hoffmann et al.'s N; `flops()["params"]`)
    tokens           number                      yes       training tokens D
    loss             number                      yes       final validation loss, nats/token
    params_no_embed  int                         no        without token/position embeddings (Kaplan's N);
                                                           defaults to `params`
    flops            number                      no        training compute C, measured or 6·N·D;
                                                           defaults to 6 * params * tokens (what
                                                           `sweep` writes: N with embeddings)
    budget           number                      no        the isoFLOP budget the run was planned for;
                                                           approach 2 groups runs by it (without it,
                                                           runs whose `flops` agree within 10% form a budget)
    seconds          number                      no        wall time of the run (from `sweep`: over
                                                           every attempt, interrupted ones included)
    config           object                      no        the run's ModelConfig as a dict
    curve            [[tokens_seen, val_loss]]   no        the validation curve; approach 1 and the
                                                           compute frontier use it
    sweep            object                      no        what every run of its study shares: `data`
                                                           (tokenizer hash, split token counts), `train`
                                                           and `model` settings; rows that hold it must
                                                           agree on every setting both record

Other keys (a run name, the learning rate, ...) are allowed and ignored; `sweep` also writes `name` and
`flops_chinchilla` (the appendix F count of `flops()`, for comparison; the fits use `flops`). Rows
written before a key existed still load: every optional key has its default, and a row without `sweep`
is checked against no other. For example:

    {"params": 124475904, "params_no_embed": 85056000, "tokens": 2.5e9, "flops": 1.87e18,
     "loss": 3.31, "seconds": 5400, "curve": [[5e8, 3.9], [1e9, 3.6], [2.5e9, 3.31]]}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmforge.utils.errors import UserError
from lmforge.utils.fs import read_jsonl

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Run:
    """One training run of a scaling study; see the module docstring for what each field means."""

    params: float
    tokens: float
    loss: float
    params_no_embed: float | None = None
    flops: float | None = None
    budget: float | None = None
    seconds: float | None = None
    curve: tuple[tuple[float, float], ...] = ()
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.params_no_embed is None:
            object.__setattr__(self, "params_no_embed", self.params)
        if self.flops is None:
            object.__setattr__(self, "flops", 6.0 * self.params * self.tokens)

    def points(self) -> list[tuple[float, float, float]]:
        """(tokens_seen, compute, loss) along the curve, ending with the final result.

        Compute at an intermediate point scales the run's `flops` by the fraction of tokens seen.
        """
        pts = {t: loss for t, loss in self.curve}
        pts[self.tokens] = self.loss
        return [(t, self.flops * t / self.tokens, loss) for t, loss in sorted(pts.items())]


def finite_number(value: Any) -> bool:
    """A number (not a bool) that is finite. An int past float range, which JSON and YAML read as they
    do any other (10**400), is not: math.isfinite raises OverflowError on it."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(row: dict, key: str, where: str, required: bool, positive: bool = True) -> float | None:
    value = row.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: missing {key!r}; every run needs 'params', 'tokens' and 'loss'")
        return None
    if not finite_number(value):
        raise UserError(f"{where}: {key!r} must be a finite number, got {short_repr(value)}; fix that line")
    if value < 0 or (positive and value == 0):
        raise UserError(f"{where}: {key!r} must be {'> 0' if positive else '>= 0'}, got {value!r}; fix that line")
    return value


def _curve(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    ok = isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2
        and all(finite_number(v) and v > 0 for v in p)
        for p in value
    )
    if not ok:
        raise UserError(f"{where}: 'curve' must be a list of [tokens_seen, val_loss] pairs, all > 0; fix that line")
    return tuple((float(t), float(loss)) for t, loss in value)


def parse_run(row: Any, where: str) -> Run:
    """A `Run` from one decoded results.jsonl line; `where` ("file:line") prefixes every error."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(row).__name__}; fix that line")
    config = row.get("config")
    if config is not None and not isinstance(config, dict):
        raise UserError(f"{where}: 'config' must be a JSON object; fix that line")
    return Run(
        params=_number(row, "params", where, required=True),
        tokens=_number(row, "tokens", where, required=True),
        loss=_number(row, "loss", where, required=True),
        params_no_embed=_number(row, "params_no_embed", where, required=False),
        flops=_number(row, "flops", where, required=False),
        budget=_number(row, "budget", where, required=False),
        seconds=_number(row, "seconds", where, required=False, positive=False),
        curve=_curve(row["curve"], where) if row.get("curve") is not None else (),
        config=config,
    )


def read_rows(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """("file:line", decoded JSON) for each non-blank line of a results.jsonl; a malformed line names file:line."""
    rows = []
    for number, row, error in read_jsonl(path):
        if error:
            raise UserError(f"{path}:{number}: not valid JSON ({error}); fix or delete that line")
        rows.append((f"{path}:{number}", row))
    return rows


def read_runs(directory: str | os.PathLike) -> list[Run]:
    """Every run in `directory/results.jsonl`; blank lines are skipped, anything malformed names file:line."""
    directory = Path(directory)
    path = directory / RESULTS
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass the scaling-study directory that holds {RESULTS}")
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; write one JSON object per training run there (schema: lmforge.scaling.runs)"
        )
    rows = read_rows(path)
    runs = [parse_run(row, where) for where, row in rows]
    if not runs:
        raise UserError(f"{path} holds no runs; add one JSON object per finished training run")
    first = None  # (where, settings) of the first row that records its sweep's settings
    for where, row in rows:
        settings = sweep_settings(row, where)
        if settings is None:
            continue
        if first is None:
            first = where, settings
        elif differences := setting_differences(first[1], settings):
            # Runs on other data or with other training settings do not lie on one scaling law: a fit
            # across them would be silently wrong.
            raise UserError(
                f"{where}: this run was trained with other settings than {first[0]} ({differences}); the runs of "
                "one study must share their data and training settings: fit each sweep's rows in a directory of its own"
            )
    return runs


def sweep_settings(row: dict, where: str) -> dict[str, Any] | None:
    """The `sweep` settings a row records (None for a row without: written by hand or before they were)."""
    settings = row.get("sweep")
    if settings is not None and not isinstance(settings, dict):
        raise UserError(f"{where}: 'sweep' must be a JSON object of the sweep's settings; fix that line")
    return settings


def setting_differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 3) -> str:
    """'key: old vs new' for the first `limit` settings (nested keys dotted) that both record and that
    differ, '' when none do. A key only one side records is no difference: a newer lmforge may record
    more settings than the one that wrote a row."""
    found: list[str] = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key in a:
            if key not in b:
                continue
            if isinstance(a[key], dict) and isinstance(b[key], dict):
                walk(a[key], b[key], f"{prefix}{key}.")
            elif a[key] != b[key]:
                found.append(f"{prefix}{key}: {short_repr(a[key])} vs {short_repr(b[key])}")

    walk(recorded, current, "")
    more = f", and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def short_repr(value: Any) -> str:
    """repr(value), cut after 15 characters: enough to tell two sha256 apart, or to show that an int is huge."""
    text = repr(value)
    return text if len(text) <= 16 else text[:15] + "..."


def lower_envelope(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points no point at smaller or equal x beats: the running minimum of loss along x."""
    order = np.lexsort((loss, x))
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return x[keep], loss[keep]


def frontier(runs: Sequence[Run], non_embedding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(compute, loss) of the compute-efficient frontier: the lowest loss any run reached by each compute.

    Every point of every curve counts, as in Kaplan et al. 2020, figure 1 and Hoffmann et al. 2022, figure 2.
    Compute is each run's `flops`, or with `non_embedding` Kaplan's C = 6 N D with N the non-embedding
    count (Kaplan et al. 2020, section 2.1).
    """
    pts = np.array([(6.0 * r.params_no_embed * t if non_embedding else c, loss)
                    for r in runs for t, c, loss in r.points()])
    return lower_envelope(pts[:, 0], pts[:, 1])


def isoflop_profiles(runs: Sequence[Run], tolerance: float = 0.1) -> list[tuple[float, list[Run]]]:
    """Runs grouped by compute budget, sorted by budget: (budget, runs) per isoFLOP profile.

    Runs with a `budget` are grouped by it; the others, sorted by `flops`, join the current group while
    within `tolerance` of its cheapest run, and their budget is the geometric mean of the group's flops.
    """
    groups: dict[float, list[Run]] = {}
    for r in runs:
        if r.budget is not None:
            groups.setdefault(float(r.budget), []).append(r)
    current: list[Run] = []
    for r in sorted((r for r in runs if r.budget is None), key=lambda r: r.flops):
        if current and r.flops > current[0].flops * (1 + tolerance):
            groups.setdefault(float(np.exp(np.mean(np.log([q.flops for q in current])))), []).extend(current)
            current = []
        current.append(r)
    if current:
        groups.setdefault(float(np.exp(np.mean(np.log([q.flops for q in current])))), []).extend(current)
    return sorted(groups.items())
