"""The correspondence job: pairs of images matched point by point on Ray Data, scored by PCK.

The run, for ``--method dift``:

1. the driver checks the settings, the model and the UNet weights, reads the
   pairs (a manifest, or a dataset's published layout), takes the output's
   lease (one writer at a time) and drops the pairs that already have a row
   in the output (so a rerun resumes without duplicates or gaps);
2. feature extraction (``dift_stage.extract_features``): every image of the
   remaining pairs whose features are not in the feature cache is decoded by
   CPU tasks and run through model-holding actors, several images per UNet
   call; each image is extracted once however many pairs use it;
3. matching (``dift_stage.match_pairs``): each pair's two cached feature maps
   are matched (``match_points``) and one row per pair is written as Parquet;
   a pair whose image failed becomes an error row naming the image and cause;
4. ``metrics.json`` (PCK@0.05 and PCK@0.1 per image and per point, per
   category and overall), a picture of a few pairs and ``report.html`` are
   written beside the rows, with a summary under ``_summary/``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from skp_ray.config import checked, option
from skp_ray.correspondence.dift_stage import extract_features, feature_settings, match_pairs, pair_items
from skp_ray.correspondence.feature_cache import STORAGE_DTYPES, FeatureCache
from skp_ray.correspondence.match_store import MATCHES
from skp_ray.correspondence.pairs import build_pairs, read_pairs
from skp_ray.correspondence.report import PCK_REFERENCES, write_report
from skp_ray.diffusion import DIFT_MODEL, DTYPES, check_model, check_unet_weights, model_location
from skp_ray.images import ALPHA_MODES, DEFAULT_MAX_PIXELS, absolute_uri
from skp_ray.lease import OutputLease
from skp_ray.ray_cluster import connect, parse_actors, use_gpus, wait_for_gpus
from skp_ray.row_store import done_ids, row_files, write_summary

__all__ = ["CorrespondConfig", "CorrespondSummary", "CorrespondenceFailed", "run_correspondence"]

METHODS = ("dift",)
SHOWN_FAILURES = 10
SUMMARY_FAILURES = 1000


@dataclass
class CorrespondConfig:
    pairs: str = option(help="pairs manifest (.parquet/.csv), or a dataset name (spair, pf-willow, cub-pairs) with --root")
    output: str = option(help="folder or URI for the rows (matches-*.parquet), metrics.json and report.html")
    method: str = option("dift", "correspondence method: dift")
    root: str | None = option(None, "the dataset's folder when --pairs names a dataset")
    split: str | None = option(None, "split of the pairs to run; default: test for a dataset, every row of a manifest")
    model: str = option(DIFT_MODEL, "hub id or folder of the model (skp_ray/tiny-sd21: the embedded tiny SD 2.1)")
    revision: str | None = option(None, "hub revision of --model")
    unet_weights: str | None = option(None, "replacement UNet weights: a .safetensors file, URI or <owner>/<repo>/<file>")
    timestep: int = option(261, "training timestep the latents are noised to (0..999; 0 still adds noise)")
    up_block: int = option(1, "the UNet up block whose output is the feature")
    ensemble_size: int = option(8, "noisy copies of each image averaged into its feature")
    image_size: int = option(768, "side the images are resized to (aspect not kept)")
    prompt: str = option("a photo of a {category}", "prompt; {category} is the pair's category (no category: empty)")
    no_noise: bool = option(False, "no posterior sample and no added noise (noise-free UNets such as CleanDIFT's)")
    seed: int = option(0, "seed of the noise (keyed with each image's content)")
    dtype: str = option("float32", "model weights: float32, float16 or bfloat16")
    feature_dtype: str = option("float32", "stored features: float32 or float16")
    feature_cache: str | None = option(None, "folder or URI of the feature cache; default: <output>/_features")
    max_batch: int = option(16, "UNet samples (images x ensemble copies) per UNet call")
    batch_size: int = option(4, "images per extraction call")
    pairs_batch_size: int = option(16, "pairs per matching call")
    actors: str = option("1", "actor pool: a fixed size N, or MIN,MAX to autoscale")
    use_gpu: bool | None = option(None, "one GPU per actor; default: GPUs if the cluster has them")
    cpus_per_actor: float = option(1.0, "CPUs per actor when no GPUs are used")
    pck_reference: str = option("box", "PCK threshold's reference: box (target object box) or image (image size)")
    report_pairs: int = option(6, "pairs drawn in pairs.png and report.html")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "images with more pixels become too_large errors")
    alpha: str = option("white", "transparency: 'white' composites onto white, 'drop' discards it")
    retry_errors: bool = option(False, "match again the pairs whose only rows are error rows")
    max_error_fraction: float = option(0.5, "exit non-zero when more than this fraction of the pairs fail")
    lease_timeout_s: float = option(300.0, "a lease on --output whose heartbeat is older than this is stale")
    gpu_wait_s: float = option(300.0, "with --use-gpu, how long to wait for a GPU before giving up")
    log_every_s: float = option(30.0, "seconds between progress lines in the log")
    progress: bool = option(True, "Ray Data's progress bars on a terminal")


@dataclass
class CorrespondSummary:
    output: str
    run_id: str
    listed: int  # pairs in the manifest (split)
    already_matched: int  # skipped: the output had their row
    matched: int  # rows written by this run
    errors: dict[str, int]  # error cause -> rows, this run
    failures: list[dict]  # the first failing pairs
    images_extracted: int
    images_cached: int  # features found in the cache
    seconds: float
    metrics: dict | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def failure(self, max_error_fraction: float) -> str | None:
        if self.matched and self.error_count == self.matched:
            return f"every one of the {self.matched} pairs matched failed"
        if self.matched and self.error_count / self.matched > max_error_fraction:
            return f"{self.error_count} of {self.matched} pairs failed, more than --max_error_fraction {max_error_fraction:g}"
        return None

    def describe(self) -> str:
        causes = ", ".join(f"{cause} {count}" for cause, count in sorted(self.errors.items()))
        lines = [
            f"[correspond] done: {self.matched} pairs matched ({self.matched - self.error_count} ok, {self.error_count} "
            f"errors{': ' + causes if causes else ''}), {self.already_matched} already matched; {self.images_extracted} "
            f"images extracted, {self.images_cached} from the feature cache ({self.seconds:.1f} s in all)"
        ]
        for failed in self.failures[:SHOWN_FAILURES]:
            lines.append(f"[correspond]   failed: pair {failed['pair_id']} ({failed['cause']}): {failed['error']}")
        if self.error_count > SHOWN_FAILURES:
            lines.append(f"[correspond]   ... and {self.error_count - SHOWN_FAILURES} more (see the summary file)")
        if self.metrics:
            for alpha in self.metrics["alphas"]:
                score = self.metrics["overall"][f"pck@{alpha:g}"]
                if score["per_image"] is not None:
                    lines.append(
                        f"[correspond] PCK@{alpha:g} ({self.metrics['reference']}): {100 * score['per_image']:.1f} per "
                        f"image, {100 * score['per_point']:.1f} per point"
                    )
        lines.append(f"[correspond] output: {self.output}")
        return "\n".join(lines)


class CorrespondenceFailed(RuntimeError):
    """Too many pairs failed; the rows, metrics and summary are written all the same."""

    def __init__(self, message: str, summary: CorrespondSummary):
        super().__init__(message)
        self.summary = summary


def run_correspondence(config: CorrespondConfig) -> CorrespondSummary:
    """Match every pair of ``config.pairs`` that has no row in ``config.output`` yet; returns the summary.

    Settings, the model, the UNet weights and the pairs are checked here on the
    driver before Ray starts an actor. Raises CorrespondenceFailed, after writing
    the rows, metrics and summary, when too many pairs failed. Joins the Ray
    cluster that ``RAY_ADDRESS`` names, or starts a local one.
    """
    started = time.perf_counter()
    config = checked(config)
    compute = _check_settings(config)
    check_model(model_location(config.model), revision=config.revision)
    if config.unet_weights:
        check_unet_weights(config.unet_weights)
    pairs = _read_pairs(config)
    output = absolute_uri(config.output)
    cache = FeatureCache(config.feature_cache or f"{output.rstrip('/')}/_features", feature_settings(config), storage_dtype=config.feature_dtype)
    run_id = uuid.uuid4().hex[:12]
    with OutputLease(output, run_id, stale_after_s=config.lease_timeout_s):
        files = row_files(output, MATCHES)
        _refuse_other_settings(files, cache, output)
        done = done_ids(files, retry_errors=config.retry_errors)
        todo = pairs.filter(pc.invert(pc.is_in(pairs["pair_id"], pa.array(sorted(done), pa.string()))))
        print(f"[correspond] {pairs.num_rows} pairs, {pairs.num_rows - todo.num_rows} already matched, {todo.num_rows} to match -> {output}")
        extracted = cached = 0
        if todo.num_rows:
            connect()
            config = dataclasses.replace(config, use_gpu=use_gpus(config.use_gpu))
            if config.use_gpu:
                wait_for_gpus(1, timeout_s=config.gpu_wait_s, what="the correspondence actors")
            items, images = pair_items(todo, config.prompt)
            cache.prepare()
            stored = cache.cached_keys()
            missing = [image for image in images if image["image_key"] not in stored]
            cached, extracted = len(images) - len(missing), len(missing)
            failures = extract_features(config, cache, missing, compute) if missing else {}
            match_pairs(config, cache, items, failures, output, run_id, compute)
        summary = _summarise(output, run_id, pairs.num_rows, pairs.num_rows - todo.num_rows, extracted, cached, started)
        summary.metrics = write_report(output, pairs, config, cache.hash)
        failure = summary.failure(config.max_error_fraction)
        write_summary(output, run_id, _record(summary, config, cache, failure))
    print(summary.describe())
    if failure:
        raise CorrespondenceFailed(f"[correspond] failed: {failure} (rows and summary written to {output})", summary)
    return summary


def _check_settings(config: CorrespondConfig):
    problems = []
    if config.method not in METHODS:
        problems.append(f"--method {config.method!r} is not one of {list(METHODS)}")
    if config.dtype not in DTYPES:
        problems.append(f"--dtype {config.dtype!r} is not one of {sorted(DTYPES)}")
    if config.feature_dtype not in STORAGE_DTYPES:
        problems.append(f"--feature_dtype {config.feature_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    if config.pck_reference not in PCK_REFERENCES:
        problems.append(f"--pck_reference {config.pck_reference!r} is not one of {list(PCK_REFERENCES)}")
    if config.alpha not in ALPHA_MODES:
        problems.append(f"--alpha {config.alpha!r} is not one of {list(ALPHA_MODES)}")
    if min(config.ensemble_size, config.max_batch, config.batch_size, config.pairs_batch_size, config.image_size) < 1:
        problems.append("--ensemble_size, --max_batch, --batch_size, --pairs_batch_size and --image_size must be at least 1")
    if not 0 <= config.max_error_fraction <= 1:
        problems.append(f"--max_error_fraction must lie in [0, 1] (got {config.max_error_fraction})")
    if "{" in config.prompt.replace("{category}", ""):
        problems.append(f"--prompt {config.prompt!r}: the only placeholder allowed is {{category}}")
    if problems:
        raise ValueError("invalid correspondence settings: " + "; ".join(problems))
    return parse_actors(config.actors)


def _refuse_other_settings(files, cache: FeatureCache, output: str) -> None:
    """Rows made with other feature settings would be skipped as done and mixed into the metrics: refuse."""
    hashes = set(files.read(["settings_hash"]).column("settings_hash").to_pylist()) - {cache.hash}
    if hashes:
        raise ValueError(
            f"{output} holds matches made with other settings (settings hash {', '.join(sorted(hashes))}; these "
            f"settings are {cache.hash}): give this run its own --output, or rerun with the settings of those rows "
            "(recorded in its _summary/ files)"
        )


def _read_pairs(config: CorrespondConfig) -> pa.Table:
    if config.root:
        return build_pairs(config.pairs, config.root, split=config.split, seed=config.seed)
    return read_pairs(config.pairs, split=config.split)


def _summarise(output, run_id, listed, already, extracted, cached, started) -> CorrespondSummary:
    errors, failures, matched = Counter(), [], 0
    if already < listed:
        table = row_files(output, MATCHES, log=lambda _: None).read(["pair_id", "status", "error_cause", "error", "run_id"])
        table = table.filter(pc.equal(table["run_id"], run_id))
        matched = table.num_rows
        failed = table.filter(pc.equal(table["status"], "error"))
        errors = Counter(failed.column("error_cause").to_pylist())
        failures = [
            {"pair_id": row["pair_id"], "cause": row["error_cause"], "error": row["error"]}
            for row in failed.slice(0, SUMMARY_FAILURES).to_pylist()
        ]
    seconds = time.perf_counter() - started
    return CorrespondSummary(output, run_id, listed, already, matched, dict(errors), failures, extracted, cached, seconds)


def _record(summary: CorrespondSummary, config: CorrespondConfig, cache: FeatureCache, failure: str | None) -> dict:
    return {
        "run_id": summary.run_id,
        "status": "failed" if failure else "ok",
        "failure": failure,
        "output": summary.output,
        "counts": {
            "listed": summary.listed,
            "already_matched": summary.already_matched,
            "matched": summary.matched,
            "ok": summary.matched - summary.error_count,
            "errors": summary.error_count,
            "images_extracted": summary.images_extracted,
            "images_cached": summary.images_cached,
        },
        "error_causes": summary.errors,
        "failures": summary.failures,
        "failures_truncated": summary.error_count > len(summary.failures),
        "feature_cache": cache.location,
        "seconds": summary.seconds,
        "settings": dataclasses.asdict(config),
    }
