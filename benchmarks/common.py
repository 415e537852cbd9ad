"""Helpers shared by detection_speed.py, discovery_speed.py, pipeline_efficiency.py and flops.py.

The model shapes (``--model tiny|sd15``), the common options, timing with
interleaved repetitions and medians, the device's description and peak FLOP/s,
checks that a fast-path option exists yet, and appending to RESULTS.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

from skp_ray.diffusion import (  # noqa: E402
    DTYPES,
    SD15_SCHEDULER,
    SD15_UNET,
    SD15_VAE,
    Diffusion,
    default_tiny_model,
    load_diffusion,
    spec_scheduler,
)

# The learned context's length SPEC 1.1 uses; the capture's softmax runs over all of it.
SD15_TOKENS = 500
TINY_TOKENS = 16
# The captured layers the benchmarks' artifacts and captures use: all four of SD 1.5's (SPEC 1.2).
LAYERS = (0, 1, 2, 3)

# Dense (no sparsity) spec peaks of NVIDIA's H100 SXM and H200 (the same GH100 compute), in FLOP/s:
# bf16/fp16 tensor cores 989.4 T, tf32 tensor cores 494.7 T, fp32 without tensor cores 66.9 T.
GPU_PEAKS = {
    "H100": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12, "tf32": 494.7e12},
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12, "tf32": 494.7e12},
}


def base_arguments(description: str, *, image_size: int | None = None) -> argparse.ArgumentParser:
    """The options every one of these benchmarks takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15"],
                        help="tiny: the embedded tiny model; sd15: SD 1.5's UNet and VAE shapes, random weights")
    default_size = image_size or (512 if torch.cuda.is_available() else 256)
    parser.add_argument("--image_size", type=int, default=default_size, help="model input side in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the fast path's weights")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each path (medians)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_warm_up", action="store_true", help="skip the untimed first run of each path")
    parser.add_argument("--output", help="write the JSON of the run here too")
    parser.add_argument("--no_results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return parser


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.image_size % 8:
        parser.error("--image_size must be a multiple of 8 (the latent side is image_size / 8)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)


# --- the models ---------------------------------------------------------------------------------


def build_model(kind: str, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[Diffusion, str]:
    """The tiny model, or SD 1.5's UNet and VAE shapes with random weights (the same weights for a seed)."""
    if kind == "tiny":
        model = load_diffusion(default_tiny_model(), dtype=dtype, device=device, text_encoder=False)
        return model, "embedded tiny SD-1.5-shaped model (skp_ray/tiny-sd15)"
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    for part in (unet, vae):
        part.to(device, dtype).eval().requires_grad_(False)
    model = Diffusion(unet=unet, vae=vae, scheduler=spec_scheduler(dict(SD15_SCHEDULER)), model_id="sd15-shape")
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    return model, f"SD 1.5 UNet and VAE shapes ({millions:.0f} M UNet parameters, random weights)"


def num_tokens(kind: str) -> int:
    return SD15_TOKENS if kind == "sd15" else TINY_TOKENS


def sample_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Rendered sample faces [count, 3, size, size] in [0, 1] (structure gives the maps peaks to agree on)."""
    from skp_ray.samples import render_samples

    return render_samples(count, size=size, seed=seed)[0].float()


# --- the published capture (SPEC 1.2's first bullet), for the baselines ---------------------------


class PublishedCapture:
    """The layer's own attention, plus SPEC 1.2's first bullet: features upsampled, then ``to_q``."""

    def __init__(self, processor, sink: list, upsample_res: int):
        self.processor, self.sink, self.upsample_res = processor, sink, upsample_res

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        output = self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        self.sink.append(published_maps(attn, hidden_states, encoder_hidden_states, self.upsample_res))
        return output


def published_maps(attn, hidden_states: torch.Tensor, context: torch.Tensor, res: int) -> torch.Tensor:
    """[B, T, res, res]: bicubic features -> to_q, logits with every token, softmax over tokens, mean over heads."""
    batch, length, channels = hidden_states.shape
    side = int(length**0.5)
    grid = hidden_states.transpose(1, 2).reshape(batch, channels, side, side)
    features = F.interpolate(grid, size=(res, res), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    queries = attn.to_q(features).unflatten(-1, (attn.heads, -1))
    keys = attn.to_k(context).unflatten(-1, (attn.heads, -1))
    logits = torch.einsum("bnhd,bthd->bhtn", queries, keys) * attn.scale
    return logits.float().softmax(dim=2).mean(dim=1).unflatten(-1, (res, res))


def published_unet_maps(model: Diffusion, noisy, timestep, context, layer_names, res: int) -> torch.Tensor:
    modules = [model.unet.get_submodule(name) for name in layer_names]
    originals = [module.processor for module in modules]
    sink: list = []
    for module, original in zip(modules, originals):
        module.set_processor(PublishedCapture(original, sink, res))
    try:
        model.unet(noisy, timestep, encoder_hidden_states=context.expand(len(noisy), -1, -1))  # the whole UNet
    finally:
        for module, original in zip(modules, originals):
            module.set_processor(original)
    return torch.stack(sink).mean(dim=0)


# --- the fast-path contract ------------------------------------------------------------------------


def require_parameter(function, name: str, what: str) -> None:
    """Fail clearly when a fast-path option of issue 16 is not in the code yet."""
    if name not in inspect.signature(function).parameters:
        raise SystemExit(
            f"{function.__module__}.{function.__qualname__} has no {name!r} parameter yet: {what} is part of "
            f"issue 16's fast path and is not in this checkout; run without the option that needs it."
        )


def has_parameter(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


# --- timing -------------------------------------------------------------------------------------


def synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    synchronise(device)
    start = time.perf_counter()
    result = fn()
    synchronise(device)
    return time.perf_counter() - start, result


def interleaved(paths: dict, repeats: int, device: str, *, warm_up: bool = True) -> tuple[dict, dict, dict]:
    """Each path once untimed (``warm_up``), then ``repeats`` times, alternating the order every round.

    Returns (median seconds, every repetition's seconds, the last result) per path name."""
    names = list(paths)
    if warm_up:
        for name in names:
            paths[name]()
    seconds = {name: [] for name in names}
    results = {}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            elapsed, results[name] = timed(paths[name], device)
            seconds[name].append(elapsed)
            print(f"  {name}: {elapsed:.3f} s", flush=True)
    return {name: statistics.median(values) for name, values in seconds.items()}, seconds, results


# --- the device ---------------------------------------------------------------------------------


def device_line(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads ({platform.processor() or platform.machine()})"


def load_line() -> str:
    return "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())


def gpu_peak_flops(dtype: str) -> tuple[float | None, str]:
    """The spec dense peak of the visible GPU for ``dtype`` (float32: without tensor cores), and where it is from."""
    name = torch.cuda.get_device_name()
    for family, peaks in GPU_PEAKS.items():
        if family in name:
            words = "fp32 without tensor cores" if dtype == "float32" else f"{dtype} dense tensor cores"
            return peaks[dtype], f"{family} spec sheet, {words}: {peaks[dtype] / 1e12:.1f} TFLOP/s"
    return None, f"no spec peak known for {name!r}"


def measured_cpu_peak_flops(side: int = 2048, repeats: int = 3) -> tuple[float, str]:
    """The best of ``repeats`` float32 ``side`` x ``side`` matmuls on this CPU, in FLOP/s (2 side^3 each)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, "cpu")[0] for _ in range(repeats))
    flops = 2 * side**3 / best
    return flops, f"measured: float32 {side} x {side} matmul, best of {repeats}, {torch.get_num_threads()} threads"


# --- results ------------------------------------------------------------------------------------


def header(result: dict, settings: str) -> str:
    return (
        f"device: {result['device']}; model: {result['model_shape']} at {result['image_size']} px, "
        f"{result['dtype']}; {settings}; machine {result['load_before']} before, {result['load_after']} after"
    )


def benchmark_main(script: str, arguments, run, section, argv=None) -> dict:
    """A benchmark's whole run: parse ``argv``, ``run`` it, then ``finish`` with its ``section``."""
    args = arguments(argv)
    result = run(args)
    finish(args, script, result, section(result))
    return result


def finish(args: argparse.Namespace, script: str, result: dict, text: str) -> None:
    """Print the JSON and the section; write ``--output``; append the section to RESULTS.md unless ``--no_results``."""
    print(json.dumps(result, indent=2, default=str))
    print(text)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    if not args.no_results:
        with RESULTS.open("a") as results:
            results.write(f"\n## {date.today().isoformat()}: `benchmarks/{script}`\n\n{text}")
        print(f"appended to {RESULTS}")


def run_facts(args: argparse.Namespace, model_shape: str, load_before: str) -> dict:
    """What every result records about its run."""
    return dict(
        date=date.today().isoformat(),
        device=device_line(args.device),
        load_before=load_before,
        load_after=load_line(),
        model=args.model,
        model_shape=model_shape,
        image_size=args.image_size,
        dtype=args.dtype,
        repeats=args.repeats,
        warm_up=not args.no_warm_up,
        seed=args.seed,
    )


def repetitions(result: dict, kind: str = "interleaved") -> str:
    """How the medians were taken, in words."""
    after = "after a warm-up" if result["warm_up"] else "without a warm-up (first calls included)"
    return f"medians of {result['repeats']} {kind} repetitions {after}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
