"""A batch job's output folder of Parquet rows: how its files are named, recognised, read back and summarised.

A job (labelling, correspondence) writes files named ``<prefix>-<run id>-<write id>-<n>.parquet``
at the top of its ``--output``, each carrying the job's schema with a schema
metadata key of its own (``RowFormat``). Only files with both the name and the
metadata are read for resume or by readers; everything else in the folder (a
user's own table, a manifest in a subfolder) is left alone. A file with our
name that cannot be read (a write cut off by a crash) is renamed
``_incomplete-<name>`` and its items are processed again; names starting with
"_" are skipped by Parquet readers.

An item can have several rows (an error row, then an ok row written by a
``--retry_errors`` run): the newest row (by the format's time column) wins.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

SUMMARY_FOLDER = "_summary"
FORMAT_VERSION = b"1"


@dataclass(frozen=True)
class RowFormat:
    """One job's rows: file prefix, schema (its metadata marks the files as ours), id and time columns."""

    prefix: str  # "labels" -> labels-<run>-<write>-<n>.parquet
    schema: pa.Schema  # carries {metadata_key: FORMAT_VERSION}
    metadata_key: bytes
    id_column: str  # one item (image, pair) per id
    time_column: str  # the newest row of an id wins
    job: str  # the job that writes them, for messages: "jobs/label.py"
    tag: str  # log prefix: "label"
    noun: str  # what the files hold, for messages: "label files"
    own_files: tuple[str, ...] = ()  # other files the job writes at the top of its output (metrics, pictures)

    def file_name(self, run_id: str, write_id: str, task_index: int) -> str:
        """The name of one file of rows (Ray Data appends ``-<block>`` before the extension)."""
        return f"{self.prefix}-{run_id}-{write_id}-{task_index:06d}.parquet"

    def is_run_file_name(self, name: str, run_id: str) -> bool:
        """Whether ``name`` is one of the files that run ``run_id`` wrote."""
        return self.is_file_name(name) and name.startswith(f"{self.prefix}-{run_id}-")

    def is_file_name(self, name: str) -> bool:
        return re.match(rf"^{re.escape(self.prefix)}-[0-9a-f]+-.+\.parquet$", name) is not None


def with_format_metadata(schema: pa.Schema, key: bytes) -> pa.Schema:
    return schema.with_metadata({key: FORMAT_VERSION})


class RowFiles:
    """The output's files: ``ours`` (paths on ``filesystem``), and the names of ``foreign`` ones we skip."""

    def __init__(self, row_format: RowFormat, filesystem: pafs.FileSystem, ours: list[str], foreign: list[str]):
        self.format, self.filesystem, self.ours, self.foreign = row_format, filesystem, ours, foreign

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every row of our files (all their rows, older ones included), with ``columns`` only if given."""
        schema = self._schema(columns)
        tables = [pa.Table.from_batches(list(self._file_batches(path, schema)), schema) for path in self.ours]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def of_run(self, run_id: str) -> list[str]:
        """The paths of our files that run ``run_id`` wrote."""
        return [path for path in self.ours if self.format.is_run_file_name(posixpath.basename(path), run_id)]

    def batches(self, columns: list[str], *, paths: list[str] | None = None, batch_rows: int = 65_536):
        """Every row of our files (or of ``paths`` among them), ``columns`` only, as record batches of at most
        ``batch_rows`` rows: one file's row group at a time in memory, whatever the output's size."""
        schema = self._schema(columns)
        for path in self.ours if paths is None else paths:
            yield from self._file_batches(path, schema, batch_rows)

    def _schema(self, columns: list[str] | None) -> pa.Schema:
        full = self.format.schema
        return full if columns is None else pa.schema([full.field(c) for c in columns])

    def _file_batches(self, path: str, schema: pa.Schema, batch_rows: int = 65_536):
        """One file's rows as ``schema``'s batches; a column added to the format after the file was written
        reads as nulls."""
        parquet = pq.ParquetFile(path, filesystem=self.filesystem)
        present = [name for name in schema.names if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_rows, columns=present):
            columns = [
                batch.column(field.name).cast(field.type) if field.name in present else pa.nulls(batch.num_rows, field.type)
                for field in schema
            ]
            yield pa.RecordBatch.from_arrays(columns, schema=schema)


def row_files(output: str, row_format: RowFormat, *, log=print) -> RowFiles:
    """The job's files at the top of ``output``; foreign files are named once through ``log``.

    Our files that cannot be read are renamed ``_incomplete-<name>`` (their items are processed again).
    """
    path, filesystem = parquet_location(output)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return RowFiles(row_format, filesystem, [], [])
    ours, foreign = [], []
    tag = row_format.tag
    for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = info.base_name
        if name.startswith(("_", ".")) or name in row_format.own_files:
            continue  # our lease, summaries, caches, reports and set-aside files; hidden files
        if info.type != pafs.FileType.File or not row_format.is_file_name(name):
            foreign.append(name)
            continue
        try:
            metadata = pq.read_schema(info.path, filesystem=filesystem).metadata or {}
        except (pa.ArrowInvalid, OSError) as error:
            aside = posixpath.join(posixpath.dirname(info.path), "_incomplete-" + name)
            log(f"[{tag}] {info.path} cannot be read ({error}); moved to {aside}, its items are processed again")
            filesystem.move(info.path, aside)
            continue
        if metadata.get(row_format.metadata_key) == FORMAT_VERSION:
            ours.append(info.path)
        else:
            foreign.append(name)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        log(f"[{tag}] ignoring {len(foreign)} entries in {output} that this job did not write: {shown}")
    return RowFiles(row_format, filesystem, sorted(ours), foreign)


def newest_rows(table: pa.Table, row_format: RowFormat) -> pa.Table:
    """One row per id: the one with the newest time (ties: the later file's row)."""
    if table.num_rows == 0:
        return table
    id_column, time_column = row_format.id_column, row_format.time_column
    order = pc.sort_indices(
        pa.table({"id": table[id_column], "at": table[time_column], "n": np.arange(table.num_rows)}),
        sort_keys=[("id", "ascending"), ("at", "descending"), ("n", "descending")],
    )
    ids = pc.take(table[id_column], order).to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return table.take(pc.take(order, pa.array(np.flatnonzero(first))))


def read_rows(output: str, row_format: RowFormat, columns: list[str] | None = None) -> pa.Table:
    """The rows at ``output``, one per id (the newest of each), with ``columns`` only if given.

    Raises ValueError when ``output`` holds no files written by the format's job.
    """
    files = row_files(output, row_format, log=lambda _: None)
    if not files.ours:
        raise ValueError(f"{output!r} holds no {row_format.noun} written by {row_format.job} ({row_format.prefix}-*.parquet)")
    wanted = None if columns is None else list(dict.fromkeys([row_format.id_column, row_format.time_column, *columns]))
    table = newest_rows(files.read(wanted), row_format)
    return table if columns is None else table.select(columns)


def done_ids(files: RowFiles, *, retry_errors: bool = False) -> set[str]:
    """Ids of the items that need no work: any row, or with ``retry_errors`` an ok row."""
    table = files.read([files.format.id_column, "status"])
    if retry_errors:
        table = table.filter(pc.equal(table["status"], "ok"))
    return set(table.column(files.format.id_column).to_pylist())


def done_id_array(files: RowFiles, *, retry_errors: bool = False) -> np.ndarray:
    """``done_ids`` as a sorted numpy array of ids (bytes), read batch by batch: a few bytes per id, no
    Python object per row, for the resume filter of a large output."""
    chunks = [np.array([], dtype="S1")]
    for batch in files.batches([files.format.id_column, "status"]):
        ids = batch.column(0)
        if retry_errors:
            ids = ids.filter(pc.equal(batch.column(1), "ok"))
        chunks.append(ids.cast(pa.binary()).to_numpy(zero_copy_only=False).astype("S"))
    return np.unique(np.concatenate(chunks))


class RowFileNames(FilenameProvider):
    """Ray Data names the run's files through this: ``<prefix>-<run>-<write>-<task>[-<block>].parquet``."""

    def __init__(self, row_format: RowFormat, run_id: str):
        super().__init__(file_format="parquet")
        self.row_format, self.run_id = row_format, run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return self.row_format.file_name(self.run_id, write_uuid, task_index)


# How many failing items a run's console summary names (its JSON summary keeps up to SUMMARY_FAILURES).
SHOWN_FAILURES = 10
SUMMARY_FAILURES = 1000


def run_failure(done: int, errors: int, max_error_fraction: float, noun: str, verb: str) -> str | None:
    """Why a run that wrote ``done`` rows, ``errors`` of them error rows, counts as failed (every one, or
    more than ``max_error_fraction``), or None. ``noun``, ``verb``: "images", "labelled"."""
    if done and errors == done:
        return f"every one of the {done} {noun} {verb} failed"
    if done and errors / done > max_error_fraction:
        return f"{errors} of {done} {noun} failed, more than --max_error_fraction {max_error_fraction:g}"
    return None


def failure_lines(tag: str, failures: list[str], error_count: int) -> list[str]:
    """Console lines naming the first failures (each already described), and how many more there are."""
    lines = [f"[{tag}]   failed: {failure}" for failure in failures[:SHOWN_FAILURES]]
    if error_count > SHOWN_FAILURES:
        lines.append(f"[{tag}]   ... and {error_count - SHOWN_FAILURES} more (see the summary file)")
    return lines


def write_summary(output: str, run_id: str, record: dict) -> str:
    """``<output>/_summary/<run_id>.json``; returns its URI."""
    return write_json(output, f"{SUMMARY_FOLDER}/{run_id}.json", record)


def write_json(output: str, name: str, record: dict) -> str:
    """``<output>/<name>`` as indented JSON; returns its URI."""
    return write_bytes(output, name, json.dumps(record, indent=2).encode())


def write_bytes(output: str, name: str, data: bytes) -> str:
    """``<output>/<name>`` (folders made as needed); returns its URI."""
    fs, path = fsspec.core.url_to_fs(output)
    target = posixpath.join(path, name)
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    fs.pipe_file(target, data)
    return f"{output.rstrip('/')}/{name}"


def parquet_location(output: str) -> tuple[str, pafs.FileSystem]:
    """The output as a path on a pyarrow filesystem: fsspec's (s3fs, gcsfs, ...) for URLs, so every
    store fsspec knows works, with the same credentials and settings as the image reads."""
    if "://" not in output:
        return output, pafs.LocalFileSystem()
    filesystem, path = fsspec.core.url_to_fs(output)
    filesystem.invalidate_cache(path)  # object-store listings are cached per process; ask the store itself
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
