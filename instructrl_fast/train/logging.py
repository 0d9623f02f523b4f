"""Metrics to a CSV file (one row per logged step, the columns fixed by the first row) and to TensorBoard; the
final metrics of a stage read back from its CSV; progress bars that stay small in a log file."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from pathlib import Path

# Seconds between two progress-bar updates when stderr is not a terminal (a log file): sparse lines, not a
# redraw per step (a demo run wrote a 561 KB log of carriage-return redraws).
LOG_FILE_PROGRESS_INTERVAL_S = 30


class MetricsLogger:
    """Appends ``{step, metric: value}`` rows to ``<out>/metrics.csv`` and, when installed, TensorBoard.

    ``fields`` fixes the columns up front (rows may leave some empty, e.g. eval metrics); without it the first row
    fixes them.

    On resume from step ``s`` the rows past ``s`` (written after the checkpoint the run resumes from) are dropped, so
    the CSV of an interrupted-then-resumed run equals an uninterrupted one.
    """

    def __init__(self, out_dir: str | os.PathLike, *, fields: list[str] | None = None, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        self._fields: list[str] | None = None
        rows: list[dict] = []
        if resume_step is not None and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self._fields = reader.fieldnames
                # a SIGKILL can leave a torn last row: keep only complete rows up to the resumed step
                rows = [r for r in reader if None not in r.values() and r["step"].isdigit()
                        and int(r["step"]) <= resume_step]
        self._file = open(self.csv_path, "w", newline="")  # noqa: SIM115 (held open for the run; see close())
        self._writer = None
        if self._fields is None and fields is not None:
            self._fields = ["step", *fields]
        if self._fields:
            self._open_writer(self._fields)
            self._writer.writerows(rows)
            self._file.flush()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: the CSV is always written
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=resume_step)

    def _open_writer(self, fields: list[str]) -> None:
        self._fields = list(fields)
        self._writer = csv.DictWriter(self._file, fieldnames=self._fields)
        if self._file.tell() == 0:
            self._writer.writeheader()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One row; ``metrics`` values are Python numbers (the caller syncs once per log row, not per metric)."""
        row = {"step": step, **metrics}
        if self._writer is None:
            self._open_writer(list(row))
        unknown = set(row) - set(self._fields)
        if unknown:
            raise ValueError(f"metrics has keys {sorted(unknown)} not among the CSV columns {self._fields}")
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def last_values(csv_path: str | os.PathLike) -> dict[str, float]:
    """The last finite value of every numeric column of a metrics CSV (``step``: the last logged step): a stage's
    final training statistics, e.g. PPO's reward and KL, whose validation metrics are empty."""
    out: dict[str, float] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for key, text in row.items():
                try:
                    value = float(text)
                except (TypeError, ValueError):  # an empty cell: the metric was not logged at this step
                    continue
                if math.isfinite(value):
                    out[key] = value
    if "step" in out:
        out["step"] = int(out["step"])
    return out


class _LineStream:
    """A text stream for a log file: tqdm's carriage-return redraws become plain lines, at most one per
    ``interval`` seconds per stream plus each bar's final state (the loop refreshes its bar on every step)."""

    def __init__(self, stream, interval: float):
        self._stream, self._interval = stream, interval
        self._last = -math.inf
        self._pending: str | None = None  # the newest redraw not written yet
        self._open = False  # a bar is being drawn (its closing newline ends it, written or not)
        # the progress of the last line written (desc, percentage, n/total): a closing bar redraws its final state
        # once more, with only its timings changed
        self._written: str | None = None

    def write(self, text: str) -> int:
        now = time.monotonic()
        if text.startswith("\r"):  # a redraw of the current bar
            self._pending, self._open = text[1:].rstrip(), True
            if now - self._last >= self._interval:
                self._emit(now)
        elif text == "\n" and self._open:  # a bar closing: its final state
            self._emit(now)
            self._open = False
        else:
            self._stream.write(text)
        return len(text)

    def _emit(self, now: float) -> None:
        progress = self._pending.split(" [", 1)[0] if self._pending else None
        if progress and progress != self._written:
            self._stream.write(self._pending + "\n")
            self._stream.flush()
            self._written = progress
        self._pending, self._last = None, now

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def progress_for_logs(interval: float = LOG_FILE_PROGRESS_INTERVAL_S):
    """While active, progress bars written to a stderr that is not a terminal come out as plain lines, at most one
    per ``interval`` seconds (and each bar's final line); on a terminal nothing changes."""
    if sys.stderr.isatty():
        yield
        return
    saved, sys.stderr = sys.stderr, _LineStream(sys.stderr, interval)
    try:
        yield
    finally:
        sys.stderr = saved
