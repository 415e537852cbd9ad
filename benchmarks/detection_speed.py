"""Seconds per image of keypoint detection (SPEC 1.5): skp_ray's fast path against the published way.

    python benchmarks/detection_speed.py [--model tiny|sd15] [--image_size 256] [--images 2] [--augmentations 10]
        [--copies_per_call N] [--fast_capture | --no_fast_capture] [--tta_latent] [--dtype float32|bfloat16]
        [--repeats 3] [--device cpu|cuda] [--output run.json] [--no_results]

Paths, timed in the same run (interleaved repetitions, medians, CUDA synchronised):
- baseline, written here as the published code runs: float32; per image, per
  augmentation, one copy per UNet call: warp, VAE encode, add noise, the WHOLE
  UNet with a capture processor that upsamples each captured layer's input
  features bicubically to 128 and applies ``to_q`` (SPEC 1.2's first bullet),
  softmax over all tokens, mean over heads and layers; then the chosen tokens,
  bilinear to the image size, unwarp, average over the copies that see a pixel;
- skp_ray: ``skp_ray.detection.detect_with_confidence`` with its defaults
  (``--copies_per_call``, ``--no_fast_capture``, ``--dtype`` change them), the
  same thetas and noise;
- with ``--tta_latent``, also ``detect_with_confidence(tta_latent=True)``
  (each image encoded once, its latent warped), and its agreement with the
  exact skp_ray answer;
- the unavoidable parts: per image, the A VAE encodes in one batch and the UNet
  up to the last captured layer on the A copies in one batch, early stop, no
  capture;
- the capture alone: the captured layers' inputs are recorded once, and the
  capture (``fast_token_maps``, or ``token_maps`` with ``--no_fast_capture``) is
  timed on them alone, so its share is measured, not inferred from a difference.

Keypoint differences are Euclidean distances in pixels at the image size.
``--model sd15`` builds SD 1.5's UNet and VAE shapes with random weights and a
500-token context. Prints the JSON (``--output``: also there) and appends a
dated section to benchmarks/RESULTS.md (``--no_results``: print only).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import (
    LAYERS,
    benchmark_main,
    published_unet_maps,
    base_arguments,
    build_model,
    check_common,
    fmt_ratio,
    has_parameter,
    header,
    interleaved,
    load_line,
    num_tokens,
    ratio,
    repetitions,
    require_parameter,
    run_facts,
    sample_images,
)
from skp_ray import attention
from skp_ray.attention import capture_attention, capture_output, run_unet, selected_layers, token_maps
from skp_ray.detection import detect_with_confidence, draw_augmentations
from skp_ray.diffusion import DTYPES, Diffusion, add_noise, encode_images, timestep_at
from skp_ray.geometry import unwarp, warp
from skp_ray.heatmaps import argmax_centres



def arguments(argv=None) -> argparse.Namespace:
    parser = base_arguments(__doc__)
    parser.add_argument("--images", type=int, default=2, help="images per detection call")
    parser.add_argument("--augmentations", type=int, default=10, help="test-time augmentations per image")
    parser.add_argument("--keypoints", type=int, default=10, help="chosen tokens (K)")
    parser.add_argument("--tokens", type=int, help="context length (default: 500 for sd15, 16 for tiny)")
    parser.add_argument("--feature_upsample_res", type=int, default=128)
    parser.add_argument("--copies_per_call", type=int, help="skp_ray's chunk of copies a UNet call (default: its own)")
    parser.add_argument("--fast_capture", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tta_latent", action="store_true", help="also time the approximate latent-warp mode")
    args = parser.parse_args(argv)
    check_common(parser, args)
    args.tokens = args.tokens or num_tokens(args.model)
    if args.keypoints > args.tokens:
        parser.error("--keypoints must not exceed --tokens")
    return args


def check_contract(args: argparse.Namespace) -> None:
    """The fast-path options this run asks for must exist in skp_ray already."""
    require_parameter(attention.attention_maps, "fast_capture", "the fast capture")
    if args.copies_per_call is not None:
        require_parameter(detect_with_confidence, "copies_per_call", "batching copies across images")
    if args.tta_latent:
        require_parameter(detect_with_confidence, "tta_latent", "the latent-warp augmentation")


# --- the published way, written out ------------------------------------------------------------


def baseline_keypoints(model: Diffusion, images, context, indices, thetas, noise, args) -> torch.Tensor:
    """Normalised (y, x) [B, K, 2] of the averaged maps' argmax, one copy per UNet call."""
    size, layer_names = args.image_size, selected_layers(model.unet, LAYERS)
    timestep = timestep_at(model, -1)
    context = context.to(model.device, model.dtype)
    keypoints = []
    with torch.no_grad():
        for image, image_thetas, image_noise in zip(images, thetas, noise):
            total = torch.zeros(len(indices), size, size, device=model.device)
            coverage = torch.zeros(1, size, size, device=model.device)
            for theta, copy_noise in zip(image_thetas, image_noise):
                theta = theta[None].to(model.device)
                copy = warp(image[None].to(model.device), theta).clamp(0, 1)
                noisy = add_noise(model, encode_images(model, copy), timestep, noise=copy_noise[None])
                maps = published_unet_maps(model, noisy, timestep, context, layer_names, args.feature_upsample_res)
                chosen = F.interpolate(maps[:, indices], size=(size, size), mode="bilinear", align_corners=False)
                total += unwarp(chosen, theta)[0]
                coverage += unwarp(torch.ones_like(chosen[:, :1]), theta)[0]
            averaged = torch.where(coverage > 0, total / coverage.clamp_min(1e-12), torch.zeros_like(total))
            keypoints.append(argmax_centres(averaged.cpu()) / size)
    return torch.stack(keypoints)


# --- skp_ray, and the unavoidable parts --------------------------------------------------------


def skp_ray_detection(model, images, context, indices, thetas, noise, args, tta_latent: bool = False):
    options = dict(
        thetas=thetas, noise=noise, image_size=args.image_size, feature_upsample_res=args.feature_upsample_res,
        layers=LAYERS, fast_capture=args.fast_capture,
    )  # fmt: skip
    if args.copies_per_call is not None:
        options["copies_per_call"] = args.copies_per_call
    if tta_latent:
        options["tta_latent"] = True
    return detect_with_confidence(model, images, context, indices, **options)


def warped_copies(images, thetas) -> torch.Tensor:
    """[B, A, 3, S, S]: every image's augmented copies (made once, outside the timings)."""
    return torch.stack([warp(image.expand(len(t), -1, -1, -1), t).clamp(0, 1) for image, t in zip(images, thetas)])


def unavoidable(model: Diffusion, copies, context, noise) -> None:
    """Per image: the A VAE encodes as one batch, and the UNet to the last captured layer (early stop)."""
    last = model.unet.get_submodule(selected_layers(model.unet, LAYERS)[-1])
    timestep = timestep_at(model, -1)
    batch_context = context.to(model.device, model.dtype)
    with torch.no_grad():
        for image_copies, image_noise in zip(copies, noise):
            latents = encode_images(model, image_copies)
            noisy = add_noise(model, latents, timestep, noise=image_noise)
            with capture_output(last, stop_early=True):
                run_unet(model.unet, noisy, timestep, batch_context.expand(len(latents), -1, -1))


def recorded_layer_inputs(model: Diffusion, copies, context, noise) -> list:
    """(attn, hidden_states, context) at each captured layer for the first image's A copies."""
    timestep = timestep_at(model, -1)
    with torch.no_grad():
        noisy = add_noise(model, encode_images(model, copies[0]), timestep, noise=noise[0])
        batch_context = context.to(model.device, model.dtype).expand(len(noisy), -1, -1)
        with capture_attention(model.unet, selected_layers(model.unet, LAYERS), lambda *inputs: inputs) as sink:
            run_unet(model.unet, noisy, timestep, batch_context)
    return list(sink)


def capture_alone(recorded: list, indices, args, images: int) -> None:
    """The capture of every captured layer, repeated for each image (the recorded inputs are one image's)."""
    indices = torch.as_tensor(indices, device=recorded[0][1].device)
    use_fast = args.fast_capture and hasattr(attention, "fast_token_maps")
    with torch.no_grad():
        for _ in range(images):
            for attn, hidden, layer_context in recorded:
                if use_fast:
                    attention.fast_token_maps(
                        attn, hidden, layer_context, upsample_res=args.feature_upsample_res, token_indices=indices
                    )
                else:
                    token_maps(attn, hidden, layer_context, upsample_res=args.feature_upsample_res)[:, indices]


# --- the run ------------------------------------------------------------------------------------


def draws(model: Diffusion, args) -> tuple[torch.Tensor, torch.Tensor]:
    """thetas [B, A, 2, 3] and noise [B, A, C, h, w], each image's as a call of its own would draw them."""
    per_image = [
        draw_augmentations(model, torch.Generator().manual_seed(args.seed + i),
                           augmentation_iterations=args.augmentations, image_size=args.image_size)
        for i in range(args.images)
    ]  # fmt: skip
    return torch.stack([t for t, _ in per_image]), torch.stack([n for _, n in per_image])


def distances_px(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    return ((a.double() - b.double()) * size).norm(dim=-1).flatten()


def run(args: argparse.Namespace) -> dict:
    check_contract(args)
    load_before = load_line()
    model, shape = build_model(args.model, args.device, DTYPES[args.dtype], args.seed)
    reference = model if args.dtype == "float32" else build_model(args.model, args.device, torch.float32, args.seed)[0]
    images = sample_images(args.images, args.image_size, args.seed)
    context = torch.randn(args.tokens, model.context_dim, generator=torch.Generator().manual_seed(args.seed))
    indices = list(range(0, args.tokens, max(1, args.tokens // args.keypoints)))[: args.keypoints]
    thetas, noise = draws(model, args)
    copies = warped_copies(images, thetas).to(model.device, model.dtype)
    device_noise = noise.to(model.device)
    recorded = recorded_layer_inputs(model, copies, context, device_noise)
    print(f"{shape}; {args.image_size} px, {args.dtype}; {args.images} images x {args.augmentations} augmentations, "
          f"{args.tokens} tokens, K = {args.keypoints}", flush=True)  # fmt: skip

    paths = {
        "baseline": lambda: baseline_keypoints(reference, images, context, indices, thetas, noise, args),
        "skp_ray": lambda: skp_ray_detection(model, images, context, indices, thetas, noise, args),
        "unavoidable": lambda: unavoidable(model, copies, context, device_noise),
        "capture_alone": lambda: capture_alone(recorded, indices, args, args.images),
    }
    if args.tta_latent:
        paths["tta_latent"] = lambda: skp_ray_detection(model, images, context, indices, thetas, noise, args, True)
    medians, all_seconds, results = interleaved(paths, args.repeats, args.device, warm_up=not args.no_warm_up)

    exact = results["skp_ray"].keypoints
    vs_baseline = distances_px(exact, results["baseline"], args.image_size)
    per_image = {name: seconds / args.images for name, seconds in medians.items()}
    figures = {
        name: dict(seconds_per_image=s, images_per_s=1 / s, vs_baseline=ratio(per_image["baseline"], s))
        for name, s in per_image.items()
    }
    result = run_facts(args, shape, load_before) | dict(
        images=args.images, augmentations=args.augmentations, tokens=args.tokens, keypoints=args.keypoints,
        feature_upsample_res=args.feature_upsample_res, fast_capture=args.fast_capture,
        copies_per_call=args.copies_per_call, tta_latent=args.tta_latent,
        default_copies_per_call=default_copies(model, args),
        figures=figures, all_seconds=all_seconds,
        speedup_vs_baseline=ratio(per_image["baseline"], per_image["skp_ray"]),
        detection_vs_unavoidable=ratio(per_image["skp_ray"], per_image["unavoidable"]),
        capture_share=ratio(per_image["capture_alone"], per_image["skp_ray"]),
        keypoints_max_px_diff_vs_baseline=vs_baseline.max().item(),
        keypoints_median_px_diff_vs_baseline=vs_baseline.median().item(),
    )  # fmt: skip
    if args.tta_latent:
        vs_exact = distances_px(results["tta_latent"].keypoints, exact, args.image_size)
        result |= dict(
            tta_latent_vs_baseline=ratio(per_image["baseline"], per_image["tta_latent"]),
            tta_latent_within_2px_of_exact=(vs_exact <= 2).double().mean().item(),
            tta_latent_median_px_diff_vs_exact=vs_exact.median().item(),
        )
    return result


def default_copies(model, args) -> int | None:
    from skp_ray import detection

    if not has_parameter(detect_with_confidence, "copies_per_call") or not hasattr(detection, "default_copies_per_call"):
        return None
    try:
        return int(detection.default_copies_per_call(
            model, args.image_size, feature_upsample_res=args.feature_upsample_res, kept_tokens=args.keypoints
        ))  # fmt: skip
    except TypeError:  # only the contract's (diffusion, size)
        return int(detection.default_copies_per_call(model, args.image_size))


def section(result: dict) -> str:
    chunk = result["copies_per_call"] or f"default ({result['default_copies_per_call']})"
    settings = (
        f"{result['images']} images x {result['augmentations']} augmentations a call, {result['tokens']} tokens, "
        f"K = {result['keypoints']}, maps at {result['feature_upsample_res']}; skp_ray: copies_per_call {chunk}, "
        f"fast_capture {result['fast_capture']}; baseline float32, one copy per call, whole UNet; "
        f"{repetitions(result)}"
    )
    words = {
        "baseline": "baseline (published way)",
        "skp_ray": "skp_ray `detect_with_confidence`",
        "tta_latent": "skp_ray, `tta_latent=True`",
        "unavoidable": "unavoidable: A VAE encodes + UNet to the last captured layer",
        "capture_alone": "the capture alone (recorded layer inputs)",
    }
    lines = ["| path | s / image | images / s | baseline / path |", "| --- | --- | --- | --- |"]
    for name, figure in result["figures"].items():
        lines.append(f"| {words[name]} | {figure['seconds_per_image']:.3f} | {figure['images_per_s']:.3g} "
                     f"| {fmt_ratio(figure['vs_baseline'])} |")  # fmt: skip
    notes = (
        f"skp_ray against the baseline: {fmt_ratio(result['speedup_vs_baseline'])}; detection / unavoidable "
        f"{fmt_ratio(result['detection_vs_unavoidable'])}; the capture is "
        f"{100 * (result['capture_share'] or 0):.0f} % of detection. Same thetas and noise: keypoints differ from "
        f"the baseline's by at most {result['keypoints_max_px_diff_vs_baseline']:.3g} px (median "
        f"{result['keypoints_median_px_diff_vs_baseline']:.3g} px) at {result['image_size']} px."
    )
    if result["tta_latent"]:
        notes += (
            f" tta_latent: {fmt_ratio(result['tta_latent_vs_baseline'])} against the baseline; "
            f"{100 * result['tta_latent_within_2px_of_exact']:.0f} % of keypoints within 2 px of the exact mode's, "
            f"median {result['tta_latent_median_px_diff_vs_exact']:.3g} px."
        )
    return f"{header(result, settings)}\n\n" + "\n".join(lines) + f"\n\n{notes}\n"


def main(argv=None) -> dict:
    return benchmark_main("detection_speed.py", arguments, run, section, argv)


if __name__ == "__main__":
    main()
