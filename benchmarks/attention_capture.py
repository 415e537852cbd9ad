"""How much the capture shortcuts save, on the SD 1.5 UNet shape (random weights).

    python benchmarks/attention_capture.py [--device cuda] [--tokens 500] [--repeats 3]

Two comparisons, each against its baseline in the same run:
1. one captured 16 x 16 layer: upsampling logits (default) versus upsampling
   features then to_q (SPEC 1.2's literal recipe);
2. attention_maps at 512 px: early exit after the last captured layer versus
   running the whole UNet.
"""

import argparse
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from skp_ray.attention import attention_maps, captured_layer_names, token_maps
from skp_ray.diffusion import SD15_SCHEDULER, SD15_UNET, TINY_VAE, Diffusion, spec_scheduler

def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(args.device, dtype).eval().requires_grad_(False)
    vae = AutoencoderKL(**TINY_VAE).to(args.device, dtype).eval().requires_grad_(False)
    model = Diffusion(unet=unet, vae=vae, scheduler=spec_scheduler(dict(SD15_SCHEDULER)), model_id="sd15-shape")
    context = torch.randn(args.tokens, 768, device=args.device, dtype=dtype)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; SD 1.5 UNet shape, {args.dtype}, {args.tokens} tokens, batch 1, best of {args.repeats}")

    with torch.no_grad():
        layer = unet.get_submodule(captured_layer_names(unet)[0])
        hidden = torch.randn(1, 16 * 16, 1280, device=args.device, dtype=dtype)
        keys = context[None]
        logits_first = timed(lambda: token_maps(layer, hidden, keys, upsample_res=128), args.repeats, args.device)
        features_first = timed(lambda: token_maps(layer, hidden, keys, upsample_res=128, upsample_logits=False), args.repeats, args.device)
        print(f"one 16x16 layer: features-then-to_q {features_first * 1e3:.1f} ms, logits-upsampled {logits_first * 1e3:.1f} ms, "
              f"ratio {features_first / logits_first:.1f}x")

        images = torch.rand(1, 3, 512, 512, device=args.device)
        run = lambda stop: attention_maps(model, images, context, stop_early=stop, generator=None)
        early = timed(lambda: run(True), args.repeats, args.device)
        full = timed(lambda: run(False), args.repeats, args.device)
        print(f"attention_maps at 512 px: full UNet {full * 1e3:.0f} ms, early exit {early * 1e3:.0f} ms, ratio {full / early:.2f}x")


if __name__ == "__main__":
    main()
