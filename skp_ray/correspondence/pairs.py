"""The pairs manifest: one row per (source, target) image pair to match, as a Parquet table.

Columns (``PAIRS_SCHEMA``):

- ``pair_id``: unique within the manifest;
- ``source_uri``, ``target_uri``: absolute local paths or fsspec URLs of the two images;
- ``source_points_xy``: ``[N][2]`` query points (x, y) in source-image pixels, N >= 1;
- ``target_points_xy``: ``[N][2]`` ground-truth (x, y) in target-image pixels, point i matching
  source point i; null when the pair has no ground truth;
- ``target_box_xyxy``: ``[x1, y1, x2, y2]`` in target pixels, the box whose larger side is the PCK
  reference of the published evaluation (SPair-71k: the target object box; see
  ``pair_datasets`` for each dataset); null when unknown;
- ``category``: the object class ("" when unknown), ``split``: the dataset's split name;
- ``source_width``, ``source_height``, ``target_width``, ``target_height``: image sizes in pixels
  when the annotation states them, else null.

Pixel coordinates are continuous: pixel (col, row) covers [col, col + 1) x [row, row + 1), so a
point lies inside a W x H image when 0 <= x < W and 0 <= y < H; a box may reach x2 = W, y2 = H.

The schema metadata holds ``b"skp_ray.pairs": b"1"`` (the format version) and the dataset name
under ``b"skp_ray.dataset"``.

User pairs (``read_pairs`` on a ``.csv`` or a Parquet file without that metadata) have the same
column names. Required: ``source_uri``, ``target_uri``, ``source_points_xy``; every other column
is optional. In CSV, point lists and the box are JSON text, ``"[[10, 20], [30, 40]]"`` and
``"[5, 5, 60, 80]"``, and an empty cell is null; Parquet columns may hold lists or the same JSON
text. A missing or empty ``pair_id`` becomes a stable hash of the row's URIs and points as
written; a missing ``split`` becomes "all", a missing ``category`` "". Relative URIs are resolved
against the folder of the pairs file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from skp_ray.datasets.manifest import DATASET_METADATA_KEY, DatasetError, plain, write_manifest
from skp_ray.images import is_local_filesystem

__all__ = [
    "DATASET_METADATA_KEY",
    "PAIRS_METADATA_KEY",
    "PAIRS_SCHEMA",
    "PAIRS_VERSION",
    "REQUIRED_COLUMNS",
    "USER_SPLIT",
    "PairsError",
    "build_pairs",
    "pairs_dataset",
    "pairs_table",
    "read_pairs",
    "select_split",
    "write_pairs",
]

PAIRS_METADATA_KEY = b"skp_ray.pairs"
PAIRS_VERSION = b"1"
USER_SPLIT = "all"  # the split of user pairs that name none

_POINTS = pa.list_(pa.list_(pa.float64()))
PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("target_uri", pa.string(), nullable=False),
        pa.field("source_points_xy", _POINTS, nullable=False),
        pa.field("target_points_xy", _POINTS, nullable=True),
        pa.field("target_box_xyxy", pa.list_(pa.float64()), nullable=True),
        pa.field("category", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_width", pa.int32(), nullable=True),
        pa.field("source_height", pa.int32(), nullable=True),
        pa.field("target_width", pa.int32(), nullable=True),
        pa.field("target_height", pa.int32(), nullable=True),
    ],
    metadata={PAIRS_METADATA_KEY: PAIRS_VERSION},
)

REQUIRED_COLUMNS = ("source_uri", "target_uri", "source_points_xy")
_SIZE_COLUMNS = ("source_width", "source_height", "target_width", "target_height")
_JSON_COLUMNS = ("source_points_xy", "target_points_xy", "target_box_xyxy")


class PairsError(DatasetError):
    """A pairs file or pair annotation is missing or malformed; the message names the file, the line
    or row (and the pair id when there is one) and what was expected."""


# ---------------------------------------------------------------- building and validating


def pairs_table(rows: list[dict], dataset: str, *, origins: list[str] | None = None) -> pa.Table:
    """Validate ``rows`` (dicts with the ``PAIRS_SCHEMA`` columns; nullable ones may be left out)
    into a pairs manifest of ``dataset``.

    ``origins[i]``, when given, says where row i came from (a file and line) for the error
    messages; by default rows are named by their position.
    """
    if origins is not None and len(origins) != len(rows):
        raise ValueError(f"{len(origins)} origins for {len(rows)} rows; expected one per row")
    seen: dict[str, str] = {}
    for index, row in enumerate(rows):
        origin = origins[index] if origins is not None else f"pairs of {dataset!r}, row {index}"
        where = f"{origin}, pair {row.get('pair_id')!r}"
        _check_row(row, where)
        pair_id = row["pair_id"]
        if pair_id in seen:
            raise PairsError(f"{where}: duplicate pair id, first at {seen[pair_id]}; expected unique pair ids")
        seen[pair_id] = origin
    columns = {field.name: [_column_value(row, field.name) for row in rows] for field in PAIRS_SCHEMA}
    return pa.Table.from_pydict(columns, schema=_schema_of(dataset))


def pairs_dataset(table: pa.Table) -> str | None:
    """The dataset name a pairs manifest carries in its schema metadata."""
    name = (table.schema.metadata or {}).get(DATASET_METADATA_KEY)
    return name.decode() if name is not None else None


def _schema_of(dataset: str) -> pa.Schema:
    return PAIRS_SCHEMA.with_metadata({PAIRS_METADATA_KEY: PAIRS_VERSION, DATASET_METADATA_KEY: dataset.encode()})


def _column_value(row: dict, name: str):
    value = plain(row.get(name))
    if name == "category" and value is None:
        return ""
    return value


def _check_row(row: dict, where: str) -> None:
    unknown = sorted(set(row) - set(PAIRS_SCHEMA.names))
    if unknown:
        raise PairsError(f"{where}: unknown fields {unknown}; expected fields among {PAIRS_SCHEMA.names}")
    for name in ("pair_id", "source_uri", "target_uri", "split"):
        if not isinstance(row.get(name), str) or not row[name]:
            raise PairsError(f"{where}: {name} is {row.get(name)!r}; expected a non-empty string")
    for name in ("source_uri", "target_uri"):
        if not _is_absolute(row[name]):
            raise PairsError(f"{where}: {name} {row[name]!r} is relative; expected an absolute path or a URL")
    if not isinstance(row.get("category", ""), (str, type(None))):
        raise PairsError(f"{where}: category is {row['category']!r}; expected a string")
    source_size = _size(row, "source", where)
    target_size = _size(row, "target", where)
    source_points = _points(row.get("source_points_xy"), "source_points_xy", where)
    if source_points is None or not source_points:
        raise PairsError(f"{where}: source_points_xy is empty; expected at least one (x, y) point")
    _check_inside(source_points, source_size, "source_points_xy", where)
    target_points = _points(row.get("target_points_xy"), "target_points_xy", where)
    if target_points is not None:
        if len(target_points) != len(source_points):
            raise PairsError(
                f"{where}: {len(target_points)} target points for {len(source_points)} source points; "
                "expected one target point per source point"
            )
        _check_inside(target_points, target_size, "target_points_xy", where)
    _check_box(row.get("target_box_xyxy"), target_size, where)


def _is_absolute(uri: str) -> bool:
    return "://" in uri or os.path.isabs(uri)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _size(row: dict, side: str, where: str) -> tuple[int, int] | None:
    """(width, height) of one image, or None when the row does not state it."""
    width, height = row.get(f"{side}_width"), row.get(f"{side}_height")
    if width is None and height is None:
        return None
    for name, value in ((f"{side}_width", width), (f"{side}_height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PairsError(
                f"{where}: {name} is {value!r}; expected a positive integer, with {side}_width and "
                f"{side}_height both set or both null"
            )
    return width, height


def _points(value, name: str, where: str) -> list[list[float]] | None:
    if value is None:
        return None
    value = plain(value)
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in value
    ):
        raise PairsError(f"{where}: {name} is {value!r}; expected a list of (x, y) pairs of finite numbers")
    return value


def _check_inside(points: list[list[float]], size: tuple[int, int] | None, name: str, where: str) -> None:
    if size is None:
        return
    width, height = size
    for index, (x, y) in enumerate(points):
        if not (0 <= x < width and 0 <= y < height):
            raise PairsError(
                f"{where}: {name}[{index}] = ({x}, {y}) is outside the {width} x {height} image; "
                f"expected 0 <= x < {width} and 0 <= y < {height} (pixels)"
            )


def _check_box(box, size: tuple[int, int] | None, where: str) -> None:
    if box is None:
        return
    box = plain(box)
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise PairsError(f"{where}: target_box_xyxy is {box!r}; expected 4 finite numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise PairsError(f"{where}: target_box_xyxy {box} is empty; expected x2 > x1 and y2 > y1")
    if size is not None and not (0 <= x1 and 0 <= y1 and x2 <= size[0] and y2 <= size[1]):
        raise PairsError(
            f"{where}: target_box_xyxy {box} reaches outside the {size[0]} x {size[1]} target image; "
            f"expected 0 <= x1 < x2 <= {size[0]} and 0 <= y1 < y2 <= {size[1]}"
        )


# ---------------------------------------------------------------- writing and reading


def write_pairs(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a pairs manifest as Parquet to a local path or an fsspec URL (parent folders are created)."""
    path = os.fspath(path)
    if not table.schema.remove_metadata().equals(PAIRS_SCHEMA.remove_metadata()):
        raise PairsError(f"{path}: the table is not a pairs manifest; expected the columns of PAIRS_SCHEMA")
    write_manifest(table, path)


def read_pairs(path_or_uri: str | os.PathLike, *, split: str | None = None) -> pa.Table:
    """A pairs manifest (``write_pairs``), or user pairs in CSV or Parquet (see the module docstring),
    validated, in ``PAIRS_SCHEMA``; ``split`` keeps only that split's rows."""
    location = os.fspath(path_or_uri)
    fs, path = fsspec.core.url_to_fs(location)
    if not fs.isfile(path):
        raise PairsError(f"{location}: missing file; expected a pairs manifest (.parquet) or user pairs (.csv)")
    if posixpath.splitext(path)[1].lower() == ".csv":
        table = _user_pairs(*_read_csv(fs, path, location), fs, path)
    else:
        table = _read_parquet(fs, path, location)
        records = table.to_pylist()
        origins = [f"{location}, row {index}" for index in range(len(records))]
        if _is_manifest(table):  # written by write_pairs: its URIs are absolute, wherever the file is now
            table = pairs_table(records, pairs_dataset(table) or "user", origins=origins)
        else:
            table = _user_pairs(records, origins, fs, path)
    return select_split(table, split, location) if split is not None else table


def _user_pairs(records: list[dict], origins: list[str], fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    folder = posixpath.dirname(path)
    rows = [_user_row(record, origin, fs, folder) for record, origin in zip(records, origins)]
    return pairs_table(rows, "user", origins=origins)


def select_split(table: pa.Table, split: str, where: str = "pairs") -> pa.Table:
    """The rows of ``table`` in ``split``; a PairsError listing the splits present when there are none."""
    splits = table.column("split").to_pylist()
    if split not in splits:
        present = sorted(set(splits))
        raise PairsError(f"{where}: no pairs in split {split!r}; splits present: {present}")
    keep = pa.array([s == split for s in splits])
    return table.filter(keep)


def _is_manifest(table: pa.Table) -> bool:
    return PAIRS_METADATA_KEY in (table.schema.metadata or {})


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, location: str) -> pa.Table:
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except pa.ArrowInvalid as error:
        raise PairsError(f"{location}: cannot read it as Parquet ({error}); expected a .parquet or .csv file") from None
    version = (table.schema.metadata or {}).get(PAIRS_METADATA_KEY)
    if version is not None and version != PAIRS_VERSION:
        raise PairsError(
            f"{location}: pairs manifest version {version.decode()!r}; expected {PAIRS_VERSION.decode()!r}"
        )
    required = PAIRS_SCHEMA.names if version is not None else REQUIRED_COLUMNS
    _check_columns(table.column_names, location, required)
    return table


def _read_csv(fs: fsspec.AbstractFileSystem, path: str, location: str) -> tuple[list[dict], list[str]]:
    """The CSV's records (empty cells -> None) and, for each, its file and line."""
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _check_columns(reader.fieldnames or [], location, REQUIRED_COLUMNS)
    records, origins = [], []
    for record in reader:
        line = reader.line_num  # the record's last line: its only one unless a quoted cell spans lines
        if None in record or any(value is None for value in record.values()):
            raise PairsError(
                f"{location}, line {line}: the cells do not line up with the header's {len(reader.fieldnames)} "
                "columns; expected one cell per column (quote JSON lists: they hold commas)"
            )
        records.append({name: value.strip() or None for name, value in record.items()})
        origins.append(f"{location}, line {line}")
    return records, origins


def _check_columns(columns: list[str], location: str, required) -> None:
    missing = [name for name in required if name not in columns]
    if missing:
        raise PairsError(
            f"{location}: columns {missing} are missing; expected at least {list(required)}, "
            f"optionally {[n for n in PAIRS_SCHEMA.names if n not in required]}"
        )
    unknown = [name for name in columns if name not in PAIRS_SCHEMA.names]
    if unknown:
        raise PairsError(f"{location}: unknown columns {unknown}; expected columns among {PAIRS_SCHEMA.names}")


def _user_row(record: dict, origin: str, fs: fsspec.AbstractFileSystem, folder: str) -> dict:
    """One record of a pairs file as a pairs_table row: JSON text parsed, sizes as integers, defaults
    filled in, relative URIs resolved against ``folder``."""
    row = {name: value for name, value in record.items() if value is not None}
    where = f"{origin}, pair {row.get('pair_id')!r}"
    for name in _JSON_COLUMNS:
        if isinstance(row.get(name), str):
            row[name] = _parse_json(row[name], name, where)
    for name in _SIZE_COLUMNS:
        if name in row:
            row[name] = _integer(row[name], name, where)
    for name in ("source_uri", "target_uri"):
        if isinstance(row.get(name), str) and row[name].strip():
            row[name] = _resolve(fs, folder, row[name].strip())
    row.setdefault("split", USER_SPLIT)
    row.setdefault("category", "")
    if not row.get("pair_id"):
        row["pair_id"] = _stable_id(record, row)
    return row


def _parse_json(text: str, name: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        example = "[x1, y1, x2, y2]" if name == "target_box_xyxy" else "[[x, y], [x, y], ...]"
        raise PairsError(f"{where}: {name} {text!r} is not JSON ({error.msg}); expected JSON like {example}") from None


def _integer(value, name: str, where: str):
    """A size cell as an int: CSV gives text, pandas-written Parquet may give floats like 64.0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PairsError(f"{where}: {name} is {value!r}; expected a whole number of pixels") from None
    if not number.is_integer():
        raise PairsError(f"{where}: {name} is {value!r}; expected a whole number of pixels")
    return int(number)


def _stable_id(record: dict, row: dict) -> str:
    """A hash of what defines the pair as written (URIs before resolution, parsed points), so that the
    id survives moving the pairs file."""
    key = [record.get("source_uri"), record.get("target_uri"), row.get("source_points_xy"), row.get("target_points_xy")]
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _resolve(fs: fsspec.AbstractFileSystem, folder: str, entry: str) -> str:
    """A URI of the pairs file as an absolute one: URLs as they are, paths against the file's folder."""
    if "://" in entry:
        return entry
    if is_local_filesystem(fs):
        return os.path.normpath(os.path.join(folder, os.path.expanduser(entry)))
    joined = entry if entry.startswith("/") else posixpath.normpath(posixpath.join(folder, entry))
    return fs.unstrip_protocol(joined)


# ---------------------------------------------------------------- published datasets


def build_pairs(
    dataset: str,
    root: str,
    *,
    split: str | None = None,
    categories: list[str] | None = None,
    seed: int = 0,
) -> pa.Table:
    """The pairs manifest of a published dataset stored under ``root`` (a local folder or fsspec URL).

    ``dataset`` is one of ``pair_datasets.PAIR_DATASETS`` ("spair", "pf-willow", "cub-pairs"; any
    case, "_" for "-"). ``split`` None and ``categories`` None select what the published evaluation
    uses (``pair_datasets`` says what that is for each); ``categories`` may hold "all". ``seed`` is
    passed on to the adapter (the published pair lists are fixed, so none of the three uses it).
    """
    from skp_ray.correspondence.pair_datasets import PAIR_DATASETS  # the adapters import this module

    name = dataset.strip().lower().replace("_", "-")
    info = PAIR_DATASETS.get(name)
    if info is None:
        raise PairsError(f"unknown pairs dataset {dataset!r}; expected one of {', '.join(PAIR_DATASETS)}")
    table = info.build(root, split=split, categories=categories, seed=seed)
    if table.num_rows == 0:
        raise PairsError(f"{root}: no pairs found for dataset {name!r}; expected: {info.description}")
    return table
