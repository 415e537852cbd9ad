"""Points per second of prompt-optimised correspondence (SPEC 3): batched against one at a time.

    python benchmarks/ldm_correspondence.py [--model tiny|sd15] [--image_size 128] [--points 4] [--restarts 5]
        [--steps 4] [--passes 20] [--repeats 3] [--threads 1] [--device cpu|cuda] [--dtype float32] [--output run.json] [--no_results]

For P points x R restarts on one source and one target image, each against its
baseline in the same run (interleaved repetitions, medians, CUDA synchronised):
1. optimisation: ``optimize_point_contexts`` with all P x R contexts in one UNet
   call per step, against the published way, P x R separate calls with one point
   and one restart each, the same number of steps;
2. localisation: ``locate_point`` with every context of the P points batched in
   each pass, against one context at a time (R calls with contexts [1, T, D] per
   point, as the published code runs them);
3. seconds per point at the published settings (129 steps, 5 restarts, 20
   passes), extrapolated linearly from the measured time per step and per pass.

Both optimisation paths replay the same initial contexts, crops and noise, drawn
once from a seeded generator, and the largest difference between their contexts
(and losses) is reported: batching must not change the result.

``--model tiny`` is the embedded tiny SD-1.5-shaped model; ``--model sd15`` the
real SD 1.5 UNet shape with random weights (~860 M parameters; the timings do not
depend on the weights) with SD 1.5's real VAE shape (``--vae tiny``: the tiny
model's). On CPU the sd15 shape needs a small image and few steps, e.g.
``--model sd15 --image_size 128 --points 2 --steps 2 --passes 4 --repeats 2``.

Prints the figures and their JSON (``--output``: also written there) and appends
a dated section to benchmarks/RESULTS.md (``--no_results``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from skp_ray.correspondence.ldm_contexts import optimize_point_contexts
from skp_ray.correspondence.ldm_locate import locate_point
from skp_ray.correspondence.ldm_maps import canvas_position, crop_side, draw_crop_start
from skp_ray.correspondence.ldm_settings import LDM_CROP_FRACTION, LDM_CROP_MARGIN
from skp_ray.diffusion import (
    DTYPES,
    SD15_SCHEDULER,
    SD15_UNET,
    SD15_VAE,
    TINY_VAE,
    Diffusion,
    default_tiny_model,
    load_diffusion,
    spec_scheduler,
)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# SPEC 3's published settings, which the extrapolated seconds per point are stated at.
PUBLISHED_STEPS = 129
PUBLISHED_RESTARTS = 5
PUBLISHED_PASSES = 20
NUM_TOKENS = 77



def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--vae", default=None, choices=["tiny", "sd15"], help="VAE shape for --model sd15 (default sd15)")
    parser.add_argument("--image_size", type=int, default=128, help="model input side in pixels (the model's own: 512)")
    parser.add_argument("--source_side", type=int, default=512, help="side of the square source and target images")
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=PUBLISHED_RESTARTS)
    parser.add_argument("--steps", type=int, default=4, help="optimisation steps measured")
    parser.add_argument("--passes", type=int, default=PUBLISHED_PASSES, help="localisation crop passes measured")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each path (medians)")
    parser.add_argument("--max_batch", type=int, default=32, help="the core's max_batch for the batched calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own); on a loaded machine 1 "
                        "can be far faster than 2, whose OpenMP barriers stall when a core is taken")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the JSON of the run here too")
    parser.add_argument("--no_results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.image_size % 8:
        parser.error("--image_size must be a multiple of 8 (the latent side is image_size / 8)")
    if args.vae and args.model != "sd15":
        parser.error("--vae applies to --model sd15 only")
    return args


# --- the model -------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[Diffusion, str]:
    dtype = DTYPES[args.dtype]
    if args.model == "tiny":
        model = load_diffusion(default_tiny_model(), dtype=dtype, device=args.device, text_encoder=False)
        return model, "embedded tiny SD-1.5-shaped model (skp_ray/tiny-sd15)"
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae_shape = args.vae or "sd15"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**(SD15_VAE if vae_shape == "sd15" else TINY_VAE))
    for part in (unet, vae):
        part.to(args.device, dtype).eval().requires_grad_(False)
    model = Diffusion(unet=unet, vae=vae, scheduler=spec_scheduler(dict(SD15_SCHEDULER)), model_id="sd15-shape")
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    vae_words = "SD 1.5's VAE shape" if vae_shape == "sd15" else "the tiny model's VAE"
    return model, f"SD 1.5 UNet shape ({millions:.0f} M parameters, random weights) with {vae_words}"


# --- the replayed randomness -----------------------------------------------------------------


def draw_inputs(args: argparse.Namespace, model: Diffusion) -> dict:
    """Images, points and the optimisation's random draws, once, from one seeded generator (CPU, float32)."""
    g = torch.Generator().manual_seed(args.seed)
    P, R, S, side = args.points, args.restarts, args.steps, args.source_side
    source = torch.rand(3, side, side, generator=g)
    target = torch.rand(3, side, side, generator=g)
    # Points well inside the image, so that every crop can keep them the margin of its side from the edges.
    points = (0.25 + 0.5 * torch.rand(P, 2, generator=g)) * (side - 1)
    contexts = torch.randn(P, R, NUM_TOKENS, model.context_dim, generator=g)
    # Each step's crop as the core draws it: the point at least the margin of the crop from its edges.
    crop, centers = crop_side(LDM_CROP_FRACTION), canvas_position(points, side, side)
    crops = torch.stack([
        torch.stack([torch.stack([draw_crop_start(center, crop, LDM_CROP_MARGIN, g) for _ in range(S)]) for _ in range(R)])
        for center in centers
    ])  # fmt: skip
    latent = args.image_size // 8
    noise = torch.rand(P, R, S, 4, latent, latent, generator=g)  # U[0, 1): the published quirk's draw
    locate_noise = torch.rand(P, R, args.passes, 4, latent, latent, generator=g)
    # All on the CPU, as the core takes them (it moves images, contexts and noise to the model's device).
    return dict(
        source=source, target=target, points=points, init_contexts=contexts, crops=crops, noise=noise,
        locate_noise=locate_noise,
    )  # fmt: skip


# --- the two paths ---------------------------------------------------------------------------


def optimise_batched(optimize, model, inputs, args):
    return optimize(
        model, inputs["source"], inputs["points"], num_steps=args.steps, restarts=args.restarts,
        image_size=args.image_size, init_contexts=inputs["init_contexts"], crops=inputs["crops"],
        noise=inputs["noise"], max_batch=args.max_batch,
    )  # fmt: skip


def optimise_one_at_a_time(optimize, model, inputs, args):
    """P x R calls with one point and one restart each; contexts [P, R, T, D] and losses [steps, P, R]."""
    contexts, losses = [], []
    for p in range(args.points):
        row_contexts, row_losses = [], []
        for r in range(args.restarts):
            pick = (slice(p, p + 1), slice(r, r + 1))
            out = optimize(
                model, inputs["source"], inputs["points"][p : p + 1], num_steps=args.steps, restarts=1,
                image_size=args.image_size, init_contexts=inputs["init_contexts"][pick], crops=inputs["crops"][pick],
                noise=inputs["noise"][pick], max_batch=1,
            )  # fmt: skip
            row_contexts.append(out.contexts[0, 0])
            row_losses.append(out.losses[:, 0, 0])
        contexts.append(torch.stack(row_contexts))
        losses.append(torch.stack(row_losses, dim=1))
    return torch.stack(contexts), torch.stack(losses, dim=1)


def locate_batched(locate, model, inputs, contexts, args):
    return locate(
        model, inputs["target"], contexts, passes=args.passes, image_size=args.image_size,
        generator=torch.Generator().manual_seed(args.seed + 1), max_batch=args.max_batch,
    )  # fmt: skip


def locate_one_at_a_time(locate, model, inputs, contexts, args):
    """R calls with contexts [1, T, D] per point (the published loop: each context's passes on their own)."""
    for p in range(args.points):
        for r in range(args.restarts):
            locate(
                model, inputs["target"], contexts[p, r : r + 1], passes=args.passes, image_size=args.image_size,
                generator=torch.Generator().manual_seed(args.seed + 1 + p * args.restarts + r), max_batch=1,
            )  # fmt: skip


def locate_agreement(locate, model, inputs, contexts, crops, args) -> dict:
    """Untimed: the batched call against P calls of one point's R contexts, one crop a UNet call
    (max_batch 1), both replaying the same crops and noise; the located points and final maps must agree.
    (The timed one-context calls cannot be compared with the batched answer: that averages a point's
    R contexts' maps before its softmax and argmax.)"""
    common = dict(passes=args.passes, image_size=args.image_size, return_maps=True)
    batched = locate(model, inputs["target"], contexts, crops=crops, noise=inputs["locate_noise"],
                     max_batch=args.max_batch, **common)  # fmt: skip
    single = [
        locate(model, inputs["target"], contexts[p], crops=crops[p : p + 1], noise=inputs["locate_noise"][p : p + 1],
               max_batch=1, **common)  # fmt: skip
        for p in range(args.points)
    ]
    points = torch.cat([out.points_yx for out in single])
    maps = torch.cat([out.maps for out in single])
    return dict(
        points_max_abs_diff_px=max_abs(batched.points_yx, points),
        maps_max_abs_diff=max_abs(batched.maps, maps),
        maps_max=batched.maps.abs().max().item(),
    )


# --- timing ----------------------------------------------------------------------------------


def synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    synchronise(device)
    start = time.perf_counter()
    result = fn()
    synchronise(device)
    return time.perf_counter() - start, result


def interleaved(paths: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """Each path ``repeats`` times, alternating which goes first; median seconds and the last results."""
    seconds = {name: [] for name in paths}
    results = {}
    names = list(paths)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            elapsed, results[name] = timed(paths[name], device)
            seconds[name].append(elapsed)
            print(f"  {name}: {elapsed:.2f} s", flush=True)
    return {name: statistics.median(values) for name, values in seconds.items()}, results | {"all_seconds": seconds}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- the run ---------------------------------------------------------------------------------


def device_line(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads ({platform.processor() or platform.machine()})"


def load_line() -> str:
    return "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_line()
    model, model_words = build_model(args)
    inputs = draw_inputs(args, model)
    optimize, locate = optimize_point_contexts, locate_point
    P, R, S, Q = args.points, args.restarts, args.steps, args.passes
    print(f"{device_line(args)}; {model_words}; {args.image_size} px, {args.dtype}; "
          f"{P} points x {R} restarts, {S} steps, {Q} passes, {args.repeats} repeats", flush=True)  # fmt: skip

    # Warm-up (allocator, kernels, lazily built state), a single point and restart, one step and one pass.
    warm = dict(vars(args), points=1, restarts=1, steps=1, passes=1)
    warm_inputs = dict(inputs, points=inputs["points"][:1], init_contexts=inputs["init_contexts"][:1, :1],
                       crops=inputs["crops"][:1, :1, :1], noise=inputs["noise"][:1, :1, :1])  # fmt: skip
    warm_out = optimise_batched(optimize, model, warm_inputs, argparse.Namespace(**warm))
    locate_batched(locate, model, warm_inputs, warm_out.contexts, argparse.Namespace(**warm))

    print("optimisation:", flush=True)
    opt_seconds, opt = interleaved(
        {
            "batched": lambda: optimise_batched(optimize, model, inputs, args),
            "one_at_a_time": lambda: optimise_one_at_a_time(optimize, model, inputs, args),
        },
        args.repeats, args.device,
    )  # fmt: skip
    batched_contexts, batched_losses = opt["batched"].contexts, opt["batched"].losses
    single_contexts, single_losses = opt["one_at_a_time"]
    contexts_diff = max_abs(batched_contexts, single_contexts)
    losses_diff = max_abs(batched_losses, single_losses)
    contexts_moved = max_abs(batched_contexts, inputs["init_contexts"])

    print("localisation:", flush=True)
    loc_seconds, loc = interleaved(
        {
            "batched": lambda: locate_batched(locate, model, inputs, batched_contexts, args),
            "one_at_a_time": lambda: locate_one_at_a_time(locate, model, inputs, batched_contexts, args),
        },
        args.repeats, args.device,
    )  # fmt: skip
    located = loc["batched"].points_yx.float().cpu()
    print("agreement of the localisation (untimed):", flush=True)
    located_agreement = locate_agreement(locate, model, inputs, batched_contexts, loc["batched"].crops, args)

    def per_point(opt_s: float, loc_s: float) -> dict:
        step = opt_s / S / P  # seconds per step per point, R restarts
        pass_ = loc_s / Q / P  # seconds per pass per point, R contexts
        published = (step * PUBLISHED_STEPS + pass_ * PUBLISHED_PASSES) * PUBLISHED_RESTARTS / R
        return dict(
            optimisation_s=opt_s, optimisation_points_per_s=P / opt_s, optimisation_step_s_per_point=step,
            localisation_s=loc_s, localisation_points_per_s=P / loc_s, localisation_pass_s_per_point=pass_,
            published_settings_s_per_point_extrapolated=published,
        )  # fmt: skip

    load_after = load_line()
    figures = {name: per_point(opt_seconds[name], loc_seconds[name]) for name in ("batched", "one_at_a_time")}
    ratio = lambda key: figures["batched"][key] / figures["one_at_a_time"][key]
    return dict(
        date=date.today().isoformat(),
        device=device_line(args),
        load_before=load_before,
        load_after=load_after,
        model=args.model,
        model_shape=model_words,
        image_size=args.image_size,
        source_side=args.source_side,
        dtype=args.dtype,
        points=P, restarts=R, steps=S, passes=Q, repeats=args.repeats, max_batch=args.max_batch, seed=args.seed,
        batched=figures["batched"],
        one_at_a_time=figures["one_at_a_time"],
        optimisation_speedup=ratio("optimisation_points_per_s"),
        localisation_speedup=ratio("localisation_points_per_s"),
        published_settings_speedup=1 / ratio("published_settings_s_per_point_extrapolated"),
        optimisation_all_seconds=opt["all_seconds"],
        localisation_all_seconds=loc["all_seconds"],
        contexts_max_abs_diff=contexts_diff,
        losses_max_abs_diff=losses_diff,
        contexts_max_abs_change_from_init=contexts_moved,
        located_batched_yx=located.tolist(),
        localisation_agreement=located_agreement,
        published_settings=dict(steps=PUBLISHED_STEPS, restarts=PUBLISHED_RESTARTS, passes=PUBLISHED_PASSES),
    )  # fmt: skip


def section(result: dict) -> str:
    b, o, loc = result["batched"], result["one_at_a_time"], result["localisation_agreement"]
    P, R, S, Q = (result[k] for k in ("points", "restarts", "steps", "passes"))
    header = (
        f"device: {result['device']}; model: {result['model_shape']} at {result['image_size']} px, {result['dtype']}; "
        f"{result['source_side']} x {result['source_side']} source and target images; {P} points x {R} restarts, "
        f"{S} optimisation steps, {Q} localisation passes, max_batch {result['max_batch']}; "
        f"medians of {result['repeats']} interleaved repetitions after a warm-up; machine {result['load_before']} "
        f"before, {result['load_after']} after"
    )
    lines = [
        "| measurement | one at a time (published) | batched | batched vs one at a time |",
        "| --- | --- | --- | --- |",
        f"| optimisation, {S} steps, {P} x {R} contexts | {o['optimisation_s']:.2f} s, "
        f"{o['optimisation_points_per_s']:.3g} points/s | {b['optimisation_s']:.2f} s, "
        f"{b['optimisation_points_per_s']:.3g} points/s | {result['optimisation_speedup']:.2f}x |",
        f"| localisation, {Q} passes, {R} contexts a point | {o['localisation_s']:.2f} s, "
        f"{o['localisation_points_per_s']:.3g} points/s | {b['localisation_s']:.2f} s, "
        f"{b['localisation_points_per_s']:.3g} points/s | {result['localisation_speedup']:.2f}x |",
        f"| seconds a point at {PUBLISHED_STEPS} steps, {PUBLISHED_RESTARTS} restarts, {PUBLISHED_PASSES} passes "
        f"(extrapolated) | {o['published_settings_s_per_point_extrapolated']:.1f} s "
        f"| {b['published_settings_s_per_point_extrapolated']:.1f} s | {result['published_settings_speedup']:.2f}x |",
    ]
    agreement = (
        f"Batched against one at a time, same replayed initial contexts, crops and noise: contexts differ by at most "
        f"{result['contexts_max_abs_diff']:.3g} (they moved {result['contexts_max_abs_change_from_init']:.3g} from "
        f"their initialisation), losses by at most {result['losses_max_abs_diff']:.3g}. Localisation with the "
        f"same replayed crops and noise, batched against one point and one crop a call: located points differ by "
        f"{loc['points_max_abs_diff_px']:.3g} px, final maps by at most {loc['maps_max_abs_diff']:.3g} "
        f"(their largest value {loc['maps_max']:.3g})."
    )
    return f"{header}\n\n" + "\n".join(lines) + f"\n\n{agreement}\n"


def main() -> None:
    args = arguments()
    result = run(args)
    text = section(result)
    print(json.dumps(result, indent=2))
    print(text)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    if not args.no_results:
        with RESULTS.open("a") as results:
            results.write(f"\n## {result['date']}: `benchmarks/ldm_correspondence.py`\n\n{text}")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
