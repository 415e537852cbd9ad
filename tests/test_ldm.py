"""Prompt-optimised correspondence (SPEC 3): maps, optimisation and localisation on the tiny SD 1.5 model.

Everything runs at a model input side of 128 (the canvas stays 512) so that a
UNet step costs a fraction of a second on a CPU.
"""

import math

import numpy as np
import pytest
import torch

from skp_ray.attention import captured_layer_names
from skp_ray.correspondence import ldm_contexts, ldm_locate, ldm_maps
from skp_ray.correspondence.ldm_contexts import optimize_point_contexts
from skp_ray.correspondence.ldm_locate import locate_point, reduce_maps
from skp_ray.correspondence.ldm_maps import (
    canvas_position,
    crop_maps,
    crop_side,
    draw_crop_start,
    gaussian_targets,
    image_pixels,
    latent_shape,
)
from skp_ray.correspondence.ldm_settings import CANVAS
from skp_ray.diffusion import timestep_at

SIZE = 128  # the model's input side in these tests
SIDE = crop_side(0.9317)


def _image(seed: int = 0, height: int = 96, width: int = 144) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def _replay(diffusion, points: int, restarts: int, steps: int, seed: int = 3):
    """Initial contexts, crops and Gaussian noise for a replayed run."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(points, restarts, 77, diffusion.context_dim, generator=g)
    crops = torch.randint(0, CANVAS - SIDE + 1, (points, restarts, steps, 2), generator=g)
    noise = torch.randn(points, restarts, steps, *latent_shape(diffusion, SIZE), generator=g)
    return init, crops, noise


# --- maps -----------------------------------------------------------------------------------


def _bilinear_float64(grid: np.ndarray, out: int) -> np.ndarray:
    """Bilinear upsampling of [h, w] to [out, out] with align_corners=False, written from its definition."""

    def weights(size_in: int) -> np.ndarray:
        matrix = np.zeros((out, size_in))
        for o in range(out):
            source = max((o + 0.5) * size_in / out - 0.5, 0.0)
            low = min(int(math.floor(source)), size_in - 1)
            high = min(low + 1, size_in - 1)
            frac = source - low
            matrix[o, low] += 1 - frac
            matrix[o, high] += frac
        return matrix

    rows, cols = weights(grid.shape[0]), weights(grid.shape[1])
    return rows @ grid @ cols.T


def _token_map_float64(attn, hidden_states, context, token: int, heads: list[int], out: int) -> np.ndarray:
    hs = hidden_states.detach().double().numpy()[0]  # [n, C]
    ctx = context.detach().double().numpy()[0]  # [T, D]
    q = hs @ attn.to_q.weight.detach().double().numpy().T
    k = ctx @ attn.to_k.weight.detach().double().numpy().T
    head_count = attn.heads
    d = q.shape[1] // head_count
    per_head = []
    for h in heads:
        logits = q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / math.sqrt(d)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        per_head.append(probabilities[:, token])
    side = math.isqrt(hs.shape[0])
    return _bilinear_float64(np.mean(per_head, axis=0).reshape(side, side), out)


@pytest.mark.parametrize("published_quirks", [True, False])
def test_token_1_maps_equal_a_float64_recomputation_on_one_layer(tiny, published_quirks):
    layer = tiny.unet.get_submodule(captured_layer_names(tiny.unet)[0])
    assert layer.heads == 2  # so "the second half" is one head and "all" is two
    seen = {}

    def record(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["context"] = kwargs["encoder_hidden_states"]

    g = torch.Generator().manual_seed(0)
    crops = torch.rand(1, 3, SIZE, SIZE, generator=g)
    context = torch.randn(1, 77, tiny.context_dim, generator=g)
    noise = torch.randn(1, *latent_shape(tiny, SIZE), generator=g)
    hook = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        maps = crop_maps(tiny, crops, context, timestep=torch.tensor(140), noise=noise, layers=[0], token=1,
                         out_side=CANVAS, published_quirks=published_quirks)
    finally:
        hook.remove()
    heads = [1] if published_quirks else [0, 1]
    expected = _token_map_float64(layer, seen["hidden"], seen["context"], 1, heads, CANVAS)
    assert maps.shape == (1, 1, CANVAS, CANVAS)
    np.testing.assert_allclose(maps[0, 0].detach().double().numpy(), expected, rtol=1e-4, atol=1e-7)
    other_heads = _token_map_float64(layer, seen["hidden"], seen["context"], 1, [0, 1] if published_quirks else [1], CANVAS)
    assert np.abs(other_heads - expected).max() > 1e-4  # the head choice shows


def test_gaussian_targets_by_hand():
    sigma = 2.0
    clean = gaussian_targets(torch.tensor([[10.0, 20.0]]), sigma, published_quirks=False)[0]
    published = gaussian_targets(torch.tensor([[10.0, 20.0]]), sigma, published_quirks=True)[0]
    # clean: pixel (9, 19) has its centre at (9.5, 19.5), 0.5 squared twice from the point
    assert float(clean[9, 19]) == pytest.approx(math.exp(-0.5 / (2 * sigma**2)), rel=1e-6)
    assert float(clean[10, 20]) == pytest.approx(float(clean[9, 19]), rel=1e-6)
    # published: distances from the integer indices, so pixel (10, 20) is the peak
    assert float(published[10, 20]) == pytest.approx(1.0)
    assert float(published[12, 17]) == pytest.approx(math.exp(-(4 + 9) / (2 * sigma**2)), rel=1e-6)


def test_canvas_positions_map_pixel_centres_to_pixel_centres():
    points = torch.tensor([[0.0, 0.0], [99.0, 49.0]])
    positions = canvas_position(points, 100, 50)
    assert positions.tolist() == [[0.5 * 5.12, 0.5 * 10.24], [99.5 * 5.12, 49.5 * 10.24]]
    # the canvas pixel containing a point's centre maps back to within half an image pixel of it
    back = image_pixels(positions.floor(), 100, 50)
    assert (back - points).abs().max() <= 0.5


def test_crops_keep_the_point_off_their_edges_or_go_to_the_canvas_edge():
    g = torch.Generator().manual_seed(0)
    margin = 0.15
    for position in [0.3, 40.0, 71.6, 200.0, 256.5, 440.0, 470.0, 511.9]:
        for _ in range(20):
            top, left = draw_crop_start(torch.tensor([position, position]), SIDE, margin, g).tolist()
            assert 0 <= top <= CANVAS - SIDE
            inside = position - top
            if margin * SIDE <= position <= CANVAS - margin * SIDE:
                assert margin * SIDE - 1e-9 <= inside <= (1 - margin) * SIDE + 1e-9
            elif position < margin * SIDE:
                assert top == 0
            else:
                assert top == CANVAS - SIDE


# --- optimisation ---------------------------------------------------------------------------


def test_batched_optimisation_equals_separate_runs(tiny64):
    # In float64, so that rounding cannot flip Adam's step on elements whose gradient is near zero
    # (in float32 a few in a thousand elements then differ by up to lr).
    tiny = tiny64
    points, restarts, steps = [[20.0, 30.0], [70.0, 120.0]], 2, 3
    image = _image().double()
    init, crops, noise = _replay(tiny, 2, restarts, steps)
    init, noise = init.double(), noise.double()
    settings = dict(num_steps=steps, restarts=restarts, image_size=SIZE, lr=0.05)
    batched = optimize_point_contexts(tiny, image, points, init_contexts=init, crops=crops, noise=noise, **settings)
    chunked = optimize_point_contexts(tiny, image, points, init_contexts=init, crops=crops, noise=noise, max_batch=1, **settings)
    assert batched.contexts.shape == (2, restarts, 77, tiny.context_dim)
    assert batched.losses.shape == (steps, 2, restarts)
    moved = (batched.contexts - init).abs().max()
    assert moved > 0.05  # Adam moved every context by about lr per step
    for p in range(2):
        for r in range(restarts):
            alone = optimize_point_contexts(
                tiny,
                image,
                [points[p]],
                init_contexts=init[p : p + 1, r : r + 1],
                crops=crops[p : p + 1, r : r + 1],
                noise=noise[p : p + 1, r : r + 1],
                **dict(settings, restarts=1),
            )
            torch.testing.assert_close(batched.contexts[p, r], alone.contexts[0, 0], rtol=0, atol=1e-9)
            torch.testing.assert_close(batched.losses[:, p, r], alone.losses[:, 0, 0], rtol=1e-9, atol=0)
    torch.testing.assert_close(chunked.contexts, batched.contexts, rtol=0, atol=1e-9)


def test_a_short_run_lowers_the_loss(tiny):
    steps = 8
    init, crops, noise = _replay(tiny, 1, 2, steps)
    fixed_crops = crops[:, :, :1].expand(-1, -1, steps, -1)  # the same view every step: a fixed objective
    fixed_noise = noise[:, :, :1].expand(-1, -1, steps, -1, -1, -1)
    run = optimize_point_contexts(
        tiny, _image(), [[40.0, 70.0]], num_steps=steps, restarts=2, image_size=SIZE, lr=0.05,
        init_contexts=init, crops=fixed_crops, noise=fixed_noise,
    )
    first, last = run.losses[0, 0], run.losses[-1, 0]
    assert (last < first * 0.97).all(), run.losses[:, 0]


def test_drawn_crops_keep_each_point_inside_and_a_seed_repeats_the_run(tiny):
    points = [[10.0, 10.0], [50.0, 70.0]]
    run = lambda: optimize_point_contexts(  # noqa: E731
        tiny, _image(), points, num_steps=2, restarts=2, image_size=SIZE,
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    )
    first, second = run(), run()
    torch.testing.assert_close(first.contexts, second.contexts, rtol=0, atol=0)
    centers = canvas_position(torch.tensor([[50.0, 70.0]]), 96, 144)[0]
    inside = centers - first.crops[1].reshape(-1, 2).double()
    assert ((inside >= 0.15 * SIDE) & (inside <= 0.85 * SIDE)).all()
    assert (first.crops[0] == 0).all()  # a point near the corner gets the corner crop


def test_quirks_draw_uniform_noise_and_the_clean_variant_gaussian(tiny, monkeypatch):
    seen = []
    real = ldm_maps.crop_maps

    def spy(*args, **kwargs):
        seen.append((kwargs["noise"].clone(), kwargs["timestep"].item(), kwargs["published_quirks"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ldm_contexts, "crop_maps", spy)
    monkeypatch.setattr(ldm_locate, "crop_maps", spy)
    image, settings = _image(), dict(image_size=SIZE, generator=torch.Generator().manual_seed(0))
    for quirks in (True, False):
        seen.clear()
        run = optimize_point_contexts(tiny, image, [[40.0, 40.0]], num_steps=2, restarts=2, published_quirks=quirks, **settings)
        locate_point(tiny, image, run.contexts, passes=5, published_quirks=quirks, **settings)
        optimised, located = seen[:2], seen[2:]
        noise = torch.cat([n for n, _, _ in seen])
        if quirks:
            assert noise.min() >= 0 and noise.max() < 1 and abs(noise.mean() - 0.5) < 0.02
        else:
            assert noise.min() < -2 and abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
        assert {t for _, t, _ in optimised} == {timestep_at(tiny, 42).item()} == {140}
        # the published inference noised to t = 40 whatever noise_level said
        assert {t for _, t, _ in located} == ({40} if quirks else {140})
        assert all(q == quirks for _, _, q in seen)


def test_bad_points_and_replays_are_refused(tiny):
    with pytest.raises(ValueError, match="outside the 144 x 96 image"):
        optimize_point_contexts(tiny, _image(), [[96.0, 3.0]], num_steps=1, image_size=SIZE)
    with pytest.raises(ValueError, match="crops has shape"):
        optimize_point_contexts(tiny, _image(), [[9.0, 3.0]], num_steps=1, restarts=1, image_size=SIZE,
                                crops=torch.zeros(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="token 77"):
        optimize_point_contexts(tiny, _image(), [[9.0, 3.0]], num_steps=1, token=77, image_size=SIZE)


# --- localisation ---------------------------------------------------------------------------


def test_reduce_maps_by_hand():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 5.0]]]])  # [1, L=2, 2, 2]
    first = np.exp([0.0, 1.0, 2.0, 3.0]) / np.exp([0.0, 1.0, 2.0, 3.0]).sum()
    second = np.exp([1.0, 1.0, 1.0, 5.0]) / np.exp([1.0, 1.0, 1.0, 5.0]).sum()
    np.testing.assert_allclose(reduce_maps(maps)[0].flatten().numpy(), (first + second) / 2, rtol=1e-6)


def _bright_spot_maps(layers: int):
    """A stand-in for the UNet: each layer's map of a crop is the crop's red channel (a known peak)."""

    def fake(diffusion, crops, contexts, *, out_side, **_):
        red = torch.nn.functional.interpolate(crops[:, :1], size=(out_side, out_side), mode="bilinear", align_corners=False)
        return red.expand(-1, layers, -1, -1) * 50  # sharp enough that the softmax over pixels peaks there

    return fake


def test_localisation_finds_a_known_peak(tiny, monkeypatch):
    monkeypatch.setattr(ldm_locate, "crop_maps", _bright_spot_maps(4))
    height, width, peak = 150, 220, (37.0, 214.0)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    spot = torch.exp(-((rows - peak[0]) ** 2 + (cols - peak[1]) ** 2) / (2 * 3.0**2))
    image = torch.stack([spot, torch.zeros_like(spot), torch.zeros_like(spot)])
    contexts = torch.zeros(2, 3, 77, tiny.context_dim)  # two points, three contexts each
    located = locate_point(tiny, image, contexts, passes=8, image_size=SIZE, generator=torch.Generator().manual_seed(0))
    assert located.points_yx.shape == (2, 2)
    assert (located.points_yx - torch.tensor(peak, dtype=torch.float64)).abs().max() <= 0.6
    corners = [[0, 0], [0, CANVAS - SIDE], [CANVAS - SIDE, 0], [CANVAS - SIDE, CANVAS - SIDE]]
    assert located.crops[0, 0, :4].tolist() == corners
    # from the fifth pass on, each crop keeps the running argmax (the peak) off its edges where it can
    center = canvas_position(torch.tensor([peak]), height, width)[0]
    inside = center - located.crops[:, :, 4:].reshape(-1, 2).double()
    assert (inside[:, 0] >= 0.15 * SIDE - 1).all() and (inside[:, 0] <= 0.85 * SIDE + 1).all()
    assert (located.crops[:, :, 4:, 1] == CANVAS - SIDE).all()  # col 214 of 220 is too near the right edge for that


def test_localisation_of_batched_points_equals_one_point_at_a_time(tiny):
    image = _image(5)
    contexts = torch.randn(2, 2, 77, tiny.context_dim, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    crops = torch.randint(0, CANVAS - SIDE + 1, (2, 2, 5, 2), generator=g)
    noise = torch.rand(2, 2, 5, *latent_shape(tiny, SIZE), generator=g)
    settings = dict(passes=5, image_size=SIZE, return_maps=True)
    both = locate_point(tiny, image, contexts, crops=crops, noise=noise, **settings)
    for p in range(2):
        alone = locate_point(tiny, image, contexts[p], crops=crops[p : p + 1], noise=noise[p : p + 1], **settings)
        torch.testing.assert_close(both.maps[p], alone.maps[0], rtol=1e-5, atol=1e-9)
        assert both.canvas_yx[p].tolist() == alone.canvas_yx[0].tolist()
    assert both.crops.tolist() == crops.tolist()
