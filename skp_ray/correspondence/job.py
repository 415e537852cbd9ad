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

``--method ldm`` (SPEC 3) runs the same steps 1 and 4 on the same pairs and
rows; between them:

2. contexts (``ldm_stage.optimise_contexts``): every source image of the
   remaining pairs with query points whose contexts are not in the context
   store is decoded by CPU tasks, and model-holding actors optimise all its
   missing points in one call (points x restarts batched); each point is
   optimised once however many pairs use it;
3. localisation (``ldm_stage.locate_pairs``): each pair's target is decoded
   and actors locate all its source points, from their stored contexts, in
   one call; one row per pair is written as for DIFT.
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
from skp_ray.correspondence.context_store import ContextStore
from skp_ray.correspondence.dift_stage import extract_features, feature_settings, match_pairs, pair_items
from skp_ray.correspondence.feature_cache import STORAGE_DTYPES, FeatureCache, settings_hash
from skp_ray.correspondence.ldm_settings import LDM_MODEL, LDM_TOKEN, context_settings, locate_settings
from skp_ray.correspondence.ldm_stage import locate_pairs, mean_loss_curve, missing_contexts, optimise_contexts
from skp_ray.correspondence.match_store import MATCHES
from skp_ray.correspondence.pairs import build_pairs, read_pairs
from skp_ray.correspondence.report import PCK_REFERENCES, write_report
from skp_ray.images import ALPHA_MODES, DEFAULT_MAX_PIXELS, absolute_uri
from skp_ray.lease import OutputLease
from skp_ray.model_source import DIFT_MODEL, DTYPE_NAMES, NUM_INFERENCE_STEPS, check_model, check_unet_weights, model_location
from skp_ray.ray_cluster import connect, parse_actors, use_gpus, wait_for_gpus
from skp_ray.row_store import SUMMARY_FAILURES, done_ids, failure_lines, row_files, run_failure, write_summary

__all__ = ["CorrespondConfig", "CorrespondSummary", "CorrespondenceFailed", "run_correspondence"]

METHODS = ("dift", "ldm")
DEFAULT_MODELS = {"dift": DIFT_MODEL, "ldm": LDM_MODEL}
DEFAULT_IMAGE_SIZES = {"dift": 768, "ldm": None}  # None: the model's own (512 for SD 1.4)


@dataclass
class CorrespondConfig:
    pairs: str = option(help="pairs manifest (.parquet/.csv), or a dataset name (spair, pf-willow, cub-pairs) with --root")
    output: str = option(help="folder or URI for the rows (matches-*.parquet), metrics.json and report.html")
    method: str = option("dift", "correspondence method: dift (DIFT features, SPEC 2) or ldm (prompt optimisation, SPEC 3)")
    root: str | None = option(None, "the dataset's folder when --pairs names a dataset")
    split: str | None = option(None, "split of the pairs to run; default: test for a dataset, every row of a manifest")
    model: str | None = option(
        None, f"hub id or folder of the model; default for dift: {DIFT_MODEL}; for ldm: {LDM_MODEL}; the embedded tiny "
        "models: skp_ray/tiny-sd21, skp_ray/tiny-sd15"
    )
    revision: str | None = option(None, "hub revision of --model")
    unet_weights: str | None = option(None, "replacement UNet weights: a .safetensors file, URI or <owner>/<repo>/<file>")
    timestep: int = option(261, "dift: training timestep the latents are noised to (0..999; 0 still adds noise)")
    up_block: int = option(1, "dift: the UNet up block whose output is the feature")
    ensemble_size: int = option(8, "dift: noisy copies of each image averaged into its feature")
    image_size: int | None = option(
        None, "side the images are resized to for the UNet (aspect not kept); default: 768 for dift, the model's own (512) for ldm"
    )
    prompt: str = option("a photo of a {category}", "dift: prompt; {category} is the pair's category (no category: empty)")
    no_noise: bool = option(False, "dift: no posterior sample and no added noise (for noise-free UNets such as CleanDIFT's)")
    num_steps: int = option(129, "ldm: Adam steps per context")
    lr: float = option(2.3756e-3, "ldm: Adam learning rate of the contexts")
    restarts: int = option(5, "ldm: independent initialisations per query point, averaged in localisation")
    num_tokens: int = option(77, f"ldm: tokens of a context; token {LDM_TOKEN}'s attention is supervised")
    sigma: float = option(27.98, "ldm: the target Gaussian's sigma in pixels of the 512 canvas")
    crop_fraction: float = option(0.9317, "ldm: side of the random square crops, as a fraction of the image's")
    crop_margin: float = option(0.15, "ldm: the point stays at least this fraction of the crop from its edges")
    noise_level: int = option(42, f"ldm: DDIM step index (0..{NUM_INFERENCE_STEPS - 1}) the latents are noised to; 42 is t = 140")
    passes: int = option(20, "ldm: crop passes per context over the target (4 corners, then around the running argmax)")
    published_quirks: bool = option(
        True, "ldm: the published code's quirks (uniform noise, half of the heads, t = 40 in localisation, the "
        "target's peak on integer indices); --no-published_quirks gives the clean variant (docs/departures.md)"
    )
    seed: int = option(0, "seed of the random draws (keyed with each image's content, and for ldm each point's pixel)")
    dtype: str = option("float32", "model weights: float32, float16 or bfloat16")
    feature_dtype: str = option("float32", "dift: stored features: float32 or float16")
    feature_cache: str | None = option(None, "dift: folder or URI of the feature cache; default: <output>/_features")
    context_cache: str | None = option(None, "ldm: folder or URI of the context store; default: <output>/_contexts")
    max_batch: int = option(16, "UNet samples per UNet call (dift: images x ensemble copies; ldm: points x restarts)")
    batch_size: int = option(4, "dift: images per extraction call (ldm optimises one image per call)")
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
    work: dict[str, int]  # dift: images_extracted, images_cached; ldm: points_optimised, points_reused
    seconds: float
    metrics: dict | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def images_extracted(self) -> int:
        return self.work.get("images_extracted", 0)

    @property
    def images_cached(self) -> int:  # features found in the cache
        return self.work.get("images_cached", 0)

    @property
    def points_optimised(self) -> int:
        return self.work.get("points_optimised", 0)

    @property
    def points_reused(self) -> int:  # contexts found in the store
        return self.work.get("points_reused", 0)

    def failure(self, max_error_fraction: float) -> str | None:
        """Why the run counts as failed, or None."""
        return run_failure(self.matched, self.error_count, max_error_fraction, "pairs", "matched")

    def describe(self) -> str:
        causes = ", ".join(f"{cause} {count}" for cause, count in sorted(self.errors.items()))
        if "points_optimised" in self.work:
            work = f"{self.points_optimised} points optimised, {self.points_reused} from the context store"
        else:
            work = f"{self.images_extracted} images extracted, {self.images_cached} from the feature cache"
        lines = [
            f"[correspond] done: {self.matched} pairs matched ({self.matched - self.error_count} ok, {self.error_count} "
            f"errors{': ' + causes if causes else ''}), {self.already_matched} already matched; {work} "
            f"({self.seconds:.1f} s in all)"
        ]
        failed = [f"pair {failed['pair_id']} ({failed['cause']}): {failed['error']}" for failed in self.failures]
        lines += failure_lines("correspond", failed, self.error_count)
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
    config = _with_method_defaults(checked(config))
    compute = _check_settings(config)
    check_model(model_location(config.model), revision=config.revision)
    if config.unet_weights:
        check_unet_weights(config.unet_weights)
    pairs = _read_pairs(config)
    output = absolute_uri(config.output)
    store, rows_hash = _store(config, output)
    run_id = uuid.uuid4().hex[:12]
    with OutputLease(output, run_id, stale_after_s=config.lease_timeout_s, tag=MATCHES.tag):
        files = row_files(output, MATCHES)
        _refuse_other_settings(files, rows_hash, output)
        done = done_ids(files, retry_errors=config.retry_errors)
        todo = pairs.filter(pc.invert(pc.is_in(pairs["pair_id"], pa.array(sorted(done), pa.string()))))
        print(f"[correspond] {pairs.num_rows} pairs, {pairs.num_rows - todo.num_rows} already matched, {todo.num_rows} to match -> {output}")
        work = dict.fromkeys(WORK_COUNTS[config.method], 0)
        loss_curve = None
        if todo.num_rows:
            connect()
            config = dataclasses.replace(config, use_gpu=use_gpus(config.use_gpu))
            if config.use_gpu:
                wait_for_gpus(1, timeout_s=config.gpu_wait_s, what="the correspondence actors")
            store.prepare()
            if config.method == "dift":
                work = _run_dift(config, store, todo, output, run_id, compute)
            else:
                work, loss_curve = _run_ldm(config, store, rows_hash, todo, output, run_id, compute)
        summary = _summarise(output, run_id, pairs.num_rows, pairs.num_rows - todo.num_rows, work, started)
        summary.metrics = write_report(output, pairs, config, rows_hash, loss_curve)
        failure = summary.failure(config.max_error_fraction)
        write_summary(output, run_id, _record(summary, config, store, failure))
    print(summary.describe())
    if failure:
        raise CorrespondenceFailed(f"[correspond] failed: {failure} (rows and summary written to {output})", summary)
    return summary


WORK_COUNTS = {"dift": ("images_extracted", "images_cached"), "ldm": ("points_optimised", "points_reused")}


def _with_method_defaults(config: CorrespondConfig) -> CorrespondConfig:
    """--model and --image_size left unset take the method's defaults."""
    if config.method not in METHODS:
        return config  # refused by _check_settings
    model = config.model or DEFAULT_MODELS[config.method]
    image_size = config.image_size if config.image_size is not None else DEFAULT_IMAGE_SIZES[config.method]
    return dataclasses.replace(config, model=model, image_size=image_size)


def _store(config: CorrespondConfig, output: str):
    """The method's store of intermediate results and the settings hash its rows carry."""
    if config.method == "dift":
        root = config.feature_cache or f"{output.rstrip('/')}/_features"
        cache = FeatureCache(root, feature_settings(config), storage_dtype=config.feature_dtype)
        return cache, cache.hash
    store = ContextStore(config.context_cache or f"{output.rstrip('/')}/_contexts", context_settings(config))
    return store, settings_hash(locate_settings(config))


def _run_dift(config, cache: FeatureCache, todo: pa.Table, output: str, run_id: str, compute) -> dict[str, int]:
    items, images = pair_items(todo, config.prompt)
    stored = cache.cached_keys()
    missing = [image for image in images if image["image_key"] not in stored]
    failures = extract_features(config, cache, missing, compute) if missing else {}
    match_pairs(config, cache, items, failures, output, run_id, compute)
    return {"images_extracted": len(missing), "images_cached": len(images) - len(missing)}


def _run_ldm(config, store: ContextStore, rows_hash: str, todo: pa.Table, output: str, run_id: str, compute):
    """Returns the work counts and the mean loss curve of the contexts optimised."""
    items, images = pair_items(todo, "")  # no prompt: one key per image
    work, reused = missing_contexts(items, images, store.cached_keys())
    sources = optimise_contexts(config, store, work, compute) if work else {}
    locate_pairs(config, store, rows_hash, items, sources, output, run_id, compute)
    counts = {
        "points_optimised": sum(source["optimised"] for source in sources.values()),
        "points_reused": reused + sum(source["reused"] for source in sources.values()),
    }
    return counts, mean_loss_curve(sources)


def _check_settings(config: CorrespondConfig):
    problems = []
    if config.method not in METHODS:
        problems.append(f"--method {config.method!r} is not one of {list(METHODS)}")
    if config.dtype not in DTYPE_NAMES:
        problems.append(f"--dtype {config.dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    if config.feature_dtype not in STORAGE_DTYPES:
        problems.append(f"--feature_dtype {config.feature_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    if config.pck_reference not in PCK_REFERENCES:
        problems.append(f"--pck_reference {config.pck_reference!r} is not one of {list(PCK_REFERENCES)}")
    if config.alpha not in ALPHA_MODES:
        problems.append(f"--alpha {config.alpha!r} is not one of {list(ALPHA_MODES)}")
    if config.method == "ldm":
        problems += _ldm_problems(config)
    sizes = () if config.image_size is None else (config.image_size,)  # None: the model's own (ldm)
    if min(config.ensemble_size, config.max_batch, config.batch_size, config.pairs_batch_size, *sizes) < 1:
        problems.append("--ensemble_size, --max_batch, --batch_size, --pairs_batch_size and --image_size must be at least 1")
    if not 0 <= config.max_error_fraction <= 1:
        problems.append(f"--max_error_fraction must lie in [0, 1] (got {config.max_error_fraction})")
    if "{" in config.prompt.replace("{category}", ""):
        problems.append(f"--prompt {config.prompt!r}: the only placeholder allowed is {{category}}")
    if problems:
        raise ValueError("invalid correspondence settings: " + "; ".join(problems))
    return parse_actors(config.actors)


def _ldm_problems(config: CorrespondConfig) -> list[str]:
    problems = []
    if min(config.num_steps, config.restarts, config.passes) < 1:
        problems.append("--num_steps, --restarts and --passes must be at least 1")
    if config.num_tokens <= LDM_TOKEN:
        problems.append(f"--num_tokens must be more than {LDM_TOKEN}: token {LDM_TOKEN} is the one supervised (got {config.num_tokens})")
    if not (config.lr > 0 and config.sigma > 0):
        problems.append(f"--lr and --sigma must be positive (got {config.lr:g} and {config.sigma:g})")
    if not 0 < config.crop_fraction <= 1:
        problems.append(f"--crop_fraction must lie in (0, 1] (got {config.crop_fraction:g})")
    if not 0 <= config.crop_margin < 0.5:
        problems.append(f"--crop_margin must lie in [0, 0.5) (got {config.crop_margin:g})")
    if not 0 <= config.noise_level < NUM_INFERENCE_STEPS:
        problems.append(f"--noise_level is a DDIM step index, 0..{NUM_INFERENCE_STEPS - 1} (got {config.noise_level})")
    return problems


def _refuse_other_settings(files, rows_hash: str, output: str) -> None:
    """Rows made with other settings would be skipped as done and mixed into the metrics: refuse."""
    hashes = set(files.read(["settings_hash"]).column("settings_hash").to_pylist()) - {rows_hash}
    if hashes:
        raise ValueError(
            f"{output} holds matches made with other settings (settings hash {', '.join(sorted(hashes))}; these "
            f"settings are {rows_hash}): give this run its own --output, or rerun with the settings of those rows "
            "(recorded in its _summary/ files)"
        )


def _read_pairs(config: CorrespondConfig) -> pa.Table:
    if config.root:
        return build_pairs(config.pairs, config.root, split=config.split, seed=config.seed)
    return read_pairs(config.pairs, split=config.split)


def _summarise(output, run_id, listed, already, work: dict[str, int], started) -> CorrespondSummary:
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
    return CorrespondSummary(output, run_id, listed, already, matched, dict(errors), failures, work, seconds)


def _record(summary: CorrespondSummary, config: CorrespondConfig, store, failure: str | None) -> dict:
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
            **summary.work,
        },
        "error_causes": summary.errors,
        "failures": summary.failures,
        "failures_truncated": summary.error_count > len(summary.failures),
        "feature_cache" if config.method == "dift" else "context_cache": store.location,
        "seconds": summary.seconds,
        "settings": dataclasses.asdict(config),
    }
