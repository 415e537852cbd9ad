"""Progress of a Ray job in its logs: done / total, rate and ETA, one line per interval.

Ray Data's progress bars draw on a terminal only; nightly jobs are read in
``ray job logs``. Workers add what they finish to a ``ProgressCounter``
actor, or to a job's own actor that keeps a ``ProgressTally`` (one process
fewer to start); a thread on the driver reads it every interval and prints
a line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import ray

__all__ = ["ProgressCounter", "ProgressLog", "ProgressTally", "format_duration"]


class ProgressTally:
    """Counts finished items across workers, and when the work itself started and last finished."""

    def __init__(self) -> None:
        self.done = self.failed = 0
        self.first_started: float | None = None
        self.last_finished: float | None = None

    def add(self, done: int, failed: int, started: float, finished: float) -> None:
        self.done += done
        self.failed += failed
        self.first_started = started if self.first_started is None else min(self.first_started, started)
        self.last_finished = finished if self.last_finished is None else max(self.last_finished, finished)

    def snapshot(self) -> dict:
        working = (self.last_finished - self.first_started) if self.first_started is not None else 0.0
        return {"done": self.done, "failed": self.failed, "working_seconds": working}


ProgressCounter = ray.remote(num_cpus=0)(ProgressTally)


class ProgressLog:
    """While open, prints ``[label] done/total images, rate, ETA`` every ``interval_s`` seconds.

    ``total`` is a number, or a function giving the total known so far (work
    whose listing streams in with it): lines then say that the total grows until
    the listing finishes. ``line(snapshot, total=...)`` gives the final count.
    """

    def __init__(
        self,
        counter,
        total: int | Callable[[], int],
        *,
        interval_s: float,
        prefix: str = "[label]",
        unit: str = "images",
    ):
        self.counter, self.total, self.interval_s, self.prefix, self.unit = counter, total, interval_s, prefix, unit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-log", daemon=True)

    def __enter__(self) -> ProgressLog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def line(self, snapshot: dict, total: int | None = None) -> str:
        """The progress line; ``total`` (or a number given as ``total`` at the start) is final."""
        final = total is not None or not callable(self.total)
        total = total if total is not None else (self.total if final else self.total())
        done, working = snapshot["done"], snapshot["working_seconds"]
        rate = done / working if working > 0 else 0.0
        eta = format_duration(max(total - done, 0) / rate) if rate > 0 else "unknown"
        if not final:
            return (
                f"{self.prefix} {done}/{total} {self.unit} listed so far ({snapshot['failed']} errors; the total "
                f"grows until the listing finishes), {rate:.2f} {self.unit}/s, ETA {eta} for those listed so far"
            )
        percent = 100.0 * done / total if total else 100.0
        return (
            f"{self.prefix} {done}/{total} {self.unit} ({percent:.1f} %, {snapshot['failed']} errors), "
            f"{rate:.2f} {self.unit}/s, ETA {eta}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                snapshot = ray.get(self.counter.snapshot.remote(), timeout=self.interval_s)
                line = self.line(snapshot)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                continue
            print(line, flush=True)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``; ``65`` -> ``1m05s``; ``4.2`` -> ``4s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
