"""The labelling job's input as a lazy Ray Data dataset of image sources, read in parallel.

``source_dataset(location)`` accepts what ``images.list_sources`` accepts, and
more manifests at once, but never lists the whole input on the driver:

- manifests (``.parquet``, ``.csv`` with a ``uri`` column, ``.txt`` one URI per
  line): one file, a folder holding only manifest files, or a glob of them, read
  by ``ray.data.read_parquet`` / ``read_csv`` / ``read_text``, each row resolved
  against its own manifest's folder;
- a folder or bucket prefix of images: the driver lists its top level only
  (one call); every sub-folder is listed recursively in a Ray task of its own,
  so a corpus sharded into sub-folders is listed in parallel. Image files at the
  top level are named by that one driver listing: put large corpora in
  sub-folders or a manifest;
- a glob of images, or one image: matched on the driver (use a folder or a
  manifest for a large corpus).

Every row comes out in ``images.source_item``'s plain columns (``uri`` made
absolute, ``crop_box``, ``has_crop``, ``mask_uri``) plus ``image_id`` and
``listed_from`` (the manifest or folder the row came from).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray.data
from ray.data.extensions import ArrowTensorArray

from skp_ray.images import (
    MANIFEST_EXTENSIONS,
    ImageSource,
    _extensions,
    _is_image_name,
    _resolve,
    _uri,
    absolute_source,
    is_local_filesystem,
)

__all__ = ["SourceInput", "find_input", "image_id", "source_dataset", "source_table"]

# Manifest columns the labelling job reads; any others (landmarks, ...) stay on disk.
MANIFEST_COLUMNS = ("uri", "mask_uri", "crop_box", "split")


def image_id(uri: str) -> str:
    """A stable id for an image: the first 16 hex digits of the sha256 of its URI."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SourceInput:
    """What the driver found at an input, before Ray reads anything: manifest files of one format (with
    the manifest columns to read), folders to list in Ray tasks, and images it named itself."""

    location: str
    split: str | None = None
    manifests: tuple[str, ...] = ()  # paths on the input's filesystem
    manifest_format: str = ""  # ".parquet", ".csv" or ".txt"
    columns: tuple[str, ...] = ()  # manifest columns to read (Parquet, CSV)
    folders: tuple[str, ...] = ()  # listed recursively, one Ray task each
    images: tuple[str, ...] = ()  # URIs

    def dataset(self) -> ray.data.Dataset:
        """The sources as a lazy dataset (``source_table``'s columns)."""
        parts = []
        if self.manifests:
            parts.append(self._manifest_rows())
        if self.images:
            items = [{"uri": uri} for uri in self.images]
            rows = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 1000, 64)))
            parts.append(
                rows.map_batches(
                    _plain_sources, fn_kwargs={"location": self.location}, batch_size=LISTING_BATCH_ROWS, **_TASK
                )
            )
        if self.folders:
            listing = ray.data.from_items([{"folder": f} for f in self.folders], override_num_blocks=len(self.folders))
            parts.append(listing.map_batches(_list_folders, fn_kwargs={"location": self.location}, batch_size=1, **_TASK))
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    def _manifest_rows(self) -> ray.data.Dataset:
        fs, _ = fsspec.core.url_to_fs(self.location)
        arrow_fs = pafs.LocalFileSystem() if is_local_filesystem(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        paths, kwargs = list(self.manifests), {"location": self.location, "split": self.split}
        if self.manifest_format == ".txt":
            rows = ray.data.read_text(paths, filesystem=arrow_fs, include_paths=True)
            return rows.map_batches(_text_sources, fn_kwargs=kwargs, batch_size=LISTING_BATCH_ROWS, **_TASK)
        if self.manifest_format == ".csv":
            import pyarrow.csv as pacsv

            # uri stays a string column even if every entry looks like a number
            types = {"uri": pa.string(), "mask_uri": pa.string(), "split": pa.string()}
            options = pacsv.ConvertOptions(column_types=types, include_columns=list(self.columns))
            rows = ray.data.read_csv(paths, filesystem=arrow_fs, include_paths=True, convert_options=options)
        else:
            rows = ray.data.read_parquet(paths, filesystem=arrow_fs, include_paths=True)
            rows = rows.select_columns([*self.columns, "path"])
        return rows.map_batches(_manifest_sources, fn_kwargs=kwargs, batch_size=LISTING_BATCH_ROWS, **_TASK)


# Listing and resolving are light: half a CPU per task, Arrow batches.
_TASK = {"batch_format": "pyarrow", "num_cpus": 0.5}
# Rows resolved at a time: a task hands on each batch as it is done, so the first images reach the
# detectors after one batch of a manifest file, however large the file.
LISTING_BATCH_ROWS = 1024


def source_dataset(location: str | os.PathLike, *, split: str | None = None) -> ray.data.Dataset:
    """The image sources at ``location`` as a lazy dataset: ``find_input(location, split=split).dataset()``."""
    return find_input(location, split=split).dataset()


def find_input(location: str | os.PathLike, *, split: str | None = None) -> SourceInput:
    """What ``location`` is (see the module's docstring), checked on the driver without listing it whole.

    Raises ValueError, naming the location, when it does not exist, is not a
    folder, image, glob or manifest, or (where the driver can tell) holds no
    images; ``split`` is refused for inputs without splits.
    """
    location = os.fspath(location)
    fs, path = fsspec.core.url_to_fs(location)
    extension = posixpath.splitext(path)[1].lower()
    if any(ch in path for ch in "*?["):
        return _glob_input(fs, path, location, split)
    if extension in MANIFEST_EXTENSIONS and fs.isfile(path):
        return _manifest_input(fs, [path], location, split)
    if fs.isdir(path):
        return _folder_input(fs, path, location, split)
    if fs.isfile(path) and _is_image_name(path):
        _refuse_split(location, split)
        return SourceInput(location, images=(location,))
    if fs.exists(path):
        raise ValueError(
            f"{location!r} is neither a folder, an image ({_extensions()}) nor a manifest (.txt, .csv, .parquet)"
        )
    raise ValueError(
        f"{location!r} does not exist; expected a folder of images, a glob pattern, "
        "or a manifest file (.txt, .csv, .parquet), or a folder or glob of manifest files"
    )


def _glob_input(fs, path: str, location: str, split: str | None) -> SourceInput:
    found = sorted(p for p in fs.glob(path) if fs.isfile(p))
    manifests = [p for p in found if posixpath.splitext(p)[1].lower() in MANIFEST_EXTENSIONS]
    if manifests and len(manifests) == len(found):
        return _manifest_input(fs, manifests, location, split)
    images = tuple(_uri(fs, p, is_local_filesystem(fs)) for p in found if _is_image_name(p))
    if not images:
        raise ValueError(f"no images found at {location!r}; expected files ending in {_extensions()} or manifests")
    _refuse_split(location, split)
    return SourceInput(location, images=images)


def _folder_input(fs, path: str, location: str, split: str | None) -> SourceInput:
    """Images below the folder, or the manifests in it when it holds manifest files and nothing else."""
    entries = [e for e in fs.ls(path, detail=True) if e["name"].rstrip("/") != path.rstrip("/")]
    folders = tuple(sorted(e["name"] for e in entries if e["type"] == "directory"))
    files = sorted(e["name"] for e in entries if e["type"] != "directory")
    images = tuple(_uri(fs, p, is_local_filesystem(fs)) for p in files if _is_image_name(p))
    manifests = [p for p in files if posixpath.splitext(p)[1].lower() in MANIFEST_EXTENSIONS]
    if manifests and not images and not folders:
        return _manifest_input(fs, manifests, location, split)
    if not images and not folders:
        raise ValueError(f"no images found at {location!r}; expected files ending in {_extensions()} or manifest entries")
    _refuse_split(location, split)
    return SourceInput(location, folders=folders, images=images)


def _manifest_input(fs, paths: list[str], location: str, split: str | None) -> SourceInput:
    extensions = {posixpath.splitext(p)[1].lower() for p in paths}
    if len(extensions) > 1:
        raise ValueError(f"the manifests at {location!r} mix {sorted(extensions)}; keep one format per input")
    (extension,) = extensions
    if extension == ".txt":
        _refuse_split(location, split, why=f"manifest {location!r} is a list of URIs without splits")
        columns = ()
    else:
        columns = _manifest_columns(fs, paths[0], extension, split)
    return SourceInput(location, split, tuple(paths), extension, columns)


def _manifest_columns(fs, path: str, extension: str, split: str | None) -> tuple[str, ...]:
    """The manifest columns to read, from the first file's header; a missing ``uri`` (or ``split``) is refused."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        names = pacsv.open_csv(f).schema.names if extension == ".csv" else pq.read_schema(f).names
    if "uri" not in names:
        raise ValueError(f"manifest {_name(fs, path)!r} has no 'uri' column (columns: {names})")
    if split is not None and "split" not in names:
        raise ValueError(f"manifest {_name(fs, path)!r} has no 'split' column to pick split {split!r} from")
    return tuple(c for c in MANIFEST_COLUMNS if c in names and (c != "split" or split is not None))


def _list_folders(batch: pa.Table, location: str) -> pa.Table:
    """Ray task: every image file below the batch's folders, recursively (hidden names skipped)."""
    fs, _ = fsspec.core.url_to_fs(location)
    local = is_local_filesystem(fs)
    uris, listed_from = [], []
    for folder in batch["folder"].to_pylist():
        found = sorted(p for p in fs.find(folder) if _is_image_name(p))
        uris += [_uri(fs, p, local) for p in found]
        listed_from += [folder] * len(found)
    return source_table([ImageSource(uri) for uri in uris], listed_from)


def _plain_sources(batch: pa.Table, location: str) -> pa.Table:
    return source_table([ImageSource(uri) for uri in batch["uri"].to_pylist()], [location] * batch.num_rows)


def _text_sources(batch: pa.Table, location: str, split: str | None) -> pa.Table:
    fs, _ = fsspec.core.url_to_fs(location)
    local = is_local_filesystem(fs)
    sources, listed_from = [], []
    for line, path in zip(batch["text"].to_pylist(), batch["path"].to_pylist()):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            sources.append(ImageSource(_resolve(fs, posixpath.dirname(path), entry, local)))
            listed_from.append(path)
    return source_table(sources, listed_from)


def _manifest_sources(batch: pa.Table, location: str, split: str | None) -> pa.Table:
    """Ray task: a batch of Parquet/CSV manifest rows as sources, relative entries resolved against
    their manifest's folder, rows of other splits and rows without a URI dropped."""
    fs, _ = fsspec.core.url_to_fs(location)
    local = is_local_filesystem(fs)
    if split is not None:
        batch = batch.filter(pc.equal(batch["split"], split))
    count = batch.num_rows
    masks = batch["mask_uri"].to_pylist() if "mask_uri" in batch.column_names else [None] * count
    boxes = batch["crop_box"].to_pylist() if "crop_box" in batch.column_names else [None] * count
    sources, listed_from = [], []
    for uri, mask, box, path in zip(batch["uri"].to_pylist(), masks, boxes, batch["path"].to_pylist()):
        uri = str(uri or "").strip()
        if not uri:
            continue
        folder = posixpath.dirname(path)
        crop = tuple(int(v) for v in box) if box is not None else None
        sources.append(ImageSource(_resolve(fs, folder, uri, local), crop, _resolve(fs, folder, mask, local) if mask else None))
        listed_from.append(path)
    return source_table(sources, listed_from)


def source_table(sources: list[ImageSource], listed_from: list[str]) -> pa.Table:
    """Sources as ``images.source_item``'s plain columns plus ``image_id`` and ``listed_from``, local paths
    made absolute. ``crop_box`` is a tensor column, so an empty table keeps its types (no pickled fallback)."""
    sources = [absolute_source(source) for source in sources]
    boxes = np.array([source.crop_box or (0, 0, 0, 0) for source in sources], dtype=np.int64).reshape(-1, 4)
    return pa.table(
        {
            "uri": pa.array([source.uri for source in sources], pa.string()),
            "crop_box": ArrowTensorArray.from_numpy(boxes),
            "has_crop": pa.array([source.crop_box is not None for source in sources], pa.bool_()),
            "mask_uri": pa.array([source.mask_uri or "" for source in sources], pa.string()),
            "image_id": pa.array([image_id(source.uri) for source in sources], pa.string()),
            "listed_from": pa.array(listed_from, pa.string()),
        }
    )


def _refuse_split(location: str, split: str | None, why: str | None = None) -> None:
    if split is not None:
        raise ValueError(f"{why or f'{location!r} is not a manifest with splits'}; drop split={split!r}")


def _name(fs, path: str) -> str:
    return path if is_local_filesystem(fs) else fs.unstrip_protocol(path)
