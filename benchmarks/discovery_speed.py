"""Seconds per discovery step (SPEC 1.3): skp_ray's fast step against the published way, and Ray Train scaling.

    python benchmarks/discovery_speed.py [--model tiny|sd15] [--image_size 256] [--batch_size 4]
        [--fast_capture | --no_fast_capture] [--no_latent_cache] [--dtype float32|bfloat16] [--repeats 3]
        [--workers 1 2] [--scaling_steps 4] [--device cpu|cuda] [--output run.json] [--no_results]

1. One optimiser step's work (loss and backward) on ``--batch_size`` images, timed
   in the same run (interleaved repetitions, medians, CUDA synchronised):
   - skp_ray: ``skp_ray.optimization.training_loss`` (fast capture, early stop)
     with the untransformed images' latents already encoded, as the discovery
     worker's latent cache gives them in steady state (``--no_latent_cache``:
     encoded every step), then ``backward``;
   - reference, written here the published way: float32, no latent cache, the
     WHOLE UNet for the images and for their warped copies, each captured layer's
     input features upsampled bicubically (``F.interpolate``) to 128 and then
     ``to_q``, the full softmax over all tokens materialised, plain autograd;
     the same loss (``skp_ray.losses.batch_keypoint_loss``) on its maps.
   Both use the same thetas and noise; their losses and gradients are compared.
2. Ray Train scaling: ``skp_ray.discovery.run_discovery`` on the embedded tiny
   model (``--scaling_image_size``, a few steps), with each of ``--workers``
   (fixed logical CPUs: a local Ray with ``--ray_cpus``), and the steps/s
   (median over the steps after the first, from the run's metrics) as a ratio
   to the first worker count. ``--workers`` with no value skips it.

Prints the JSON (``--output``: also there) and appends a dated section to
benchmarks/RESULTS.md (``--no_results``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import (
    LAYERS,
    benchmark_main,
    base_arguments,
    build_model,
    check_common,
    fmt_ratio,
    has_parameter,
    header,
    interleaved,
    load_line,
    num_tokens,
    published_unet_maps,
    ratio,
    repetitions,
    require_parameter,
    run_facts,
    sample_images,
)
from skp_ray import attention
from skp_ray.attention import selected_layers
from skp_ray.diffusion import DTYPES, add_noise, encode_images, timestep_at
from skp_ray.geometry import random_affine, warp
from skp_ray.losses import batch_keypoint_loss
from skp_ray.optimization import training_loss



def loss_options(tokens: int) -> dict:
    """SPEC 1.3's loss options, shared by both steps (a short context caps the candidates and picks)."""
    candidates = min(25, tokens)
    return dict(top_k=min(10, candidates), furthest_point_num_samples=candidates, sigma=2.0,
                sharpening_loss_weight=100.0, equivariance_attn_loss_weight=1000.0)  # fmt: skip


def arguments(argv=None) -> argparse.Namespace:
    parser = base_arguments(__doc__)
    parser.add_argument("--batch_size", type=int, default=4, help="images per optimiser step")
    parser.add_argument("--tokens", type=int, help="context length (default: 500 for sd15, 16 for tiny)")
    parser.add_argument("--feature_upsample_res", type=int, default=128)
    parser.add_argument("--fast_capture", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no_latent_cache", action="store_true", help="skp_ray's step encodes its images too")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray Train worker counts to compare")
    parser.add_argument("--scaling_steps", type=int, default=4)
    parser.add_argument("--scaling_image_size", type=int, default=128)
    parser.add_argument("--scaling_batch_size", type=int, default=4)
    parser.add_argument("--ray_cpus", type=int, default=4, help="logical CPUs of the local Ray for the scaling runs")
    args = parser.parse_args(argv)
    check_common(parser, args)
    args.tokens = args.tokens or num_tokens(args.model)
    if any(w < 1 or args.scaling_batch_size % w for w in args.workers):
        parser.error("every --workers count must be at least 1 and divide --scaling_batch_size")
    return args


# --- the two steps ------------------------------------------------------------------------------


def draws(model, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    side = args.image_size // model.vae_scale_factor
    shape = (args.batch_size, model.unet.config.in_channels, side, side)
    return dict(
        thetas=random_affine(args.batch_size, generator=g),
        noise_images=torch.randn(shape, generator=g),
        noise_transformed=torch.randn(shape, generator=g),
        context=torch.randn(args.tokens, model.context_dim, generator=g),
    )


def fast_step(model, images, inputs, latents, args):
    """skp_ray's loss and backward; returns (total loss, the context's gradient)."""
    context = inputs["context"].to(model.device, copy=True).requires_grad_(True)
    options = dict(image_size=args.image_size, feature_upsample_res=args.feature_upsample_res, layers=LAYERS,
                   fast_capture=args.fast_capture)  # fmt: skip
    if latents is not None:
        options["latents"] = latents
    parts = training_loss(
        model, images, context, thetas=inputs["thetas"], noise=(inputs["noise_images"], inputs["noise_transformed"]),
        **loss_options(args.tokens), **options,
    )  # fmt: skip
    parts.total.backward()
    return parts.total.detach().item(), context.grad.detach().cpu().clone()


def reference_maps(model, images, context, noise, layer_names, res: int) -> torch.Tensor:
    timestep = timestep_at(model, -1)
    noisy = add_noise(model, encode_images(model, images), timestep, noise=noise)  # no cache
    return published_unet_maps(model, noisy, timestep, context[None], layer_names, res)


def reference_step(model, images, inputs, args):
    """The published step, written out: whole UNet, features upsampled then to_q, full softmax, autograd."""
    context = inputs["context"].to(model.device, copy=True).requires_grad_(True)
    layer_names = selected_layers(model.unet, LAYERS)
    thetas = inputs["thetas"].to(model.device)
    transformed = warp(images, thetas).clamp(0, 1)
    res = args.feature_upsample_res
    maps = reference_maps(model, images, context, inputs["noise_images"], layer_names, res)
    maps_transformed = reference_maps(model, transformed, context, inputs["noise_transformed"], layer_names, res)
    parts = batch_keypoint_loss(maps, maps_transformed, thetas.to(maps), **loss_options(args.tokens))
    parts.total.backward()
    return parts.total.detach().item(), context.grad.detach().cpu().clone()


# --- Ray Train scaling --------------------------------------------------------------------------


def scaling(args) -> dict | None:
    """steps/s of run_discovery (tiny model) with each worker count, on a local Ray of fixed logical CPUs."""
    if not args.workers:
        return None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from skp_ray.discovery import discovery_config, run_discovery
    from skp_ray.samples import write_sample_images

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            images = Path(scratch, "images")
            write_sample_images(images, n=max(4, args.scaling_batch_size), size=args.scaling_image_size, seed=1)
            for workers in args.workers:
                config = discovery_config(dict(
                    data=str(images), output=str(Path(scratch, "runs")), name=f"w{workers}", num_workers=workers,
                    num_steps=args.scaling_steps, num_tokens=16, batch_size=args.scaling_batch_size, top_k=3,
                    furthest_point_num_samples=6, num_indices=4, image_size=args.scaling_image_size,
                    feature_upsample_res=args.scaling_image_size // 4, checkpoint_every=10_000, log_every=10_000,
                    preview_images=0, augmentation_iterations=1, cpus_per_worker=args.ray_cpus / max(args.workers),
                    max_failures=0,
                ))  # fmt: skip
                started = time.perf_counter()
                result = run_discovery(config)
                wall = time.perf_counter() - started
                metrics = [json.loads(line) for line in Path(result.folder, "metrics.jsonl").read_text().splitlines()]
                per_step = [entry["images_per_s"] / args.scaling_batch_size for entry in metrics[1:] or metrics]
                runs[workers] = dict(steps_per_s=statistics.median(per_step), wall_s=wall,
                                     final_loss=metrics[-1]["total"])  # fmt: skip
                print(f"  {workers} worker(s): {runs[workers]}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    first = runs[args.workers[0]]["steps_per_s"]
    for run in runs.values():
        run["vs_first"] = ratio(run["steps_per_s"], first)
    return dict(runs=runs, image_size=args.scaling_image_size, steps=args.scaling_steps,
                batch_size=args.scaling_batch_size, ray_cpus=args.ray_cpus,
                cpus_per_worker=args.ray_cpus / max(args.workers))  # fmt: skip


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    require_parameter(attention.attention_maps, "fast_capture", "the fast capture")
    cache = not args.no_latent_cache
    if cache:
        require_parameter(training_loss, "latents", "the latent cache")
    load_before = load_line()
    model, shape = build_model(args.model, args.device, DTYPES[args.dtype], args.seed)
    reference = model if args.dtype == "float32" else build_model(args.model, args.device, torch.float32, args.seed)[0]
    images = sample_images(args.batch_size, args.image_size, args.seed).to(model.device)
    inputs = draws(model, args)
    latents = encode_images(model, images) if cache else None  # the cache, filled before the steps
    print(f"{shape}; {args.image_size} px, {args.dtype}; batch {args.batch_size}, {args.tokens} tokens", flush=True)

    paths = {
        "reference": lambda: reference_step(reference, images, inputs, args),
        "skp_ray": lambda: fast_step(model, images, inputs, latents, args),
    }
    medians, all_seconds, results = interleaved(paths, args.repeats, args.device, warm_up=not args.no_warm_up)
    (fast_loss, fast_grad), (ref_loss, ref_grad) = results["skp_ray"], results["reference"]
    figures = {
        name: dict(seconds_per_step=s, images_per_s=args.batch_size / s, vs_reference=ratio(medians["reference"], s))
        for name, s in medians.items()
    }
    return run_facts(args, shape, load_before) | dict(
        batch_size=args.batch_size, tokens=args.tokens, feature_upsample_res=args.feature_upsample_res,
        fast_capture=args.fast_capture, latent_cache=cache, figures=figures, all_seconds=all_seconds,
        speedup_vs_reference=ratio(medians["reference"], medians["skp_ray"]),
        loss_skp_ray=fast_loss, loss_reference=ref_loss, loss_abs_diff=abs(fast_loss - ref_loss),
        grad_max_abs_diff=(fast_grad.float() - ref_grad.float()).abs().max().item(),
        grad_max_abs=ref_grad.abs().max().item(),
        scaling=scaling(args),
        training_loss_has_latents=has_parameter(training_loss, "latents"),
    )  # fmt: skip


def section(result: dict) -> str:
    settings = (
        f"batch {result['batch_size']} images a step, {result['tokens']} tokens, maps at "
        f"{result['feature_upsample_res']}; skp_ray: fast_capture {result['fast_capture']}, latent cache "
        f"{result['latent_cache']}; reference float32, whole UNet, features upsampled then to_q, full softmax, no "
        f"cache; {repetitions(result)}"
    )
    lines = ["| step (loss + backward) | s / step | images / s | reference / path |", "| --- | --- | --- | --- |"]
    for name, figure in result["figures"].items():
        words = "reference (published way)" if name == "reference" else "skp_ray `training_loss`"
        lines.append(f"| {words} | {figure['seconds_per_step']:.3f} | {figure['images_per_s']:.3g} "
                     f"| {fmt_ratio(figure['vs_reference'])} |")  # fmt: skip
    notes = (
        f"Same thetas and noise: losses {result['loss_reference']:.6g} (reference) and {result['loss_skp_ray']:.6g} "
        f"(skp_ray), gradients differ by at most {result['grad_max_abs_diff']:.3g} (largest "
        f"{result['grad_max_abs']:.3g})."
    )
    scaling_text = ""
    if result["scaling"]:
        s = result["scaling"]
        rows = [f"| {w} | {r['steps_per_s']:.3g} | {fmt_ratio(r['vs_first'])} | {r['wall_s']:.1f} s |"
                for w, r in s["runs"].items()]  # fmt: skip
        scaling_text = (
            f"\n\nRay Train scaling (`run_discovery`, tiny model at {s['image_size']} px, {s['steps']} steps of batch "
            f"{s['batch_size']}, local Ray with {s['ray_cpus']} logical CPUs, {s['cpus_per_worker']:g} a worker; "
            f"steps/s: median after the first step):\n\n| workers | steps / s | vs first | wall (with start-up) |\n"
            "| --- | --- | --- | --- |\n" + "\n".join(rows)
        )
    return f"{header(result, settings)}\n\n" + "\n".join(lines) + f"\n\n{notes}{scaling_text}\n"


def main(argv=None) -> dict:
    return benchmark_main("discovery_speed.py", arguments, run, section, argv)


if __name__ == "__main__":
    main()
