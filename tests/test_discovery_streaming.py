"""Discovery's per-step reader: the same pixels as load_source, a bounded cache, the same run whatever its size."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skp_ray.discovery import run_discovery
from skp_ray.discovery_data import ShardReader
from skp_ray.images import ImageSource, load_source
from skp_ray.samples import write_sample_images
from test_discovery import small_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> list[ImageSource]:
    """Sources that take every path of load_source: JPEG, non-square PNG, transparency, a crop box reaching
    outside the image, a mask; followed by three that cannot be read."""
    folder = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.jpg", quality=90)
    Image.fromarray(pixels[:, :50]).save(folder / "b_tall.png")
    rgba = np.concatenate([pixels, rng.integers(0, 256, (90, 130, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(folder / "c_alpha.png")
    mask = (rng.random((90, 130)) > 0.4).astype(np.uint8) * 255
    Image.fromarray(mask).save(folder / "c_mask.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "notes.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return [
        ImageSource(str(folder / "a.jpg")),
        ImageSource(str(folder / "b_tall.png")),
        ImageSource(str(folder / "c_alpha.png")),
        ImageSource(str(folder / "a.jpg"), crop_box=(-10, 5, 100, 120)),
        ImageSource(str(folder / "a.jpg"), mask_uri=str(folder / "c_mask.png")),
        ImageSource(str(folder / "a.jpg"), crop_box=(20, 10, 80, 70), mask_uri=str(folder / "c_mask.png")),
        ImageSource(str(folder / "broken.png")),
        ImageSource(str(folder / "notes.jpg")),
        ImageSource(str(folder / "empty.png")),
    ]


@pytest.mark.parametrize("cache_images", [0, 2, 100])
@pytest.mark.parametrize("alpha", ["white", "drop"])
def test_the_reader_gives_load_sources_pixels_bit_for_bit(varied, cache_images, alpha):
    reader = ShardReader(varied, 0, 1, 48, alpha, cache_images)
    try:
        expected = torch.stack([load_source(source, size=48, alpha=alpha).pixels for source in varied[:6]])
        assert reader.indices == [0, 1, 2, 3, 4, 5]
        order = [5, 0, 3, 3, 1, 4, 2]
        assert torch.equal(reader.batch(order), expected[order])
        reader.prefetch([2, 1])
        assert torch.equal(reader.batch([2, 1]), expected[[2, 1]])  # the prefetched batch
        reader.prefetch([0])
        assert torch.equal(reader.batch([4]), expected[[4]])  # a batch that was not prefetched
        # The masked sources (4 and 5) are never cached. The budget of cache_images 48 x 48 images (6,912 bytes
        # each) holds, for 2 (13,824 bytes), the 90 x 50 view (13,500) but no 90 x 130 one (35,100); for 100, all
        # four unmasked views (121,650 bytes).
        assert reader.cached == {0: 0, 2: 1, 100: 4}[cache_images]
        assert reader.sizes == [(90, 130), (90, 50), (90, 130), (115, 110), (90, 130), (60, 60)]
    finally:
        reader.close()


@pytest.mark.parametrize("size, cache_images, cached", [(64, 3, 1), (128, 3, 3)])
def test_the_cache_is_bounded_by_count_and_by_the_bytes_of_that_many_model_size_images(varied, size, cache_images, cached):
    # Views of 35,100, 13,500, 35,100 and 37,950 bytes. At 64 px the budget is 3 x 3 x 64 x 64 = 36,864 bytes:
    # the first view fits, leaving 1,764, too little for any other. At 128 px (147,456 bytes) the count stops at 3.
    reader = ShardReader(varied[:4], 0, 1, size, "white", cache_images)
    try:
        assert reader.cached == cached
        expected = torch.stack([load_source(source, size=size).pixels for source in varied[:4]])
        assert torch.equal(reader.batch([3, 2, 1, 0]), expected[[3, 2, 1, 0]])
    finally:
        reader.close()


def test_the_cache_holds_the_decoded_image_not_the_resized_one(varied):
    """Caching the uint8 picture at the model's size would not be exact: the resize is done in float."""
    from skp_ray.images import read_image, resize_batch, to_tensor

    image = read_image(varied[0].uri)
    resized = load_source(varied[0], size=48).pixels
    rounded = to_tensor(np.rint(resized.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert not torch.equal(rounded, resized)
    assert torch.equal(resize_batch(to_tensor(image)[None], 48)[0], resized)


def test_unreadable_images_are_skipped_and_counted_by_cause_on_each_worker(varied):
    # Worker 0 of 2 holds sources 0, 2, 4, 6 (broken.png), 8 (empty.png); worker 1 holds 1, 3, 5, 7 (notes.jpg).
    first, second = ShardReader(varied, 0, 2, 32, "white", 1), ShardReader(varied, 1, 2, 32, "white", 1)
    try:
        assert first.indices == [0, 2, 4] and second.indices == [1, 3, 5]
        assert first.skipped == Counter({"truncated": 1, "empty": 1})
        assert second.skipped == Counter({"not_an_image": 1})
    finally:
        first.close(), second.close()


def test_an_image_that_goes_missing_after_the_shard_opened_is_an_error_naming_it(tmp_path):
    write_sample_images(tmp_path, n=3, size=32, seed=4)
    sources = [ImageSource(str(path)) for path in sorted(tmp_path.glob("*.png"))]
    reader = ShardReader(sources, 0, 1, 32, "white", 1)
    try:
        Path(sources[2].uri).unlink()
        assert reader.batch([0]).shape == (1, 3, 32, 32)  # cached: still there
        with pytest.raises(RuntimeError, match="image 2 of the listing was readable .* not now"):
            reader.batch([2])
    finally:
        reader.close()


def test_a_cache_smaller_than_the_shard_gives_the_same_run(ray_session, tmp_path):
    """One image cached of four readable (two unreadable listed among them) against all of them cached."""
    data = tmp_path / "data"
    write_sample_images(data, n=4, size=128, seed=5)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "notes.jpg").write_text("not an image")
    runs = {
        cache: run_discovery(
            small_config(str(data), tmp_path, name=f"cache{cache}", cache_images=cache, num_steps=3)
        ).artifact
        for cache in (1, 1000)
    }
    small, full = runs[1], runs[1000]
    assert torch.equal(small.context, full.context)
    assert small.loss_history == full.loss_history and len(small.loss_history) == 3
    assert small.token_indices == full.token_indices
    assert small.images == full.images
    assert small.images["listed"] == 6 and small.images["used"] == 4
    assert small.images["skipped"] == {"truncated": 1, "not_an_image": 1}


def test_a_negative_cache_is_refused_on_the_driver(tmp_path, refuse_ray):
    refuse_ray("skp_ray.discovery")
    write_sample_images(tmp_path / "data", n=4, size=64, seed=6)
    with pytest.raises(ValueError, match=r"--cache_images must be 0 \(no cache\) or more \(got -1\)"):
        run_discovery(small_config(str(tmp_path / "data"), tmp_path / "out", name="neg", cache_images=-1))
    assert not (tmp_path / "out" / "neg").exists()


def test_the_reader_refuses_a_negative_cache():
    with pytest.raises(ValueError, match="cache_images must be 0 or more"):
        ShardReader([], 0, 1, 32, "white", -1)
