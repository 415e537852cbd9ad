"""Adapters: published correspondence benchmarks, in their distributed layouts, -> pairs manifests.

Each adapter reads the files the published evaluation reads and keeps its pairs, points and PCK
reference box (``pairs.PAIRS_SCHEMA``). ``root`` is the dataset's folder (or the folder holding
it under its distributed name), on local disk or any fsspec store. Every image a pair names must
exist; the error names the image and the annotation line that names it. What was found, and where:

SPair-71k ("spair"; Tsingularity/dift eval_spair.py, ubc-vision/LDM_correspondences eval/spair.py
and eval/dataset.py):
    ``Layout/large/{trn,val,test}.txt`` lists a split's pairs, one ``<n>-<src>-<trg>:<category>``
    per line (e.g. ``000009-2008_001546-2009_000327:aeroplane``); the pair's annotation is
    ``PairAnnotation/<split>/<line>.json`` with ``src_imname``, ``trg_imname``, ``category``,
    ``src_kps``/``trg_kps`` (integer (x, y) pixels, point i of one matching point i of the other),
    ``src_bndbox``/``trg_bndbox`` ([x1, y1, x2, y2] pixels), ``src_imsize``/``trg_imsize``
    ([width, height, channels]: DIFT reverses ``[:2]`` to get the (height, width) it upsamples to)
    and more (``filename``, ``kps_ids``, ``mirror``, ``viewpoint_variation``, ...). Images are
    ``JPEGImages/<category>/<imname>``. DIFT evaluates every JSON of ``PairAnnotation/test``
    (the same pairs as ``Layout/large/test.txt``) with the PCK reference max(h, w) of
    ``trg_bndbox``. Chosen: split "test" and all categories by default, the rows in layout order,
    ``target_box_xyxy`` = ``trg_bndbox``, sizes from ``*_imsize``, pair_id ``<split>/<line>``.
    (LDM_correspondences instead takes the *source* box, scaled to 512, as the reference: not
    reproduced.)

PF-Willow ("pf-willow"; ubc-vision/LDM_correspondences eval/pfwillow.py, eval/dataset.py):
    ``PF-WILLOW/test_pairs.csv``, header ``imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10,
    YB1..YB10``: ten (x, y) pixel points per image; the image columns read
    ``PF-dataset/<class>/<name>.png`` and the published loader drops the first component, so the
    image is ``PF-WILLOW/<class>/<name>.png``. Classes: car(G), car(M), car(S), duck(S),
    motorbike(G), motorbike(M), motorbike(S), winebottle(M), winebottle(wC), winebottle(woC).
    Only a test split. The PCK reference is the bounding box of the target keypoints. Chosen:
    ``target_box_xyxy`` = that box [min x, min y, max x, max y]; category = the class as written
    (e.g. "car(G)"); pair_id = the 0-based CSV row (the published ``item_index``), four digits; no
    sizes (the CSV states none). Quirk not reproduced: the published threshold is computed after
    padding the points with -1 to 40 columns, so its "min" is -1 and the reference becomes
    max(max x, max y) + 1 in the 512 x 512 resized frame rather than the box's larger side.

CUB-200-2011 pairs ("cub-pairs"; ubc-vision/LDM_correspondences eval/cub2011.py):
    ``CUB_200_2011/images.txt`` (id, path), ``train_test_split.txt`` (id, 1 = train),
    ``image_class_labels.txt`` (id, class), ``bounding_boxes.txt`` (id, x, y, width, height),
    ``parts/part_locs.txt`` (id, part 1..15, x, y, visible), images under ``images/``. The
    published evaluation takes the test images (split flag 0) of classes 1..3 (its ``num_classes``
    default, never overridden), every unordered pair of images of the same class
    (``itertools.combinations`` in images.txt order, the earlier image as source), the parts
    visible in both images (in part order) as the points, and the target's bounding box, larger
    side, as the PCK reference (the published code scales it by 512 / target width only while the
    points are scaled per axis; here everything stays in original pixels). Chosen: exactly those
    pairs by default (``categories`` takes class folder names like "001.Black_footed_Albatross",
    class numbers like "1", or "all"; ``split="train"`` pairs the training images the same way);
    points as part_locs.txt gives them; ``target_box_xyxy`` = [x, y, x + width, y + height]; pairs
    without a part visible in both are left out (the published code would divide by zero on
    them); pair_id ``<source id>-<target id>``; no sizes. No pair is sampled, so ``seed`` is unused.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Callable

import fsspec
import pyarrow as pa

from skp_ray.correspondence.pairs import PairsError, pairs_table
from skp_ray.images import is_local_filesystem

__all__ = [
    "CUB_DEFAULT_CLASSES",
    "PAIR_DATASETS",
    "PF_WILLOW_POINTS",
    "PairDatasetInfo",
    "SPAIR_SPLITS",
    "build_cub_pairs",
    "build_pf_willow",
    "build_spair",
]

SPAIR_SPLITS = ("trn", "val", "test")
PF_WILLOW_POINTS = 10
CUB_DEFAULT_CLASSES = 3  # classes 1..3: the published evaluation's num_classes
ALL = "all"


@dataclass(frozen=True)
class PairDatasetInfo:
    """One adapter: ``build(root, *, split, categories, seed)`` returns the pairs manifest."""

    name: str
    build: Callable[..., pa.Table]
    splits: tuple[str, ...]
    default_split: str
    description: str


# ---------------------------------------------------------------- reading a dataset's files


class _Store:
    """The dataset's files on one fsspec filesystem, with errors that name the file."""

    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(os.fspath(root))
        self.local = is_local_filesystem(self.fs)
        self._listings: dict[str, set[str]] = {}

    def folder(self, marker: str, name: str, what: str) -> str:
        """``root`` if ``root/marker`` exists, else ``root/name`` if ``root/name/marker`` does."""
        for candidate in (self.root, posixpath.join(self.root, name)):
            if self.fs.exists(posixpath.join(candidate, marker)):
                return candidate
        raise PairsError(
            f"{self.uri(posixpath.join(self.root, marker))}: missing; expected {what} "
            f"(root is the {name} folder or the folder holding it)"
        )

    def uri(self, path: str) -> str:
        return os.path.abspath(path) if self.local else self.fs.unstrip_protocol(path)

    def text(self, path: str, what: str) -> str:
        try:
            with self.fs.open(path, "rb") as f:
                return f.read().decode("utf-8-sig")
        except FileNotFoundError:
            raise PairsError(f"{self.uri(path)}: missing file; expected {what}") from None

    def lines(self, path: str, what: str) -> list[tuple[int, str]]:
        """The non-blank lines of a text file with their 1-based line numbers."""
        text = self.text(path, what)
        return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]

    def require_image(self, path: str, named_by: str) -> str:
        """The image's URI; a PairsError naming the image and ``named_by`` when it does not exist."""
        folder, name = posixpath.split(path)
        if folder not in self._listings:  # one listing per folder, not one request per image
            try:
                found = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                found = []
            self._listings[folder] = {posixpath.basename(p.rstrip("/")) for p in found}
        if name not in self._listings[folder]:
            raise PairsError(f"{self.uri(path)}: missing image, named by {named_by}; expected an image file")
        return self.uri(path)


def _choose_split(split: str | None, splits: tuple[str, ...], default: str, dataset: str) -> str:
    if split is None:
        return default
    if split not in splits:
        raise PairsError(f"{dataset}: unknown split {split!r}; expected one of {list(splits)}")
    return split


def _choose_categories(
    found: list[str], wanted: list[str] | None, default: list[str], where: str, aliases: dict[str, str] | None = None
) -> list[str]:
    """The categories to keep, in ``found`` order: ``default`` for None, every one for "all"."""
    if wanted is None:
        return default
    if isinstance(wanted, str):
        wanted = [wanted]
    if ALL in wanted:
        return list(found)
    aliases = aliases or {}
    chosen = set()
    for name in wanted:
        category = aliases.get(str(name), str(name))
        if category not in found:
            raise PairsError(f"{where}: unknown category {name!r}; categories found: {found}")
        chosen.add(category)
    return [category for category in found if category in chosen]


# ---------------------------------------------------------------- SPair-71k


def build_spair(root: str, *, split: str | None = None, categories: list[str] | None = None, seed: int = 0) -> pa.Table:
    """SPair-71k pairs of ``split`` ("trn", "val" or "test", default "test"), in layout order."""
    store = _Store(root)
    base = store.folder("Layout/large", "SPair-71k", "the SPair-71k pair lists Layout/large/{trn,val,test}.txt")
    split = _choose_split(split, SPAIR_SPLITS, "test", f"SPair-71k at {root}")
    layout = posixpath.join(base, "Layout", "large", f"{split}.txt")
    layout_uri = store.uri(layout)
    lines = store.lines(layout, "a pair list")
    entries = [_spair_entry(line, f"{layout_uri}, line {number}") for number, line in lines]
    found = sorted({category for _, category, _ in entries})
    chosen = set(_choose_categories(found, categories, found, layout_uri))
    rows, origins = [], []
    for name, category, where in entries:
        if category not in chosen:
            continue
        annotation = posixpath.join(base, "PairAnnotation", split, f"{name}.json")
        data = _read_json(store, annotation, f"the pair annotation named by {where}")
        rows.append(_spair_row(store, base, data, store.uri(annotation), split, name, category))
        origins.append(store.uri(annotation))
    return pairs_table(rows, "spair", origins=origins)


def _spair_entry(line: str, where: str) -> tuple[str, str, str]:
    """(pair name, category, where) from a layout line ``<n>-<src>-<trg>:<category>``."""
    stem, _, category = line.partition(":")
    if not category or len(stem.split("-")) != 3:
        raise PairsError(f"{where}: {line!r}; expected '<number>-<source>-<target>:<category>'")
    return line, category, where


def _read_json(store: _Store, path: str, what: str) -> dict:
    text = store.text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PairsError(f"{store.uri(path)}, line {error.lineno}: not JSON ({error.msg}); expected {what}") from None
    if not isinstance(data, dict):
        raise PairsError(f"{store.uri(path)}: a JSON {type(data).__name__}; expected an object, {what}")
    return data


_SPAIR_FIELDS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "trg_bndbox", "src_imsize", "trg_imsize")


def _spair_row(store: _Store, base: str, data: dict, where: str, split: str, name: str, category: str) -> dict:
    missing = [field for field in _SPAIR_FIELDS if field not in data]
    if missing:
        raise PairsError(f"{where}: fields {missing} are missing; expected the SPair-71k fields {list(_SPAIR_FIELDS)}")
    if data["category"] != category:
        raise PairsError(f"{where}: category {data['category']!r}; expected {category!r} as its file name says")
    images = posixpath.join(base, "JPEGImages", category)
    source_width, source_height = _spair_size(data["src_imsize"], "src_imsize", where)
    target_width, target_height = _spair_size(data["trg_imsize"], "trg_imsize", where)
    return {
        "pair_id": f"{split}/{name}",
        "source_uri": store.require_image(posixpath.join(images, str(data["src_imname"])), where),
        "target_uri": store.require_image(posixpath.join(images, str(data["trg_imname"])), where),
        "source_points_xy": data["src_kps"],
        "target_points_xy": data["trg_kps"],
        "target_box_xyxy": data["trg_bndbox"],
        "category": category,
        "split": split,
        "source_width": source_width,
        "source_height": source_height,
        "target_width": target_width,
        "target_height": target_height,
    }


def _spair_size(imsize, field: str, where: str) -> tuple[int, int]:
    if not (isinstance(imsize, list) and len(imsize) >= 2 and all(isinstance(v, int) for v in imsize[:2])):
        raise PairsError(f"{where}: {field} is {imsize!r}; expected [width, height, channels] integers")
    return imsize[0], imsize[1]


# ---------------------------------------------------------------- PF-Willow

_PF_WILLOW_COORDINATES = [
    f"{axis}{image}{i}" for image in "AB" for axis in "XY" for i in range(1, PF_WILLOW_POINTS + 1)
]  # XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10
PF_WILLOW_HEADER = ["imageA", "imageB", *_PF_WILLOW_COORDINATES]


def build_pf_willow(
    root: str, *, split: str | None = None, categories: list[str] | None = None, seed: int = 0
) -> pa.Table:
    """PF-Willow's test pairs, in test_pairs.csv order."""
    store = _Store(root)
    base = store.folder("test_pairs.csv", "PF-WILLOW", "the PF-Willow pair list test_pairs.csv")
    split = _choose_split(split, ("test",), "test", f"PF-Willow at {root}")
    path = posixpath.join(base, "test_pairs.csv")
    path_uri = store.uri(path)
    records = _pf_willow_records(store.text(path, "the PF-Willow pair list"), path_uri)
    found = sorted({record["category"] for record in records})
    chosen = set(_choose_categories(found, categories, found, path_uri))
    rows, origins = [], []
    for record in records:
        if record["category"] not in chosen:
            continue
        where = record.pop("where")
        record["source_uri"] = store.require_image(_pf_willow_image(base, record.pop("imageA")), where)
        record["target_uri"] = store.require_image(_pf_willow_image(base, record.pop("imageB")), where)
        rows.append({**record, "split": split})
        origins.append(where)
    return pairs_table(rows, "pf-willow", origins=origins)


def _pf_willow_records(text: str, path: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    if header != PF_WILLOW_HEADER:
        raise PairsError(f"{path}, line 1: header {header}; expected {PF_WILLOW_HEADER}")
    records = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        where = f"{path}, line {reader.line_num}"
        if len(cells) != len(PF_WILLOW_HEADER):
            raise PairsError(f"{where}: {len(cells)} cells; expected {len(PF_WILLOW_HEADER)} like the header")
        values = [_number(cell, name, where) for cell, name in zip(cells[2:], _PF_WILLOW_COORDINATES)]
        n = PF_WILLOW_POINTS
        source = [[x, y] for x, y in zip(values[:n], values[n : 2 * n])]
        target = [[x, y] for x, y in zip(values[2 * n : 3 * n], values[3 * n :])]
        xs, ys = [x for x, _ in target], [y for _, y in target]
        records.append(
            {
                "pair_id": f"{len(records):04d}",
                "imageA": cells[0].strip(),
                "imageB": cells[1].strip(),
                "source_points_xy": source,
                "target_points_xy": target,
                "target_box_xyxy": [min(xs), min(ys), max(xs), max(ys)],
                "category": _pf_willow_class(cells[0].strip(), where),
                "where": where,
            }
        )
    return records


def _number(cell: str, column: str, where: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PairsError(f"{where}: {column} is {cell!r}; expected a finite number of pixels")
    return value


def _pf_willow_class(name: str, where: str) -> str:
    parts = name.split("/")
    if len(parts) < 3:
        raise PairsError(f"{where}: image {name!r}; expected 'PF-dataset/<class>/<file>'")
    return parts[1]


def _pf_willow_image(base: str, name: str) -> str:
    """The image's path: the published loader drops the CSV path's first component ("PF-dataset")."""
    return posixpath.join(base, *name.split("/")[1:])


# ---------------------------------------------------------------- CUB-200-2011


def build_cub_pairs(
    root: str, *, split: str | None = None, categories: list[str] | None = None, seed: int = 0
) -> pa.Table:
    """Same-class pairs of CUB-200-2011 images with the parts visible in both; see the module docstring."""
    store = _Store(root)
    base = store.folder("images.txt", "CUB_200_2011", "the CUB-200-2011 image list images.txt")
    split = _choose_split(split, ("train", "test"), "test", f"CUB-200-2011 at {root}")
    table = _CubTables(store, base)
    wanted_flag = 1 if split == "train" else 0
    members: dict[str, list[str]] = {}
    for image_id, path in table.images.items():
        if table.is_training[image_id] == wanted_flag:
            members.setdefault(_cub_category(path, table.where(image_id)), []).append(image_id)
    found = sorted(members, key=lambda category: table.class_of(members[category][0]))
    default = [category for category in found if table.class_of(members[category][0]) <= CUB_DEFAULT_CLASSES]
    aliases = {str(table.class_of(members[category][0])): category for category in found}
    aliases.update({f"{int(number):03d}": category for number, category in list(aliases.items())})
    chosen = _choose_categories(found, categories, default, store.uri(posixpath.join(base, "images.txt")), aliases)
    rows, origins = [], []
    for category in chosen:
        for source_id, target_id in itertools.combinations(members[category], 2):
            row = _cub_row(store, base, table, source_id, target_id, category, split)
            if row is not None:
                rows.append(row)
                origins.append(f"{table.where(source_id)} and image {target_id}")
    return pairs_table(rows, "cub-pairs", origins=origins)


class _CubTables:
    """The CUB-200-2011 text tables, keyed by image id (a string, as the files write it)."""

    def __init__(self, store: _Store, base: str) -> None:
        self.images_path = store.uri(posixpath.join(base, "images.txt"))
        self.images = {row[0]: row[1] for row in self._read(store, base, "images.txt", 2, "id, path")}
        self.is_training = {
            row[0]: int(row[1]) for row in self._read(store, base, "train_test_split.txt", 2, "id, is_training_image")
        }
        self.labels = {row[0]: int(row[1]) for row in self._read(store, base, "image_class_labels.txt", 2, "id, class")}
        self.boxes = {
            row[0]: [float(v) for v in row[1:]]
            for row in self._read(store, base, "bounding_boxes.txt", 5, "id, x, y, width, height")
        }
        self.parts: dict[str, dict[int, tuple[float, float, bool]]] = {}  # image id -> part id -> (x, y, visible)
        for row in self._read(store, base, "parts/part_locs.txt", 5, "id, part, x, y, visible"):
            self.parts.setdefault(row[0], {})[int(row[1])] = (float(row[2]), float(row[3]), int(row[4]) > 0)
        self._check_complete(base, store)

    def _read(self, store: _Store, base: str, name: str, fields: int, layout: str) -> list[list[str]]:
        path = posixpath.join(base, name)
        rows = []
        for number, line in store.lines(path, f"the CUB-200-2011 table {name} ({layout})"):
            row = line.split(maxsplit=fields - 1) if name == "images.txt" else line.split()
            numbers = row[:1] if name == "images.txt" else row
            if len(row) != fields or not all(_is_decimal(v) for v in numbers):
                raise PairsError(f"{store.uri(path)}, line {number}: {line!r}; expected {fields} fields: {layout}")
            rows.append(row)
        return rows

    def _check_complete(self, base: str, store: _Store) -> None:
        tables = {
            "train_test_split.txt": self.is_training,
            "image_class_labels.txt": self.labels,
            "bounding_boxes.txt": self.boxes,
            "parts/part_locs.txt": self.parts,
        }
        for name, values in tables.items():
            absent = [image_id for image_id in self.images if image_id not in values]
            if absent:
                raise PairsError(
                    f"{store.uri(posixpath.join(base, name))}: no line for image ids {absent[:5]} of "
                    f"{self.images_path}; expected a line for every image"
                )

    def class_of(self, image_id: str) -> int:
        return self.labels[image_id]

    def where(self, image_id: str) -> str:
        return f"{self.images_path}, image {image_id}"


def _is_decimal(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _cub_category(path: str, where: str) -> str:
    folder, _, name = path.partition("/")
    if not name:
        raise PairsError(f"{where}: path {path!r}; expected '<class folder>/<file>'")
    return folder


def _cub_row(
    store: _Store, base: str, table: _CubTables, source_id: str, target_id: str, category: str, split: str
) -> dict | None:
    """The pair's row with the parts visible in both images, or None when there is none."""
    source_parts, target_parts = table.parts[source_id], table.parts[target_id]
    common = [
        (source_parts[part][:2], target_parts[part][:2])
        for part in sorted(source_parts)
        if part in target_parts and source_parts[part][2] and target_parts[part][2]
    ]
    if not common:
        return None
    x, y, width, height = table.boxes[target_id]
    images = posixpath.join(base, "images")
    return {
        "pair_id": f"{source_id}-{target_id}",
        "source_uri": store.require_image(posixpath.join(images, table.images[source_id]), table.where(source_id)),
        "target_uri": store.require_image(posixpath.join(images, table.images[target_id]), table.where(target_id)),
        "source_points_xy": [list(s) for s, _ in common],
        "target_points_xy": [list(t) for _, t in common],
        "target_box_xyxy": [x, y, x + width, y + height],
        "category": category,
        "split": split,
    }


# ---------------------------------------------------------------- the registry

_INFOS = (
    PairDatasetInfo(
        "spair",
        build_spair,
        SPAIR_SPLITS,
        "test",
        "SPair-71k: Layout/large/<split>.txt, PairAnnotation/<split>/*.json, JPEGImages/<category>/",
    ),
    PairDatasetInfo(
        "pf-willow",
        build_pf_willow,
        ("test",),
        "test",
        "PF-Willow: test_pairs.csv (imageA, imageB, XA1.., YA1.., XB1.., YB1..) and <class>/<image>.png",
    ),
    PairDatasetInfo(
        "cub-pairs",
        build_cub_pairs,
        ("train", "test"),
        "test",
        "CUB-200-2011: images.txt, train_test_split.txt, image_class_labels.txt, bounding_boxes.txt, "
        "parts/part_locs.txt, images/",
    ),
)

PAIR_DATASETS: dict[str, PairDatasetInfo] = {info.name: info for info in _INFOS}
