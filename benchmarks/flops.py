"""FLOPs per detected image and per discovery step, and the fraction of the device's peak they reach.

    python benchmarks/flops.py [--model tiny|sd15] [--image_size 256] [--augmentations 10] [--batch_size 4]
        [--dtype float32|bfloat16] [--timings detection.json discovery.json] [--repeats 3]
        [--device cpu|cuda] [--output run.json] [--no_results]

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs a multiply-add;
matrix products, convolutions and attention only; on the CPU the fused attention
op ``_scaled_dot_product_flash_attention_for_cpu`` and its backward are added to
its table with torch's own SDPA formulas, as it lacks them):
- detection, per image with A augmentations (``skp_ray.detection.detect_with_confidence``,
  fast path defaults): the A VAE encodes, the UNet up to the last captured
  layer, and the capture (the captured layers' own capture products, counted on
  their recorded inputs);
- one discovery step (``skp_ray.optimization.training_loss`` and backward,
  latents cached) on ``--batch_size`` images.
FlopCounterMode counts no element-wise work, so the capture's softmax is added
analytically, stated as its own line: per captured layer, copy, head and
upsampled pixel, over all T tokens, 4 FLOPs a token (max, subtract, exp, sum; an
exp counted as one FLOP) and 2 a kept token (divide, head mean); in a
discovery step the backward recomputes the softmax (4 a token) and applies its
gradient (4 a token). The UNet's own softmaxes, norms and activations are not
counted.

The time comes from ``--timings`` (the JSON of detection_speed.py and/or
discovery_speed.py, skp_ray's medians; their settings must match this run's)
or is measured here (median of ``--repeats``). The peak: on the CPU a large
float32 matmul measured in the same run; on an H100/H200, NVIDIA's dense spec
figures (bf16 989.4 TFLOP/s; fp32 without tensor cores 66.9 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import detection_speed
import discovery_speed
from common import (
    LAYERS,
    benchmark_main,
    base_arguments,
    build_model,
    check_common,
    gpu_peak_flops,
    has_parameter,
    header,
    load_line,
    measured_cpu_peak_flops,
    num_tokens,
    ratio,
    run_facts,
    sample_images,
    timed,
)
from skp_ray.attention import selected_layers
from skp_ray.diffusion import DTYPES, encode_images

# Element-wise FLOPs a token of the capture's softmax (see the module's text).
SOFTMAX_PER_TOKEN = 4
SOFTMAX_PER_KEPT_TOKEN = 2
SOFTMAX_BACKWARD_PER_TOKEN = 8



def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode passes shapes to these (its shape wrapper), as to its own formulas.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def arguments(argv=None) -> argparse.Namespace:
    parser = base_arguments(__doc__)
    parser.add_argument("--augmentations", type=int, default=10)
    parser.add_argument("--keypoints", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=4, help="images per discovery step")
    parser.add_argument("--tokens", type=int, help="context length (default: 500 for sd15, 16 for tiny)")
    parser.add_argument("--feature_upsample_res", type=int, default=128)
    parser.add_argument("--timings", nargs="+", default=[], help="JSON of detection_speed.py / discovery_speed.py")
    parser.add_argument("--peak_side", type=int, default=2048, help="side of the CPU peak's float32 matmul")
    args = parser.parse_args(argv)
    check_common(parser, args)
    args.tokens = args.tokens or num_tokens(args.model)
    # What detection_speed and discovery_speed's helpers read from their own arguments.
    args.images, args.copies_per_call, args.fast_capture, args.tta_latent = 1, None, True, False
    return args


def counted(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


# --- detection ----------------------------------------------------------------------------------


def detection_flops(model, args) -> dict:
    images = sample_images(1, args.image_size, args.seed)
    context = torch.randn(args.tokens, model.context_dim, generator=torch.Generator().manual_seed(args.seed))
    indices = list(range(0, args.tokens, max(1, args.tokens // args.keypoints)))[: args.keypoints]
    thetas, noise = detection_speed.draws(model, argparse.Namespace(**dict(vars(args), images=1)))
    copies = detection_speed.warped_copies(images, thetas).to(model.device, model.dtype)
    device_noise = noise.to(model.device)
    recorded = detection_speed.recorded_layer_inputs(model, copies, context, device_noise)

    with torch.no_grad():
        encode = counted(lambda: encode_images(model, copies[0]))
    unavoidable = counted(lambda: detection_speed.unavoidable(model, copies, context, device_noise))
    capture = counted(lambda: detection_speed.capture_alone(recorded, indices, args, 1))
    detect = lambda: detection_speed.skp_ray_detection(model, images, context, indices, thetas, noise, args)  # noqa: E731
    whole = counted(detect)
    softmax = softmax_elements(model, args, copies=args.augmentations, kept=len(indices))
    figures = dict(
        vae_encode=encode, unet_to_last_captured_layer=unavoidable - encode, capture_counted=capture,
        capture_softmax_analytic=softmax, detect_with_confidence_counted=whole,
        total=whole + softmax,
    )  # fmt: skip
    return dict(flops_per_image=figures, run=detect)


def softmax_elements(model, args, *, copies: int, kept: int, backward: bool = False) -> int:
    """The capture's analytic element-wise FLOPs over ``copies`` UNet copies (forward, and backward if asked)."""
    names = selected_layers(model.unet, LAYERS)
    heads = sum(model.unet.get_submodule(name).heads for name in names)
    pixels = args.feature_upsample_res**2
    per_token = SOFTMAX_PER_TOKEN + (SOFTMAX_BACKWARD_PER_TOKEN if backward else 0)
    return copies * heads * pixels * (per_token * args.tokens + SOFTMAX_PER_KEPT_TOKEN * kept)


# --- discovery ----------------------------------------------------------------------------------


def discovery_flops(model, args) -> dict:
    step_args = argparse.Namespace(**dict(vars(args), no_latent_cache=False))
    images = sample_images(args.batch_size, args.image_size, args.seed).to(model.device)
    inputs = discovery_speed.draws(model, step_args)
    latents = encode_images(model, images) if has_parameter(discovery_speed.training_loss, "latents") else None
    step = lambda: discovery_speed.fast_step(model, images, inputs, latents, step_args)  # noqa: E731
    whole = counted(step)
    # Two map calls a step (the images and their copies); every token is kept (the loss reads them all).
    softmax = softmax_elements(model, args, copies=2 * args.batch_size, kept=args.tokens, backward=True)
    figures = dict(step_counted=whole, capture_softmax_analytic=softmax, total=whole + softmax,
                   latents_cached=latents is not None)  # fmt: skip
    return dict(flops_per_step=figures, run=step)


# --- times and the peak ---------------------------------------------------------------------------


def given_timings(args) -> dict:
    """skp_ray's medians from earlier runs' JSON, keyed by what they time; checked against this run."""
    found = {}
    for path in args.timings:
        data = json.loads(Path(path).read_text())
        for key in ("model", "image_size", "dtype", "tokens"):
            if data.get(key) != getattr(args, key):
                raise SystemExit(f"--timings {path}: {key} is {data.get(key)!r}, this run's is {getattr(args, key)!r}")
        if "augmentations" in data:
            if data["augmentations"] != args.augmentations:
                raise SystemExit(f"--timings {path}: {data['augmentations']} augmentations, this run's {args.augmentations}")
            found["detection_s"] = data["figures"]["skp_ray"]["seconds_per_image"]
        elif "batch_size" in data:
            if data["batch_size"] != args.batch_size:
                raise SystemExit(f"--timings {path}: batch {data['batch_size']}, this run's {args.batch_size}")
            found["discovery_s"] = data["figures"]["skp_ray"]["seconds_per_step"]
    return found


def measured(fn, args) -> float:
    if not args.no_warm_up:
        fn()
    return statistics.median(timed(fn, args.device)[0] for _ in range(args.repeats))


def peak(args) -> tuple[float | None, str]:
    if args.device == "cuda":
        return gpu_peak_flops(args.dtype)
    return measured_cpu_peak_flops(args.peak_side)


def run(args: argparse.Namespace) -> dict:
    load_before = load_line()
    model, shape = build_model(args.model, args.device, DTYPES[args.dtype], args.seed)
    detection = detection_flops(model, args)
    discovery = discovery_flops(model, args)
    timings = given_timings(args)
    sources = {}
    for key, part in (("detection_s", detection), ("discovery_s", discovery)):
        sources[key] = "--timings" if key in timings else "measured here"
        if key not in timings:
            timings[key] = measured(part["run"], args)
    peak_flops, peak_words = peak(args)
    per_image = detection["flops_per_image"]["total"]
    per_step = discovery["flops_per_step"]["total"]
    achieved = dict(detection=per_image / timings["detection_s"], discovery=per_step / timings["discovery_s"])
    return run_facts(args, shape, load_before) | dict(
        augmentations=args.augmentations, keypoints=args.keypoints, batch_size=args.batch_size, tokens=args.tokens,
        feature_upsample_res=args.feature_upsample_res,
        flops_per_image=detection["flops_per_image"], flops_per_step=discovery["flops_per_step"],
        seconds=timings, seconds_from=sources, achieved_flops_per_s=achieved,
        peak_flops_per_s=peak_flops, peak_from=peak_words,
        fraction_of_peak={name: ratio(value, peak_flops) for name, value in achieved.items()},
        # On CUDA, float32 convolutions run as TF32 by default (cuDNN), matmuls not: the fp32 peak then flatters.
        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32) if args.device == "cuda" else None,
        tf32_convolutions=bool(torch.backends.cudnn.allow_tf32) if args.device == "cuda" else None,
    )  # fmt: skip


def giga(flops: float) -> str:
    return f"{flops / 1e9:.3g} G"


def section(result: dict) -> str:
    image, step = result["flops_per_image"], result["flops_per_step"]
    settings = (
        f"detection: 1 image x {result['augmentations']} augmentations, K = {result['keypoints']}; discovery: batch "
        f"{result['batch_size']}, latents cached {step['latents_cached']}; {result['tokens']} tokens, maps at "
        f"{result['feature_upsample_res']}; FLOPs by FlopCounterMode plus the capture's softmax (analytic); peak: "
        f"{result['peak_from']}"
    )
    lines = [
        "| work | FLOPs | seconds | achieved FLOP/s | of peak |",
        "| --- | --- | --- | --- | --- |",
    ]
    fraction = result["fraction_of_peak"]
    for name, flops, seconds_key, achieved in (
        ("detection, per image", image["total"], "detection_s", result["achieved_flops_per_s"]["detection"]),
        ("discovery, per step", step["total"], "discovery_s", result["achieved_flops_per_s"]["discovery"]),
    ):
        share = fraction["detection" if "detection" in name else "discovery"]
        lines.append(f"| {name} | {giga(flops)} | {result['seconds'][seconds_key]:.3g} s "
                     f"({result['seconds_from'][seconds_key]}) | {giga(achieved)}/s "
                     f"| {'-' if share is None else f'{100 * share:.1f} %'} |")  # fmt: skip
    notes = (
        f"Per image: VAE encodes {giga(image['vae_encode'])}, UNet to the last captured layer "
        f"{giga(image['unet_to_last_captured_layer'])}, capture products {giga(image['capture_counted'])}, capture "
        f"softmax {giga(image['capture_softmax_analytic'])} (analytic); all of detect_with_confidence as counted "
        f"{giga(image['detect_with_confidence_counted'])}. Per step: counted {giga(step['step_counted'])}, capture "
        f"softmax forward and backward {giga(step['capture_softmax_analytic'])} (analytic)."
    )
    return f"{header(result, settings)}\n\n" + "\n".join(lines) + f"\n\n{notes}\n"


def main(argv=None) -> dict:
    return benchmark_main("flops.py", arguments, run, section, argv)


if __name__ == "__main__":
    main()
