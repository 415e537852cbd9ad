"""The labelling job's output folder: its Parquet rows, how they are recognised, read back and summarised.

The job writes files named ``labels-<run id>-<write id>-<n>.parquet`` at the top
of ``--output``, each carrying ``OUTPUT_SCHEMA`` with the schema metadata
``skp_ray.labels``. Only files with both the name and the metadata are read
for resume or by ``read_labels``; everything else in the folder (a user's own
table, a manifest in a subfolder) is left alone. A file with our name that
cannot be read (a write cut off by a crash) is renamed ``_incomplete-<name>``
and its images are labelled again; names starting with "_" are skipped by
Parquet readers.

An image can have several rows (an error row, then an ok row written by a
``--retry_errors`` run): the newest ``labelled_at`` wins.
"""

from __future__ import annotations

import json
import posixpath
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["OUTPUT_SCHEMA", "LabelFiles", "label_files", "read_labels", "labelled_ids", "write_summary"]

# Written into every file's schema; a reader checks it before trusting a file as ours.
FORMAT_KEY = b"skp_ray.labels"
FORMAT_VERSION = b"1"
FILE_PATTERN = re.compile(r"^labels-[0-9a-f]+-.+\.parquet$")
SUMMARY_FOLDER = "_summary"

# One row per input image. Keypoints are [K][2] lists: (x, y) in original-image pixels
# (a pixel's centre at index + 0.5) and (x, y) normalised to [0, 1] in the frame the model saw:
# the manifest's crop box when it gives one (crop_box), else the whole image (width, height).
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("crop_box", pa.list_(pa.int32())),
        ("keypoints_xy", pa.list_(pa.list_(pa.float32()))),
        ("keypoints_xy_normalized", pa.list_(pa.list_(pa.float32()))),
        ("peaks", pa.list_(pa.float32())),
        ("artifact_id", pa.string()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("error_cause", pa.string()),
        ("error", pa.string()),
        ("labelled_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
    ],
    metadata={FORMAT_KEY: FORMAT_VERSION},
)


def label_file_name(run_id: str, write_id: str, task_index: int) -> str:
    """The name of one file of rows (Ray Data appends ``-<block>`` before the extension)."""
    return f"labels-{run_id}-{write_id}-{task_index:06d}.parquet"


class LabelFiles:
    """The output's files: ``ours`` (paths on ``filesystem``), and the names of ``foreign`` ones we skip."""

    def __init__(self, filesystem: pafs.FileSystem, ours: list[str], foreign: list[str]):
        self.filesystem, self.ours, self.foreign = filesystem, ours, foreign

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every row of our files (all their rows, older ones included), with ``columns`` only if given."""
        tables = [pq.read_table(path, columns=columns, filesystem=self.filesystem) for path in self.ours]
        schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
        tables = [table.select(schema.names).cast(schema) for table in tables]
        return pa.concat_tables(tables) if tables else schema.empty_table()


def label_files(output: str, *, log=print) -> LabelFiles:
    """The label files at the top of ``output``; foreign files are named once through ``log``.

    Our files that cannot be read are renamed ``_incomplete-<name>`` (their images are labelled again).
    """
    path, filesystem = parquet_location(output)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return LabelFiles(filesystem, [], [])
    ours, foreign = [], []
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = info.base_name
        if name.startswith(("_", ".")):
            continue  # our lease, summaries and set-aside files; hidden files
        if info.type != pafs.FileType.File or not FILE_PATTERN.match(name):
            foreign.append(name)
            continue
        try:
            metadata = pq.read_schema(info.path, filesystem=filesystem).metadata or {}
        except (pa.ArrowInvalid, OSError) as error:
            aside = posixpath.join(posixpath.dirname(info.path), "_incomplete-" + name)
            log(f"[label] {info.path} cannot be read ({error}); moved to {aside}, its images are labelled again")
            filesystem.move(info.path, aside)
            continue
        if metadata.get(FORMAT_KEY) == FORMAT_VERSION:
            ours.append(info.path)
        else:
            foreign.append(name)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        log(f"[label] ignoring {len(foreign)} entries in {output} that this job did not write: {shown}")
    return LabelFiles(filesystem, sorted(ours), foreign)


def newest_per_image(table: pa.Table) -> pa.Table:
    """One row per ``image_id``: the one with the newest ``labelled_at`` (ties: the later file's row)."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        pa.table({"id": table["image_id"], "at": table["labelled_at"], "n": np.arange(table.num_rows)}),
        sort_keys=[("id", "ascending"), ("at", "descending"), ("n", "descending")],
    )
    ids = pc.take(table["image_id"], order).to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return table.take(pc.take(order, pa.array(np.flatnonzero(first))))


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """The labels at ``output`` as one row per image (the newest row of each), ``OUTPUT_SCHEMA`` columns.

    Raises ValueError when ``output`` holds no label files written by ``jobs/label.py``.
    """
    files = label_files(output, log=lambda _: None)
    if not files.ours:
        raise ValueError(f"{output!r} holds no label files written by jobs/label.py (labels-*.parquet)")
    wanted = None if columns is None else list(dict.fromkeys(["image_id", "labelled_at", *columns]))
    table = newest_per_image(files.read(wanted))
    return table if columns is None else table.select(columns)


def labelled_ids(files: LabelFiles, *, retry_errors: bool = False) -> set[str]:
    """Ids of the images that need no labelling: any row, or with ``retry_errors`` an ok row."""
    table = files.read(["image_id", "status"])
    if retry_errors:
        table = table.filter(pc.equal(table["status"], "ok"))
    return set(table.column("image_id").to_pylist())


def write_summary(output: str, run_id: str, record: dict) -> str:
    """``<output>/_summary/<run_id>.json``; returns its URI."""
    fs, path = fsspec.core.url_to_fs(output)
    folder = posixpath.join(path, SUMMARY_FOLDER)
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(posixpath.join(folder, f"{run_id}.json"), json.dumps(record, indent=2).encode())
    return f"{output.rstrip('/')}/{SUMMARY_FOLDER}/{run_id}.json"


def parquet_location(output: str) -> tuple[str, pafs.FileSystem]:
    """The output as a path on a pyarrow filesystem: fsspec's (s3fs, gcsfs, ...) for URLs, so every
    store fsspec knows works, with the same credentials and settings as the image reads."""
    if "://" not in output:
        return output, pafs.LocalFileSystem()
    filesystem, path = fsspec.core.url_to_fs(output)
    filesystem.invalidate_cache(path)  # object-store listings are cached per process; ask the store itself
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
