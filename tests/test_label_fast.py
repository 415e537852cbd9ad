"""The labelling fast path: uint8 transport, one detection call per batch, the new options, actor threads."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from skp_ray.artifact import KeypointArtifact, save_artifact
from skp_ray.config import parse_settings
from skp_ray.images import ImageSource, decode_batch, pixels_from_uint8, source_item
from skp_ray.label_detector import KeypointDetector, _channels_last_vae
from skp_ray.labelling import LabelConfig, run_labelling
from skp_ray.model_source import TINY_MODEL
from skp_ray.samples import write_sample_images

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("artifact") / "tiny")
    context = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(image_size=64, feature_upsample_res=16, layers=[0, 1, 2, 3], noise_level=-1,
                    augment_degrees=15.0, augment_scale=[0.8, 1.0], augment_translate=[0.25, 0.25])  # fmt: skip
    save_artifact(KeypointArtifact(context, [3, 7, 11], model=TINY_MODEL, settings=settings), folder)
    return folder


def decoded(sources: list[ImageSource], size: int, uint8: bool, alpha: str = "white") -> dict:
    columns = [source_item(source) for source in sources]
    batch = {name: np.array([column[name] for column in columns]) for name in columns[0]}
    return decode_batch(batch, size=size, max_pixels=10**6, alpha=alpha, uint8=uint8)


def test_uint8_pixels_are_the_float_pixels_rounded(tmp_path):
    """Resized and masked pixels are not k / 255, so uint8 moves them within half a step (0.5 / 255);
    an image at the model's size, unmasked, comes back bit for bit."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(rgba[:32, :32, :3]).save(tmp_path / "exact.png")
    sources = [
        ImageSource(str(tmp_path / "rgba.png")),
        ImageSource(str(tmp_path / "rgba.png"), crop_box=(-5, 3, 40, 45), mask_uri=str(tmp_path / "mask.png")),
        ImageSource(str(tmp_path / "exact.png")),
    ]
    for alpha in ("white", "drop"):
        floats, small = decoded(sources, 32, uint8=False, alpha=alpha), decoded(sources, 32, uint8=True, alpha=alpha)
        assert small["pixels"].dtype == np.uint8 and small["pixels"].shape == floats["pixels"].shape
        back = pixels_from_uint8(small["pixels"]).numpy()
        assert np.abs(back - floats["pixels"]).max() <= 0.5 / 255 + 1e-6
        assert not np.allclose(back[:2], floats["pixels"][:2], atol=1e-6)  # resized or masked: really rounded
        np.testing.assert_array_equal(back[2], floats["pixels"][2])


class Counter:
    class add:
        @staticmethod
        def remote(*args):
            pass


def test_a_batch_labels_its_images_as_batches_of_one_would(artifact, tmp_path):
    write_sample_images(tmp_path, n=3, size=48, seed=3)
    sources = [ImageSource(str(path)) for path in sorted(tmp_path.glob("*.png"))]
    sources.append(ImageSource(str(tmp_path / "missing.png")))  # an error row in the middle of the batch
    sources[1], sources[3] = sources[3], sources[1]
    config = LabelConfig(artifact=artifact, input="-", output="-", augmentation_iterations=3, use_gpu=False,
                         copies_per_call=4, cpus_per_actor=1.0)  # fmt: skip
    detector = KeypointDetector(config, "run", Counter())
    batch = decoded(sources, 64, uint8=True)
    batch["image_id"] = np.array([str(i) for i in range(4)], dtype=object)
    together = detector(batch).to_pylist()
    alone = [detector({name: column[i : i + 1] for name, column in batch.items()}).to_pylist()[0] for i in range(4)]
    assert [row["status"] for row in together] == ["ok", "error", "ok", "ok"]
    for joint, single in zip(together, alone):
        for column in ("keypoints_xy", "peaks", "keypoint_spread_px", "peak_share"):
            if joint["status"] == "ok":
                np.testing.assert_allclose(np.array(joint[column]), np.array(single[column]), atol=1e-5)
            else:
                assert joint[column] is None and single[column] is None


def test_cpu_actors_use_as_many_torch_threads_as_they_hold_cpus(ray_session, artifact):
    import ray

    class Reporter(KeypointDetector):
        def threads(self) -> int:
            return torch.get_num_threads()

    def threads_of(cpus: float) -> int:
        config = LabelConfig(artifact=artifact, input="-", output="-", use_gpu=False, cpus_per_actor=cpus)
        actor = ray.remote(num_cpus=cpus)(Reporter).remote(config, "run", None)
        try:
            return ray.get(actor.threads.remote())
        finally:
            ray.kill(actor)

    assert threads_of(2.0) == 2
    assert threads_of(0.5) == 1  # Ray's OMP_NUM_THREADS=1 for a fractional CPU, and never 0


def test_the_new_options_parse_and_are_checked_on_the_driver(artifact, tmp_path, refuse_ray):
    settings = parse_settings(LabelConfig, ["--artifact", "a", "--input", "i", "--output", "o", "--copies_per_call",
                                            "6", "--tta_latent", "--compile", "--channels_last_vae"])  # fmt: skip
    config = LabelConfig(**settings)
    assert (config.copies_per_call, config.tta_latent, config.compile, config.channels_last_vae) == (6, True, True, True)
    defaults = LabelConfig(artifact="a", input="i", output="o")
    assert (defaults.copies_per_call, defaults.tta_latent, defaults.compile, defaults.channels_last_vae) == (
        None, False, False, None)  # fmt: skip
    assert _channels_last_vae(dataclasses.replace(defaults, use_gpu=False))
    assert not _channels_last_vae(dataclasses.replace(defaults, use_gpu=True))
    assert not _channels_last_vae(dataclasses.replace(defaults, use_gpu=False, channels_last_vae=False))
    refuse_ray("skp_ray.labelling")
    bad = LabelConfig(artifact=artifact, input=str(tmp_path), output=str(tmp_path / "out"), copies_per_call=0)
    with pytest.raises(ValueError, match="--copies_per_call must be at least 1"):
        run_labelling(bad)


def test_labelled_rows_equal_direct_detection_on_the_rounded_pixels(ray_session, artifact, tmp_path):
    """End to end through Ray: the rows are ``detect_keypoints`` of the uint8-rounded model pixels, one image a call."""
    import pandas as pd

    from skp_ray.artifact import load_artifact
    from skp_ray.detection import detect_keypoints
    from skp_ray.diffusion import load_diffusion
    from skp_ray.images import content_hash, load_source, pixels_to_uint8, read_image
    from skp_ray.label_detector import detection_generator, detection_options
    from skp_ray.model_source import model_location

    write_sample_images(tmp_path / "in", n=3, size=100, seed=5)
    config = LabelConfig(artifact=artifact, input=str(tmp_path / "in"), output=str(tmp_path / "out"), seed=7,
                         augmentation_iterations=2, batch_size=2, cpus_per_actor=0.5, progress=False,
                         channels_last_vae=False)  # fmt: skip
    run_labelling(config)
    rows = pd.read_parquet(tmp_path / "out")
    loaded = load_artifact(artifact)
    diffusion = load_diffusion(model_location(loaded.model), device="cpu", text_encoder=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor (half a CPU: one thread), so sums round alike
    try:
        for row in rows.itertuples():
            pixels = pixels_from_uint8(pixels_to_uint8(load_source(ImageSource(row.uri), size=64).pixels))
            points, peaks = detect_keypoints(
                diffusion, pixels[None], loaded.context, loaded.token_indices, augmentation_iterations=2,
                generator=detection_generator(7, content_hash(read_image(row.uri))), **detection_options(loaded.settings),
            )  # fmt: skip
            np.testing.assert_allclose(np.stack(row.keypoints_xy_normalized), points[0].flip(-1).numpy(), atol=1e-6)
            np.testing.assert_allclose(row.peaks, peaks[0].numpy(), rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
