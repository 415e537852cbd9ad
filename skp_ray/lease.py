"""One writer per output folder: a lease file with its owner, host and a heartbeat.

A run takes ``<output>/_lease.json`` before it writes and gives it back when it
ends; while it runs, a thread renews the heartbeat. Another run finding a
live lease is refused with a message saying who holds it. A lease whose
heartbeat is older than ``stale_after_s``, or whose process is gone from this
host, is stale and is taken over. On a local disk the file is created
exclusively; on object storage (no atomic create) the lease is written, then
read back after a moment to check that no other run wrote over it.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time

import fsspec

from skp_ray.images import is_local_filesystem

__all__ = ["LEASE_FILE", "LeaseHeldError", "OutputLease"]

LEASE_FILE = "_lease.json"
# How long a remote writer waits before reading its lease back (two writers racing for one lease).
SETTLE_SECONDS = 1.0


class LeaseHeldError(RuntimeError):
    """Another run holds the output's lease."""


class OutputLease:
    """The lease on ``output`` for ``owner`` (a run id); use as a context manager."""

    def __init__(
        self, output: str, owner: str, *, stale_after_s: float = 300.0, heartbeat_s: float | None = None, tag: str = "label"
    ):
        self.output, self.owner, self.stale_after_s, self.tag = output, owner, stale_after_s, tag  # tag: the log prefix
        self.heartbeat_s = heartbeat_s or max(1.0, stale_after_s / 5)
        self.fs, folder = fsspec.core.url_to_fs(output)
        self.path = posixpath.join(folder, LEASE_FILE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeldError (an OSError if the output cannot be written)."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        held = self._read()
        if held is not None and not self._is_stale(held):
            raise LeaseHeldError(self._held_message(held))
        if held is not None:
            print(f"[{self.tag}] taking over a stale lease on {self.output} (owner {held.get('owner')}, {self._age(held):.0f} s old)")
            self.fs.rm_file(self.path)
        self._create()
        self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.fs.rm_file(self.path)

    def _record(self) -> bytes:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        return json.dumps(record).encode()

    def _create(self) -> None:
        if is_local_filesystem(self.fs):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise LeaseHeldError(self._held_message(self._read() or {})) from None
            with os.fdopen(descriptor, "wb") as f:
                f.write(self._record())
            return
        self.fs.pipe_file(self.path, self._record())
        time.sleep(SETTLE_SECONDS)
        held = self._read()
        if held is None or held.get("owner") != self.owner:
            raise LeaseHeldError(self._held_message(held or {}))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self._read()
            if held is None or held.get("owner") != self.owner:
                print(f"[label] warning: the lease on {self.output} was taken by another run ({held})")
                return
            self.fs.pipe_file(self.path, self._record())

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lease: treat it as stale
            return {"heartbeat": 0}

    def _age(self, held: dict) -> float:
        return time.time() - float(held.get("heartbeat", 0))

    def _is_stale(self, held: dict) -> bool:
        if self._age(held) > self.stale_after_s:
            return True
        return held.get("host") == socket.gethostname() and not _process_alive(held.get("pid"))

    def _held_message(self, held: dict) -> str:
        return (
            f"another labelling run is writing to {self.output}: run {held.get('owner')} on host "
            f"{held.get('host')} (pid {held.get('pid')}), last heartbeat {self._age(held):.0f} s ago. "
            f"Wait for it to finish; if it is dead, its lease goes stale {self.stale_after_s:.0f} s after its "
            f"last heartbeat (--lease_timeout_s), or delete {self.path} if you are sure."
        )


def _process_alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: trust the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

