"""The correspondence job's rows: one per pair, in ``matches-<run>-<write>-<n>.parquet`` files.

Recognised, resumed from and read back as ``skp_ray.row_store`` describes
(foreign files untouched; the newest row of a pair wins). Points are (x, y)
in pixels of the original images; predictions are integer pixels (the
target pixel whose feature matched best), the truth as the manifest gives it.
The truth, the reference box and the sizes are copied into the rows so that
the metrics need nothing but the output.
"""

from __future__ import annotations

import pyarrow as pa

from skp_ray.row_store import RowFormat, read_rows, with_format_metadata

MATCHES_SCHEMA = with_format_metadata(
    pa.schema(
        [
            ("pair_id", pa.string()),
            ("source_uri", pa.string()),
            ("target_uri", pa.string()),
            ("category", pa.string()),
            ("split", pa.string()),
            ("method", pa.string()),
            ("source_points_xy", pa.list_(pa.list_(pa.int32()))),  # the queries, rounded to pixels
            ("predicted_xy", pa.list_(pa.list_(pa.int32()))),  # in target pixels
            ("scores", pa.list_(pa.float32())),  # each prediction's cosine similarity
            ("target_points_xy", pa.list_(pa.list_(pa.float64()))),  # the truth, when known
            ("target_box_xyxy", pa.list_(pa.float64())),  # the manifest's PCK reference box, when known
            ("source_width", pa.int32()),
            ("source_height", pa.int32()),
            ("target_width", pa.int32()),
            ("target_height", pa.int32()),
            ("settings_hash", pa.string()),  # the feature cache's settings (skp_ray.correspondence.feature_cache)
            ("model", pa.string()),
            ("status", pa.string()),
            ("error_cause", pa.string()),
            ("error", pa.string()),
            ("matched_at", pa.timestamp("us", tz="UTC")),
            ("run_id", pa.string()),
        ]
    ),
    b"skp_ray.matches",
)

# The job's files beside its rows (skp_ray.correspondence.report writes them).
METRICS_FILE = "metrics.json"
PICTURE_FILE = "pairs.png"
REPORT_FILE = "report.html"
LOSS_PICTURE_FILE = "contexts_loss.png"  # ldm: the loss curve of the contexts a run optimised

MATCHES = RowFormat(
    prefix="matches",
    schema=MATCHES_SCHEMA,
    metadata_key=b"skp_ray.matches",
    id_column="pair_id",
    time_column="matched_at",
    job="jobs/correspond.py",
    noun="match files",
    tag="correspond",
    own_files=(METRICS_FILE, PICTURE_FILE, REPORT_FILE, LOSS_PICTURE_FILE),
)


def read_matches(output: str, columns: list[str] | None = None) -> pa.Table:
    """The matches at ``output``, one row per pair (the newest); ValueError when there are none."""
    return read_rows(output, MATCHES, columns)
