"""The evaluation's pictures and one self-contained HTML report linking them with the metrics table.

Pictures (PNG, beside ``metrics.json``):

- ``keypoints.png``: test images with the discovered keypoints, numbered, keypoint i in colour i;
- ``landmarks.png``: predicted landmarks (numbered dots) against the ground truth (rings);
- ``attention.png``: one row per keypoint, its attention map over several test images (needs the artifact);
- ``loss.png``: the discovery loss curve (needs the artifact).

``report.html`` embeds them (base64), so it can be mailed or opened from a bucket as one file.
"""

from __future__ import annotations

import base64
import html
import json
import posixpath

import fsspec
import numpy as np
import ray
import torch
from PIL import Image

from skp_ray.artifact import KeypointArtifact
from skp_ray.attention import attention_maps
from skp_ray.images import ImageSource, load_source, resize_batch
from skp_ray.label_detector import detection_options, load_artifact_model
from skp_ray.plotting import (
    draw_keypoints,
    heatmap_overlay,
    image_grid,
    keypoint_colours,
    label_rows,
    landmark_comparison,
    line_plot,
    png_bytes,
)
from skp_ray.randomness import keyed_generator
from skp_ray.ray_cluster import connect, use_gpus

REPORT_FILE = "report.html"
PICTURE_SIZE = 192  # pixels per image in the pictures
GRID_COLUMNS = 4

# Options of the attention maps; detection_options also carries the augmentation ranges.
_MAP_OPTIONS = ("layers", "noise_level", "feature_upsample_res", "image_size")


def write_report(evaluation, *, artifact: KeypointArtifact | None, config) -> dict[str, str]:
    """Write the pictures and report.html into the evaluation's output; returns picture name -> file name."""
    count = min(config.report_images, len(evaluation.test.rows))
    views = _views(evaluation.test.rows[:count])
    pictures = {
        "Discovered keypoints on test images": ("keypoints.png", _keypoint_grid(views, evaluation.test.keypoints)),
        "Predicted (dots) versus ground-truth (rings) landmarks": (
            "landmarks.png",
            _landmark_grid(views, evaluation),
        ),
    }
    if artifact is not None:
        pictures["Attention map of each keypoint (one row per keypoint)"] = (
            "attention.png",
            _attention_strips(artifact, views, evaluation.test.keypoints, config),
        )
        pictures["Discovery loss"] = ("loss.png", line_plot(artifact.loss_history, title="discovery loss"))
    files = {title: name for title, (name, _) in pictures.items()}
    fs, folder = fsspec.core.url_to_fs(evaluation.output)
    for name, picture in pictures.values():
        fs.pipe_file(posixpath.join(folder, name), png_bytes(picture))
    page = _html(evaluation.metrics, {title: png_bytes(picture) for title, (_, picture) in pictures.items()}, files)
    fs.pipe_file(posixpath.join(folder, REPORT_FILE), page.encode())
    return files


def _views(rows: list[dict]) -> torch.Tensor:
    """The model's view of each manifest row (masked, cropped), float [N, 3, S, S]."""
    views = []
    for row in rows:
        box = tuple(row["crop_box"]) if row["crop_box"] is not None else None
        views.append(load_source(ImageSource(row["uri"], box, row["mask_uri"]), size=PICTURE_SIZE).pixels)
    return torch.stack(views)


def _keypoint_grid(views: torch.Tensor, keypoints_xy: np.ndarray) -> Image.Image:
    marked = [draw_keypoints(view, points, order="xy_normalized") for view, points in zip(views, keypoints_xy)]
    return image_grid(marked, columns=GRID_COLUMNS)


def _landmark_grid(views: torch.Tensor, evaluation) -> Image.Image:
    test = evaluation.test
    marked = [
        landmark_comparison(view, truth, prediction, visible, order="xy_normalized")
        for view, truth, prediction, visible in zip(views, test.landmarks, evaluation.prediction, test.visible)
    ]
    return image_grid(marked, columns=GRID_COLUMNS)


def _attention_strips(artifact, views: torch.Tensor, keypoints_xy: np.ndarray, config) -> Image.Image:
    return _attention_picture(views, _token_maps(artifact, views, config), keypoints_xy)


def _attention_picture(views: torch.Tensor, maps: torch.Tensor, keypoints_xy: np.ndarray) -> Image.Image:
    """Row k, labelled "keypoint k" in colour k: keypoint k's map [N, K, h, w] over each view, with that
    keypoint (normalised (x, y) [N, K, 2]) drawn alone."""
    count = maps.shape[1]
    rows = []
    for k in range(count):
        cells = [
            draw_keypoints(heatmap_overlay(view, image_maps[k]), points, order="xy_normalized", only=k)
            for view, image_maps, points in zip(views, maps, keypoints_xy)
        ]
        rows.append(image_grid(cells, columns=len(cells), pad=2))
    return label_rows(rows, [f"keypoint {k}" for k in range(count)], colours=keypoint_colours(count))


def _token_maps(artifact, views: torch.Tensor, config) -> torch.Tensor:
    """The keypoint tokens' maps for each image [N, K, h, w]: in a Ray task on a GPU when the run uses
    GPUs (the driver of a cluster job may sit on a CPU-only head), else here on the CPU."""
    if config.use_gpu is not False:
        connect()
        if use_gpus(config.use_gpu):
            task = ray.remote(num_gpus=1)(_maps_on_device)
            return ray.get(task.remote(artifact, views, config, "cuda"))
    return _maps_on_device(artifact, views, config, "cpu")


def _maps_on_device(artifact, views: torch.Tensor, config, device: str) -> torch.Tensor:
    diffusion = load_artifact_model(artifact, model=config.model, dtype=config.dtype, device=device)
    options = {key: value for key, value in detection_options(artifact.settings).items() if key in _MAP_OPTIONS}
    size = artifact.image_size
    context = artifact.context.to(device)
    maps = []
    with torch.no_grad():
        for i, view in enumerate(views):
            generator = keyed_generator(config.seed, "report-maps", i)
            image = resize_batch(view[None], size).to(device)
            maps.append(
                attention_maps(
                    diffusion, image, context, token_indices=artifact.token_indices, generator=generator, **options
                ).cpu()
            )
    return torch.cat(maps)


def _html(metrics: dict, pngs: dict[str, bytes], files: dict[str, str]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>"
        for label, value in (
            ("dataset", metrics["dataset"]),
            ("metric", f"{metrics['metric']}: {metrics['description']}"),
            ("value (as published)", f"{metrics['reported']:.4g}"),
            ("published", "-" if metrics["published"] is None else metrics["published"]),
            ("raw value", f"{metrics['value']:.6g}"),
            ("regressor", metrics["regressor"]),
            ("images", f"{metrics['images']['train']} train, {metrics['images']['test']} test"),
            ("left out", json.dumps(metrics["images"]["left_out"])),
            ("keypoints / landmarks", f"{metrics['keypoints']} / {metrics['landmarks']}"),
            ("artifact", metrics["artifact_id"]),
        )
    )
    figures = "".join(
        f'<figure><a href="{html.escape(files[title])}"><img src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}" alt="{html.escape(title)}"></a>'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, data in pngs.items()
    )
    settings = html.escape(json.dumps(metrics["settings"], indent=2))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>skp_ray evaluation: {html.escape(metrics['dataset'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}"
        "img{max-width:100%}figure{margin:2em 0}</style></head><body>"
        f"<h1>Evaluation on {html.escape(metrics['dataset'])}</h1><table>{rows}</table>{figures}"
        f"<h2>Settings</h2><pre>{settings}</pre></body></html>\n"
    )
