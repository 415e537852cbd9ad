"""A short end-to-end run of the core on sample images: optimise, choose tokens, detect, draw.

It runs on one process (no Ray): the data-parallel discovery job replaces it
as the main job. With no model given it uses the embedded tiny model, whose
weights are random, so its keypoints carry no meaning.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from skp_ray.attention import attention_maps
from skp_ray.detection import detect_keypoints, select_keypoint_tokens
from skp_ray.diffusion import default_tiny_model, load_diffusion
from skp_ray.images import list_images, read_image, resize_batch, to_tensor
from skp_ray.optimization import optimize_context
from skp_ray.plotting import draw_keypoints, heatmap_overlay, image_grid, line_plot
from skp_ray.samples import write_sample_images


@dataclass
class DemoConfig:
    model: str | None = None  # hub id or folder; None: the embedded tiny model
    images: str | None = None  # folder, prefix or manifest; None: rendered sample images
    output: str = "outputs"
    num_images: int = 8
    num_tokens: int = 32
    num_steps: int = 10
    batch_size: int = 4
    top_k: int = 6
    furthest_point_num_samples: int = 12
    augmentation_iterations: int = 4
    lr: float = 5e-3
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def run_demo(config: DemoConfig) -> dict[str, str]:
    """Run the demo; returns the paths of what it wrote."""
    folder = Path(config.output) / time.strftime("demo-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    diffusion = load_diffusion(config.model or default_tiny_model(), device=config.device, text_encoder=False)
    uris = list_images(config.images) if config.images else write_sample_images(folder / "images", n=config.num_images)
    images = _load_images(uris[: config.num_images], diffusion.image_size)
    generator = torch.Generator().manual_seed(config.seed)
    selection = dict(top_k=config.top_k, furthest_point_num_samples=config.furthest_point_num_samples)
    print(f"demo: {len(images)} images, model {diffusion.model_id}, {config.num_steps} steps on {config.device}")

    context, history = optimize_context(
        diffusion,
        images,
        num_tokens=config.num_tokens,
        num_steps=config.num_steps,
        lr=config.lr,
        batch_size=min(config.batch_size, len(images)),
        generator=generator,
        on_step=_print_step,
        **selection,
    )
    indices = select_keypoint_tokens(diffusion, images, context, generator=generator, **selection)
    keypoints, peaks = detect_keypoints(
        diffusion, images, context, indices, augmentation_iterations=config.augmentation_iterations, generator=generator
    )
    with torch.no_grad():
        maps = attention_maps(diffusion, images[:1], context, token_indices=indices, generator=generator)[0]

    paths = {
        "context": str(folder / "context.safetensors"),
        "keypoints": str(folder / "keypoints.json"),
        "picture": str(folder / "keypoints.png"),
        "loss_curve": str(folder / "loss.png"),
    }
    save_file({"context": context.cpu().contiguous()}, paths["context"])
    record = {
        "config": asdict(config),
        "model": diffusion.model_id,
        "token_indices": indices.tolist(),
        "images": [
            {"uri": str(uri), "keypoints_yx": points.tolist(), "peaks": values.tolist()}
            for uri, points, values in zip(uris, keypoints, peaks)
        ],
        "loss": [float(parts.total) for parts in history],
    }
    Path(paths["keypoints"]).write_text(json.dumps(record, indent=2))
    _picture(images, keypoints, maps).save(paths["picture"])
    line_plot([float(parts.total) for parts in history], title="discovery loss").save(paths["loss_curve"])
    print(f"demo: keypoints in {paths['keypoints']}\ndemo: picture in {paths['picture']}")
    return paths


def _load_images(uris, size: int) -> torch.Tensor:
    return torch.cat([resize_batch(to_tensor(read_image(uri))[None], size) for uri in uris])


def _print_step(step: int, parts) -> None:
    print(
        f"step {step + 1}: loss {float(parts.total):.4f} "
        f"(sharpening {float(parts.sharpening):.5f}, equivariance {float(parts.equivariance):.6f})",
        flush=True,
    )


def _picture(images: torch.Tensor, keypoints: torch.Tensor, maps: torch.Tensor):
    """Top: every image with its numbered keypoints. Below: the first image's map of each keypoint."""
    marked = [draw_keypoints(image, points) for image, points in zip(images, keypoints)]
    overlays = [draw_keypoints(heatmap_overlay(images[0], token_map), keypoints[0]) for token_map in maps]
    columns = max(len(marked), len(overlays), 1)
    top = image_grid(marked, columns=columns)
    bottom = image_grid(overlays, columns=columns)
    return image_grid([top, bottom], columns=1)
