"""Dataset adapters: each reads a published dataset's layout on disk and returns a manifest.

A manifest is a pyarrow Table with one row per image (see ``manifest.MANIFEST_SCHEMA``).
``DATASETS`` names every adapter with the evaluation metric and keypoint regressor that go with it;
``build_manifest(name, root)`` runs one.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import fsspec
import pyarrow as pa

from skp_ray.config import option
from skp_ray.datasets.celeba import build_celeba_aligned, build_celeba_wild
from skp_ray.datasets.cub import build_cub_aligned, build_cub_class
from skp_ray.datasets.custom import build_custom, build_samples
from skp_ray.datasets.deepfashion import build_deepfashion
from skp_ray.datasets.human36m import build_h36m, build_h36m_unaligned
from skp_ray.datasets.manifest import MANIFEST_SCHEMA, DatasetError, manifest_table, read_manifest, write_manifest
from skp_ray.datasets.taichi import FIT_SPLIT as TAICHI_FIT_SPLIT
from skp_ray.datasets.taichi import build_taichi

__all__ = [
    "DATASETS",
    "MANIFEST_SCHEMA",
    "DatasetError",
    "DatasetInfo",
    "ManifestConfig",
    "build_manifest",
    "make_manifest",
    "manifest_table",
    "read_manifest",
    "write_manifest",
]


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset adapter.

    ``build(root, *, seed, workdir)`` returns the manifest; ``metric`` is one of "inter_eye_distance",
    "visible", "mean_average_error", "pck", "orientation_invariant" or None; ``regressor`` one of
    "plain", "visible", "swap" or None. The evaluation fits the regressor on the manifest rows of
    ``fit_split`` and measures the metric on those of ``test_split``.
    """

    name: str
    build: Callable[..., pa.Table]
    metric: str | None
    regressor: str | None
    description: str
    fit_split: str = "train"
    test_split: str = "test"


def _cub_info(name: str, class_id: int | None, what: str) -> DatasetInfo:
    description = f"CUB-200-2011 {what}, CMR layout, square crop of the padded bird box"
    return DatasetInfo(name, build_cub_class(class_id, name), "visible", "visible", description)


_INFOS = (
    DatasetInfo(
        "celeba_aligned",
        build_celeba_aligned,
        "inter_eye_distance",
        "plain",
        "CelebA aligned faces, MAFL train/test split, 5 landmarks",
    ),
    DatasetInfo(
        "celeba_wild",
        build_celeba_wild,
        "inter_eye_distance",
        "plain",
        "CelebA in the wild, MAFL split, images whose face box covers < 30% of the image dropped",
    ),
    DatasetInfo(
        "cub_aligned",
        build_cub_aligned,
        "visible",
        "visible",
        "CUB-200-2011 aligned birds from cub.h5 (images written as PNG into workdir)",
    ),
    _cub_info("cub_001", 1, "class 001 (Black-footed Albatross)"),
    _cub_info("cub_002", 2, "class 002 (Laysan Albatross)"),
    _cub_info("cub_003", 3, "class 003 (Sooty Albatross)"),
    _cub_info("cub_all", None, "all classes"),
    DatasetInfo(
        "taichi",
        build_taichi,
        "mean_average_error",
        "visible",
        "Tai-Chi-HD 256-pixel frames: train/ to learn from, the published landmark pickles' images to evaluate",
        fit_split=TAICHI_FIT_SPLIT,
    ),
    DatasetInfo(
        "deepfashion",
        build_deepfashion,
        "pck",
        "plain",
        "DeepFashion in-shop full-body images with 256-pixel keypoints",
    ),
    DatasetInfo(
        "h36m",
        build_h36m,
        "orientation_invariant",
        "swap",
        "Human3.6M masked pre-cropped frames, 6 actions, S1-S9 train, S11 test",
    ),
    DatasetInfo(
        "h36m_unaligned",
        build_h36m_unaligned,
        "orientation_invariant",
        "swap",
        "Human3.6M full frames with a seeded, jittered square crop around the person",
    ),
    DatasetInfo("custom", build_custom, None, None, "every image under a folder or fsspec URL, no ground truth"),
    DatasetInfo(
        "samples",
        build_samples,
        "inter_eye_distance",
        "plain",
        "bundled cartoon faces written by skp_ray.samples.write_sample_images",
    ),
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _INFOS}


def build_manifest(dataset: str, root: str, *, seed: int = 0, workdir: str | None = None) -> pa.Table:
    """The manifest of ``dataset`` (a name in ``DATASETS``) stored under ``root``."""
    info = DATASETS.get(dataset)
    if info is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(sorted(DATASETS))}")
    table = info.build(root, seed=seed, workdir=workdir)
    if table.num_rows == 0:
        raise DatasetError(f"{root}: no images found for dataset {dataset!r}; expected: {info.description}")
    return table


@dataclass
class ManifestConfig:
    dataset: str = option(help="a dataset name (skp_ray.datasets.DATASETS), e.g. celeba_wild or taichi")
    root: str = option(help="the dataset's folder, as distributed")
    output: str = option(help="the manifest's Parquet file (local path or URL)")
    seed: int = option(0, "seeded crops (h36m_unaligned)")
    workdir: str | None = option(None, "where cub_aligned writes its images; default: the manifest's folder")


def make_manifest(config: ManifestConfig) -> str:
    """Build the manifest of a dataset, write it to ``config.output`` and print its counts; returns the path."""
    workdir = config.workdir or posixpath.dirname(config.output.rstrip("/")) or "."
    table = build_manifest(config.dataset, config.root, seed=config.seed, workdir=workdir)
    fs, path = fsspec.core.url_to_fs(config.output)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_manifest(table, config.output)
    splits = Counter(table.column("split").to_pylist())
    counts = ", ".join(f"{count} {split}" for split, count in sorted(splits.items()))
    print(f"[manifest] {config.dataset}: {table.num_rows} images ({counts}) -> {config.output}")
    return config.output
