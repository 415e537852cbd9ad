"""Miniature copies of the published correspondence benchmarks, written into a folder by the tests.

Each image shows one "object" (an ellipse filling its box) on a textured background, with its
parts drawn as small discs of part-specific colours at the annotated points, so that a pair's
ground truth points at the same drawn part in both images. Images are small (40..120 pixels a
side unless ``image_size`` fixes (width, height)) and seeded: the same arguments write the same
files. The layouts are those ``skp_ray.correspondence.pair_datasets`` documents.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CUB_CLASS_NAMES",
    "PF_WILLOW_CLASSES",
    "make_cub_pairs",
    "make_pf_willow",
    "make_spair",
    "spair_annotation",
]

SIDE_RANGE = (40, 120)
PF_WILLOW_CLASSES = (
    "car(G)",
    "car(M)",
    "car(S)",
    "duck(S)",
    "motorbike(G)",
    "motorbike(M)",
    "motorbike(S)",
    "winebottle(M)",
    "winebottle(wC)",
    "winebottle(woC)",
)
CUB_CLASS_NAMES = (
    "001.Black_footed_Albatross",
    "002.Laysan_Albatross",
    "003.Sooty_Albatross",
    "004.Groove_billed_Ani",
    "005.Crested_Auklet",
)
CUB_PARTS = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
    "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip


# ---------------------------------------------------------------- drawing


class _Object:
    """One drawn object: the image size, its box [x1, y1, x2, y2] and its parts' integer pixels."""

    def __init__(self, rng: np.random.Generator, layout: np.ndarray, image_size: tuple[int, int] | None) -> None:
        self.width, self.height = image_size or tuple(int(v) for v in rng.integers(*SIDE_RANGE, size=2, endpoint=True))
        box_width = int(rng.integers(int(0.55 * self.width), int(0.9 * self.width), endpoint=True))
        box_height = int(rng.integers(int(0.55 * self.height), int(0.9 * self.height), endpoint=True))
        x1 = int(rng.integers(0, self.width - box_width, endpoint=True))
        y1 = int(rng.integers(0, self.height - box_height, endpoint=True))
        self.box = [x1, y1, x1 + box_width - 1, y1 + box_height - 1]
        # a part sits at a fixed place relative to the box; pixels are whole (x, y)
        self.parts = [[x1 + int(u * (box_width - 1)), y1 + int(v * (box_height - 1))] for u, v in layout]

    def save(self, path: Path, rng: np.random.Generator, colour: tuple[int, int, int], visible: list[bool]) -> None:
        yy, xx = np.mgrid[0 : self.height, 0 : self.width]
        background = np.stack([40 + 60 * xx / self.width, 40 + 60 * yy / self.height, 70 + 0 * xx], axis=-1)
        background += rng.normal(0, 6, size=background.shape)
        image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse(self.box, fill=colour)
        radius = max(2, min(self.width, self.height) // 20)
        for index, ((x, y), shown) in enumerate(zip(self.parts, visible)):
            if shown:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_part_colour(index))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jpg":
            image.save(path, quality=95)
        else:
            image.save(path)


def _part_colour(index: int) -> tuple[int, int, int]:
    hue = (index * 0.61803) % 1.0  # golden-ratio steps keep neighbouring parts apart
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    return tuple(int(40 + 215 * v) for v in rgb)


def _layout(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` part places (u, v) in [0.15, 0.85]^2 of an object's box."""
    return rng.uniform(0.15, 0.85, size=(count, 2))


def _object_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(120, 200, size=3))


# ---------------------------------------------------------------- SPair-71k

SPAIR_SPLITS = ("trn", "val", "test")
SPAIR_PARTS = 5


def make_spair(
    root: str | os.PathLike,
    *,
    categories: tuple[str, ...] = ("cat", "dog"),
    pairs_per_split: int = 2,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Path:
    """SPair-71k's layout under ``root`` (the SPair-71k folder): ``JPEGImages/<category>/*.jpg``,
    ``PairAnnotation/{trn,val,test}/<n>-<src>-<trg>:<category>.json``, ``Layout/large/<split>.txt``
    (every pair) and ``Layout/small/<split>.txt`` (the first pair of each category).

    Each category gets ``pairs_per_split`` pairs in each split, numbered across the split's
    categories; a pair's points are the parts drawn in both images (one image in three hides a part).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    layouts: dict[str, list[str]] = {split: [] for split in SPAIR_SPLITS}
    small: dict[str, list[str]] = {split: [] for split in SPAIR_SPLITS}
    numbers = {split: 0 for split in SPAIR_SPLITS}
    for category in categories:
        images = _spair_images(root, category, 3 * pairs_per_split, image_size, rng)
        ordered = list(itertools.permutations(range(len(images)), 2))
        chosen = [ordered[i] for i in rng.permutation(len(ordered))[: 3 * pairs_per_split]]
        for index, (a, b) in enumerate(chosen):
            split = SPAIR_SPLITS[index // pairs_per_split]
            numbers[split] += 1
            name = f"{numbers[split]:06d}-{images[a]['stem']}-{images[b]['stem']}:{category}"
            annotation = spair_annotation(name, category, images[a], images[b], numbers[split])
            _write_json(root / "PairAnnotation" / split / f"{name}.json", annotation)
            layouts[split].append(name)
            if index % pairs_per_split == 0:
                small[split].append(name)
    for split in SPAIR_SPLITS:
        _write_lines(root / "Layout" / "large" / f"{split}.txt", layouts[split])
        _write_lines(root / "Layout" / "small" / f"{split}.txt", small[split])
    return root


def _spair_images(root: Path, category: str, pair_count: int, image_size, rng: np.random.Generator) -> list[dict]:
    """Enough images of one category for ``pair_count`` distinct ordered pairs."""
    count = 3
    while count * (count - 1) < pair_count:
        count += 1
    layout, colour = _layout(rng, SPAIR_PARTS), _object_colour(rng)
    images = []
    for index in range(count):
        drawn = _Object(rng, layout, image_size)
        visible = [True] * SPAIR_PARTS
        if index % 3 == 2:
            visible[int(rng.integers(SPAIR_PARTS))] = False
        stem = f"{2008 + index % 3}_{100 * (index + 1) + int(rng.integers(100)):06d}"  # unique in the category
        drawn.save(root / "JPEGImages" / category / f"{stem}.jpg", rng, colour, visible)
        images.append({"stem": stem, "object": drawn, "visible": visible})
    return images


def spair_annotation(name: str, category: str, source: dict, target: dict, pair_number: int) -> dict:
    """A PairAnnotation JSON: the parts visible in both images, as integer (x, y) pixels."""
    common = [i for i in range(SPAIR_PARTS) if source["visible"][i] and target["visible"][i]]
    src, trg = source["object"], target["object"]
    return {
        "pair_id": pair_number,
        "filename": name,
        "src_imname": f"{source['stem']}.jpg",
        "trg_imname": f"{target['stem']}.jpg",
        "src_imsize": [src.width, src.height, 3],
        "trg_imsize": [trg.width, trg.height, 3],
        "src_bndbox": src.box,
        "trg_bndbox": trg.box,
        "category": category,
        "src_kps": [src.parts[i] for i in common],
        "trg_kps": [trg.parts[i] for i in common],
        "kps_ids": [str(i) for i in common],
        "mirror": 0,
        "viewpoint_variation": 0,
        "scale_variation": 0,
        "truncation": 0,
        "occlusion": 0,
    }


# ---------------------------------------------------------------- PF-Willow

PF_WILLOW_POINTS = 10
_PF_WILLOW_STEMS = {"car": "Cars", "duck": "Duck", "motorbike": "Motorbikes", "winebottle": "Wine"}


def make_pf_willow(
    root: str | os.PathLike,
    *,
    categories: tuple[str, ...] = ("car(G)", "duck(S)"),
    pairs_per_category: int = 2,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Path:
    """PF-Willow's layout under ``root`` (the PF-WILLOW folder): ``test_pairs.csv`` with columns
    imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10 and image names
    ``PF-dataset/<class>/<file>.png``, the images at ``<class>/<file>.png``. Points are pixels with
    two decimals (as ``float`` reads them back from the CSV text)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for category in categories:
        layout, colour = _layout(rng, PF_WILLOW_POINTS), _object_colour(rng)
        stem = _PF_WILLOW_STEMS[category.split("(")[0]]
        count = pairs_per_category + 1
        names, objects = [], []
        for index in range(count):
            drawn = _Object(rng, layout, image_size)
            name = f"{stem}_{index:03d}{'ab'[index % 2]}.png"
            drawn.save(root / category / name, rng, colour, [True] * PF_WILLOW_POINTS)
            names.append(name)
            objects.append(drawn)
        for a, b in list(itertools.combinations(range(count), 2))[:pairs_per_category]:
            source, target = _pf_willow_points(objects[a], rng), _pf_willow_points(objects[b], rng)
            rows.append(
                [f"PF-dataset/{category}/{names[a]}", f"PF-dataset/{category}/{names[b]}"]
                + [f"{p[0]:.2f}" for p in source] + [f"{p[1]:.2f}" for p in source]
                + [f"{p[0]:.2f}" for p in target] + [f"{p[1]:.2f}" for p in target]
            )  # fmt: skip
    numbers = range(1, PF_WILLOW_POINTS + 1)
    header = ["imageA", "imageB"] + [f"{a}{i}" for a in ("XA", "YA", "XB", "YB") for i in numbers]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "test_pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return root


def _pf_willow_points(drawn: _Object, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The drawn parts with a sub-pixel offset, as the published annotations have."""
    return [(x + float(rng.uniform(0, 0.99)), y + float(rng.uniform(0, 0.99))) for x, y in drawn.parts]


# ---------------------------------------------------------------- CUB-200-2011


def make_cub_pairs(
    root: str | os.PathLike,
    *,
    classes: int = 4,
    images_per_class: int = 6,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Path:
    """CUB-200-2011's layout under ``root/CUB_200_2011``: images.txt, train_test_split.txt
    (images alternate train, test), image_class_labels.txt, classes.txt, bounding_boxes.txt
    (x, y, width, height), parts/parts.txt, parts/part_locs.txt (x, y, visible; invisible parts
    at 0, 0) and ``images/<class>/<file>.jpg``. Returns ``root``.

    In class 002 the first test image shows parts 1..7 only and the last one parts 8..15 only, so
    that pair has no part visible in both.
    """
    base = Path(root) / "CUB_200_2011"
    rng = np.random.default_rng(seed)
    lines = {name: [] for name in ("images", "split", "labels", "boxes", "parts")}
    image_id = 0
    for class_index, class_name in enumerate(CUB_CLASS_NAMES[:classes], start=1):
        layout, colour = _layout(rng, len(CUB_PARTS)), _object_colour(rng)
        test_images = [i for i in range(images_per_class) if i % 2 == 1]
        for index in range(images_per_class):
            image_id += 1
            drawn = _Object(rng, layout, image_size)
            visible = _cub_visibility(class_index, index, test_images, rng)
            file = f"{class_name.split('.')[1]}_{index + 1:04d}_{int(rng.integers(1, 99999))}.jpg"
            drawn.save(base / "images" / class_name / file, rng, colour, visible)
            x1, y1, x2, y2 = drawn.box
            lines["images"].append(f"{image_id} {class_name}/{file}")
            lines["split"].append(f"{image_id} {1 - index % 2}")
            lines["labels"].append(f"{image_id} {class_index}")
            lines["boxes"].append(f"{image_id} {float(x1)} {float(y1)} {float(x2 - x1 + 1)} {float(y2 - y1 + 1)}")
            for part, ((x, y), shown) in enumerate(zip(drawn.parts, visible), start=1):
                location = f"{float(x)} {float(y)} 1" if shown else "0.0 0.0 0"
                lines["parts"].append(f"{image_id} {part} {location}")
    _write_lines(base / "images.txt", lines["images"])
    _write_lines(base / "train_test_split.txt", lines["split"])
    _write_lines(base / "image_class_labels.txt", lines["labels"])
    _write_lines(base / "classes.txt", [f"{i} {name}" for i, name in enumerate(CUB_CLASS_NAMES[:classes], start=1)])
    _write_lines(base / "bounding_boxes.txt", lines["boxes"])
    _write_lines(base / "parts" / "parts.txt", [f"{i} {name}" for i, name in enumerate(CUB_PARTS, start=1)])
    _write_lines(base / "parts" / "part_locs.txt", lines["parts"])
    return Path(root)


def _cub_visibility(class_index: int, index: int, test_images: list[int], rng: np.random.Generator) -> list[bool]:
    parts = len(CUB_PARTS)
    if class_index == 2 and index == test_images[0]:
        return [i < 7 for i in range(parts)]
    if class_index == 2 and index == test_images[-1]:
        return [i >= 7 for i in range(parts)]
    return [bool(v) for v in rng.uniform(size=parts) < 0.75]


# ---------------------------------------------------------------- files


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
