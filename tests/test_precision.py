"""bfloat16 against float32: the keypoints of a peaked context on the tiny model at its own image size (512)."""

import pytest
import torch

from skp_ray.attention import attention_maps
from skp_ray.detection import detect_with_confidence, draw_augmentations
from skp_ray.diffusion import load_diffusion
from skp_ray.samples import render_samples

SIZE = 512  # the tiny model's own image size, as SD 1.5's
TOKENS = 16


def _peaked_context(diffusion, images: torch.Tensor, *, steps: int = 12, lr: float = 0.3) -> torch.Tensor:
    """A context whose token maps are peaked: Adam on the mean entropy of each token's map over the pixels.

    Discovery's own objective (``optimize_context``) does not sharpen the tiny model's maps in a few
    dozen steps (their peak share stays ~7x flat); this one reaches ~100x in a dozen."""
    context = torch.randn(TOKENS, diffusion.context_dim, generator=torch.Generator().manual_seed(0))
    context.requires_grad_(True)
    optimizer = torch.optim.Adam([context], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        pair = images[step % 2 * 2 : step % 2 * 2 + 2]
        maps = attention_maps(diffusion, pair, context, generator=torch.Generator().manual_seed(step))
        shares = maps.flatten(2) / maps.flatten(2).sum(dim=-1, keepdim=True)
        entropy = -(shares * shares.clamp_min(1e-20).log()).sum(dim=-1).mean()
        entropy.backward()
        optimizer.step()
    return context.detach()


@pytest.mark.xfail(
    strict=True,
    reason="not met on the tiny model: 28-44% of keypoints within 2 px of float32, by machine (median 3.2-4.1 "
    "px; float16: 89%, median 0 px; bfloat16 autocast on the UNet alone: 47%). The peaked context this test needs "
    "makes every cross-attention of the random x16-gain UNet nearly one-hot, and the bfloat16 error grows at each: "
    "1% after the first ResNet, 2.3% and 4.8% after the first two attentions, 14% at the first captured layer (3% "
    "with a random context, whose maps are flat). On the random SD 1.5 shape the same sharpening hardly moves the "
    "maps (median peak share 4.6x flat against 82x here; 16 tokens, 256 px) and bfloat16 keeps 91% within 2 px of "
    "flat maps: the target needs trained weights. (A first cause, add_noise rounding sqrt(1 - alpha_bar_0) = "
    "0.029 to 0 in bfloat16, is fixed: add_noise now runs in float32.)",
)
def test_bfloat16_keypoints_agree_with_float32(tiny, tiny_model_path):
    images, _ = render_samples(4, size=SIZE, seed=0)
    context = _peaked_context(tiny, images)
    draws = [draw_augmentations(tiny, torch.Generator().manual_seed(seed), augmentation_iterations=2) for seed in range(4)]
    same_draws = dict(thetas=torch.stack([t for t, _ in draws]), noise=torch.stack([n for _, n in draws]))
    tokens = list(range(TOKENS))
    exact = detect_with_confidence(tiny, images, context, tokens, **same_draws)
    flat = 1 / SIZE**2
    assert exact.peak_share.median() > 50 * flat  # peaked: the keypoint is no accident of a flat map

    bfloat16 = load_diffusion(tiny_model_path, dtype=torch.bfloat16, text_encoder=False)
    approx = detect_with_confidence(bfloat16, images, context, tokens, **same_draws)
    distance_px = ((approx.keypoints - exact.keypoints) * SIZE).norm(dim=-1)
    within = (distance_px <= 2).float().mean().item()
    assert within >= 0.99, f"{within:.1%} of keypoints within 2 px; median {distance_px.median():.1f} px"
