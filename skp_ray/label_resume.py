"""Which listed images still need a row: a streaming anti-join against the output's rows, and one row per URI.

One ``PendingImages`` actor holds, off the driver, the sorted ids of the images
the output already has (``row_store.done_id_array``: read from our own files
only, batch by batch) and the ids listed so far in this run. Each block of
listed sources asks it which of its rows to label (``pending_sources``): the
first listing of an id that has no row. Blocks stream through it as the
listing produces them, so labelling starts before the listing ends (a join in
Ray Data would hash-shuffle both sides first, holding every row back until the
whole input is listed).

A block's answer is kept under the hash of its rows, so a task that Ray
retries after a crash gets the same answer for the same rows instead of
finding its own ids already taken (which would lose them for this run).

The same actor counts what the detectors finish (a ``ProgressTally``), so a
run starts one bookkeeping process rather than two.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from skp_ray.progress import ProgressTally
from skp_ray.row_store import RowFiles, done_id_array

__all__ = ["PendingImages", "pending_sources", "block_key"]


@ray.remote(num_cpus=0, max_restarts=0)
class PendingImages:
    """The resume filter: ids the output has, ids listed in this run, and the counts the summary and the
    progress lines report."""

    def __init__(self, files: RowFiles, retry_errors: bool):
        self.progress = ProgressTally()
        self.done = done_id_array(files, retry_errors=retry_errors)
        self.seen: set[bytes] = set()
        self.answers: dict[str, np.ndarray] = {}
        self.listed = self.already = 0

    def claim(self, ids: np.ndarray, key: str) -> np.ndarray:
        """Which of a block's rows to label: an id's first listing in this run, when the output has no row
        for it (bool per row). ``key`` names the block's rows; asking again with it gets the same answer."""
        if key in self.answers:
            return self.answers[key]
        ids = np.asarray(ids, dtype="S")
        first = np.zeros(len(ids), dtype=bool)
        for i, image in enumerate(ids):
            if image not in self.seen:
                self.seen.add(image)
                first[i] = True
        labelled = _members(self.done, ids) & first
        self.listed += int(first.sum())
        self.already += int(labelled.sum())
        self.answers[key] = first & ~labelled
        return self.answers[key]

    def totals(self) -> dict:
        """Distinct images listed so far, and how many of them the output already had."""
        return {"listed": self.listed, "already_labelled": self.already}

    def add(self, done: int, failed: int, started: float, finished: float) -> None:
        """What a detector finished (``ProgressTally.add``)."""
        self.progress.add(done, failed, started, finished)

    def snapshot(self) -> dict:
        return self.progress.snapshot()


def _members(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of ``ids`` is in ``sorted_ids`` (binary search)."""
    if not len(sorted_ids) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def block_key(block: pa.Table) -> str:
    """A hash of a block's rows (where each was listed from, its URI, crop and mask)."""
    digest = hashlib.sha256()
    for name in ("listed_from", "uri", "mask_uri"):
        digest.update("\n".join(block[name].to_pylist()).encode())
    digest.update(block["has_crop"].to_numpy(zero_copy_only=False).tobytes())
    digest.update(pc.list_flatten(block["crop_box"].combine_chunks().storage).to_numpy().tobytes())
    return digest.hexdigest()


def pending_sources(block: pa.Table, pending) -> pa.Table:
    """Ray task: the block's rows that need a row in the output (see ``PendingImages.claim``), without
    ``listed_from``."""
    if block.num_rows == 0:
        return block.drop_columns(["listed_from"])
    keep = ray.get(pending.claim.remote(block["image_id"].to_numpy(zero_copy_only=False), block_key(block)))
    return block.filter(pa.array(keep)).drop_columns(["listed_from"])
