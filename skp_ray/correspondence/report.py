"""The correspondence job's results: ``metrics.json``, ``pairs.png`` and ``report.html`` beside the rows.

PCK (SPEC 2) is computed from the output's rows alone (one per pair, the
newest), for the pairs of the run's manifest: a prediction is correct when it
lies within alpha x max(h, w) of the reference box (``--pck_reference``: the
target object box the manifest gives, or the target image) from the truth.
Pairs without ground truth, or without a box when the box is the reference,
are counted but not scored; error rows are counted as errors, not as misses.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skp_ray.correspondence.match_store import LOSS_PICTURE_FILE, METRICS_FILE, PICTURE_FILE, REPORT_FILE, read_matches
from skp_ray.correspondence.pairs import pairs_dataset
from skp_ray.correspondence.pck import correspondence_pck, image_size_box, summarise_pck
from skp_ray.images import read_image
from skp_ray.plotting import captioned, correspondence_pair, image_grid, line_plot, png_bytes
from skp_ray.row_store import write_bytes, write_json

ALPHAS = (0.05, 0.1)
PCK_REFERENCES = {
    "box": "max(h, w) of the target's object box (target_box_xyxy)",
    "image": "max(h, w) of the target image",
}
# SPEC 2 and 3: the published PCK in percent, by method and dataset name (skp_ray.correspondence.pair_datasets).
PUBLISHED = {
    ("dift", "spair"): {"pck@0.1": {"per_point": 59.5, "per_image": 52.9}},
    ("ldm", "spair"): {"pck@0.1": {"per_image": 45.4}, "pck@0.05": {"per_image": 28.9}},
    ("ldm", "pf-willow"): {"pck@0.1": {"per_image": 84.3}, "pck@0.05": {"per_image": 53.0}},
    ("ldm", "cub-pairs"): {"pck@0.1": {"per_image": 77.5}, "pck@0.05": {"per_image": 61.6}},
}


def write_report(output: str, pairs: pa.Table, config, settings_hash: str, loss_curve: list[float] | None = None) -> dict:
    """Write metrics.json, pairs.png and report.html for the manifest's pairs into ``output``; returns the
    metrics. With ``loss_curve`` (ldm: the mean loss per step of the contexts this run optimised) also
    contexts_loss.png, shown in the report."""
    rows = _rows_of(output, pairs)
    metrics = pck_metrics(rows, reference=config.pck_reference)
    dataset = pairs_dataset(pairs)
    metrics.update(
        method=config.method,
        dataset=dataset,
        published_percent=PUBLISHED.get((config.method, dataset)),
        model=config.model,
        settings_hash=settings_hash,
        settings=dataclasses.asdict(config),
    )
    write_json(output, METRICS_FILE, metrics)
    shown = [row for row in rows if row["status"] == "ok"][: config.report_pairs]
    picture = pairs_picture(shown, config.pck_reference) if shown else None
    if picture is not None:
        write_bytes(output, PICTURE_FILE, png_bytes(picture))
    loss_picture = None
    if loss_curve:
        title = f"context loss, mean of the {config.restarts} restarts of every point optimised"
        loss_picture = line_plot(loss_curve, title=title, ylabel="MSE to the Gaussian", width=560)
        write_bytes(output, LOSS_PICTURE_FILE, png_bytes(loss_picture))
    write_bytes(output, REPORT_FILE, _html(metrics, picture, loss_picture).encode())
    return metrics


def _rows_of(output: str, pairs: pa.Table) -> list[dict]:
    try:
        table = read_matches(output)
    except ValueError:
        return []
    table = table.filter(pc.is_in(table["pair_id"], pairs["pair_id"]))
    return sorted(table.to_pylist(), key=lambda row: row["pair_id"])


def pck_metrics(rows: list[dict], *, reference: str = "box", alphas=ALPHAS) -> dict:
    """PCK per image and per point, overall and per category, with the counts of what was not scored."""
    scored, unscored = [], {"error": 0, "no_ground_truth": 0, "no_reference_box": 0}
    for row in rows:
        box = _reference_box(row, reference)
        if row["status"] != "ok":
            unscored["error"] += 1
        elif not row["target_points_xy"]:
            unscored["no_ground_truth"] += 1
        elif box is None:
            unscored["no_reference_box"] += 1
        else:
            hits = {alpha: pair_hits(row, box, alpha) for alpha in alphas}
            scored.append({"category": row["category"], "hits": hits})
    summary = summarise_pck(scored, alphas=alphas)
    summary.update(reference=reference, reference_description=PCK_REFERENCES[reference], pairs=len(rows), unscored=unscored)
    return summary


def pair_hits(row: dict, box, alpha: float) -> np.ndarray:
    hits, _ = correspondence_pck(row["predicted_xy"], row["target_points_xy"], box_xyxy=box, alpha=alpha)
    return hits


def _reference_box(row: dict, reference: str):
    if reference == "image":
        return image_size_box(row["target_height"], row["target_width"]) if row["target_height"] else None
    return row["target_box_xyxy"]


def pairs_picture(rows: list[dict], reference: str, *, height: int = 192):
    """Each pair side by side: source points, predicted target points joined by lines, true points as rings."""
    panels = []
    for row in rows:
        box = _reference_box(row, reference)
        truth = np.asarray(row["target_points_xy"]) if row["target_points_xy"] else None
        caption = f"{row['pair_id']} ({row['category'] or 'no category'})"
        if truth is not None and box is not None:
            hits = pair_hits(row, box, 0.1)
            caption += f": {int(hits.sum())}/{len(hits)} within PCK@0.1"
        try:
            source, target = read_image(row["source_uri"]), read_image(row["target_uri"])
        except Exception as error:  # an image gone since it was matched: leave the pair out of the picture
            print(f"[correspond] pair {row['pair_id']} left out of {PICTURE_FILE}: {error}")
            continue
        pair = correspondence_pair(
            source, target, np.asarray(row["source_points_xy"]), np.asarray(row["predicted_xy"]), truth, height=height
        )
        panels.append(captioned(pair, caption))
    return image_grid(panels, columns=2) if panels else None


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _figure(file: str, picture, alt: str, caption: str) -> str:
    data = base64.b64encode(png_bytes(picture)).decode()
    return (
        f'<figure><a href="{file}"><img src="data:image/png;base64,{data}" alt="{alt}"></a>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _html(metrics: dict, picture, loss_picture=None) -> str:
    alphas = metrics["alphas"]
    header = "".join(f"<th>PCK@{a:g} per image</th><th>PCK@{a:g} per point</th>" for a in alphas)

    def table_row(name: str, part: dict) -> str:
        cells = "".join(
            f"<td>{_percent(part[f'pck@{a:g}']['per_image'])}</td><td>{_percent(part[f'pck@{a:g}']['per_point'])}</td>"
            for a in alphas
        )
        return f"<tr><th>{html.escape(name)}</th><td>{part['pairs']}</td><td>{part['points']}</td>{cells}</tr>"

    body = table_row("overall", metrics["overall"]) + "".join(
        table_row(name or "(no category)", part) for name, part in metrics["per_category"].items()
    )
    figure = ""
    if picture is not None:
        caption = "Source points (left) and predicted target points (right) joined by lines; rings: the true target points."
        figure = _figure(PICTURE_FILE, picture, "matched pairs", caption)
    if loss_picture is not None:
        caption = "The optimisation's loss at each step, averaged over the contexts this run optimised (each step sees its own random crop)."
        figure += _figure(LOSS_PICTURE_FILE, loss_picture, "context loss curve", caption)
    published = html.escape(json.dumps(metrics["published_percent"])) if metrics["published_percent"] else "-"
    title = f"{metrics['method']} on {metrics['dataset'] or 'user pairs'}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>skp_ray correspondence: {html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}th,td{text-align:left;padding:0.2em 0.8em}"
        "img{max-width:100%}figure{margin:2em 0}</style></head><body>"
        f"<h1>Correspondence: {html.escape(title)}</h1>"
        f"<p>PCK in percent; the threshold's reference: {html.escape(metrics['reference_description'])}. "
        f"{metrics['pairs']} pairs, not scored: {html.escape(json.dumps(metrics['unscored']))}. "
        f"Published (percent): {published}.</p>"
        f"<table><tr><th></th><th>pairs</th><th>points</th>{header}</tr>{body}</table>{figure}"
        f"<h2>Settings</h2><pre>{html.escape(json.dumps(metrics['settings'], indent=2, default=str))}</pre>"
        "</body></html>\n"
    )
