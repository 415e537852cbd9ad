"""The labelling job's rows: their schema and the readers the other jobs use.

The job writes files named ``labels-<run id>-<write id>-<n>.parquet`` at the top
of ``--output``, each carrying ``OUTPUT_SCHEMA`` with the schema metadata
``skp_ray.labels``; ``skp_ray.row_store`` says how such files are recognised,
resumed from and read back (foreign files are never touched; the newest row
of an image wins).
"""

from __future__ import annotations

import pyarrow as pa

from skp_ray.row_store import (
    RowFiles,
    RowFormat,
    done_ids,
    parquet_location,
    read_rows,
    row_files,
    with_format_metadata,
    write_summary,
)

__all__ = ["OUTPUT_SCHEMA", "LABELS", "label_files", "read_labels", "labelled_ids", "write_summary", "parquet_location"]

# One row per input image. Keypoints are [K][2] lists: (x, y) in original-image pixels
# (a pixel's centre at index + 0.5) and (x, y) normalised to [0, 1] in the frame the model saw:
# the manifest's crop box when it gives one (crop_box), else the whole image (width, height).
# keypoint_spread_px and peak_share: each keypoint's confidence (skp_ray.detection.Detection); files
# written before they existed lack them.
OUTPUT_SCHEMA = with_format_metadata(
    pa.schema(
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
            ("keypoint_spread_px", pa.list_(pa.float32())),
            ("peak_share", pa.list_(pa.float32())),
            ("artifact_id", pa.string()),
            ("model", pa.string()),
            ("status", pa.string()),
            ("error_cause", pa.string()),
            ("error", pa.string()),
            ("labelled_at", pa.timestamp("us", tz="UTC")),
            ("run_id", pa.string()),
        ]
    ),
    b"skp_ray.labels",
)

LABELS = RowFormat(
    prefix="labels",
    schema=OUTPUT_SCHEMA,
    metadata_key=b"skp_ray.labels",
    id_column="image_id",
    time_column="labelled_at",
    job="jobs/label.py",
    noun="label files",
    tag="label",
)


def label_file_name(run_id: str, write_id: str, task_index: int) -> str:
    return LABELS.file_name(run_id, write_id, task_index)


def label_files(output: str, *, log=print) -> RowFiles:
    """The label files at the top of ``output`` (see ``row_store.row_files``)."""
    return row_files(output, LABELS, log=log)


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """The labels at ``output`` as one row per image (the newest row of each), ``OUTPUT_SCHEMA`` columns.

    Raises ValueError when ``output`` holds no label files written by ``jobs/label.py``.
    """
    return read_rows(output, LABELS, columns)


def labelled_ids(files: RowFiles, *, retry_errors: bool = False) -> set[str]:
    """Ids of the images that need no labelling: any row, or with ``retry_errors`` an ok row."""
    return done_ids(files, retry_errors=retry_errors)
