import io
import os
import pickle
import struct
import uuid
import zlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import skp_ray.images
from skp_ray.attention import attention_maps
from skp_ray.images import (
    ImageReadError,
    ImageSource,
    content_hash,
    crop_image,
    decode_image,
    list_images,
    list_sources,
    load_source,
    read_image,
    resize_batch,
    to_tensor,
)


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_image(h: int = 8, w: int = 12, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def memory_root():
    root = f"/skp_test_{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ---- decode_image: modes ---------------------------------------------------------------------


def test_rgb_png_round_trip():
    im = rgb_image()
    out = decode_image(encode(im))
    assert out.dtype == np.uint8 and out.shape == (8, 12, 3)
    assert np.array_equal(out, np.asarray(im))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gray_scaled_by_full_range(fmt):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32bit_int_gray_uses_16bit_range():
    data = encode(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert decode_image(data)[0, :, 0].tolist() == [0, 128, 255]


def test_float_gray():
    data = encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F"), "TIFF")
    assert decode_image(data)[0, :, 0].tolist() == [0, 128, 255]
    data = encode(Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), "F"), "TIFF")
    assert decode_image(data)[0, :, 0].tolist() == [0, 100, 255]


def test_8bit_gray_and_bilevel():
    assert decode_image(encode(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert decode_image(encode(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def palette_image() -> Image.Image:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    return im


def test_palette_with_and_without_transparency():
    assert decode_image(encode(palette_image())).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    # palette index 0 transparent -> white
    assert decode_image(encode(palette_image(), transparency=0)).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    gif = encode(palette_image(), "GIF", transparency=0)
    assert decode_image(gif).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_alpha_composited_on_white():
    im = Image.new("RGBA", (3, 1), (10, 20, 30, 0))
    im.putpixel((1, 0), (10, 20, 30, 255))
    im.putpixel((2, 0), (200, 100, 50, 128))
    out = decode_image(encode(im))
    # alpha 128/255: c * a + 255 * (1 - a)
    assert out.tolist() == [[[255, 255, 255], [10, 20, 30], [227, 177, 152]]]
    assert decode_image(encode(Image.new("LA", (1, 1), (0, 0)))).tolist() == [[[255, 255, 255]]]
    assert decode_image(encode(Image.new("LA", (1, 1), (40, 255)))).tolist() == [[[40, 40, 40]]]


def test_colour_key_transparency():
    data = encode(Image.new("RGB", (1, 1), (1, 2, 3)), transparency=(1, 2, 3))
    assert decode_image(data).tolist() == [[[255, 255, 255]]]
    data = encode(Image.new("L", (1, 1), 9), transparency=9)
    assert decode_image(data).tolist() == [[[255, 255, 255]]]


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk(fmt):
    assert decode_image(encode(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), fmt))[0, 0].tolist() == [255, 255, 255]
    if fmt == "TIFF":  # lossless: full magenta + yellow is red
        assert decode_image(encode(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), fmt))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_applied():
    im = Image.new("RGB", (3, 2), (0, 0, 0))  # width 3, height 2
    im.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = decode_image(encode(im, exif=exif))
    assert out.shape == (3, 2, 3)
    assert out[0, -1].tolist() == [255, 0, 0]  # top-left moved to top-right


def test_other_formats_decode():
    im = rgb_image()
    for fmt in ("BMP", "TIFF", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        assert np.array_equal(decode_image(encode(im, fmt, **kwargs)), np.asarray(im)), fmt
    jpeg = decode_image(encode(im, "JPEG", quality=95))
    assert jpeg.shape == (8, 12, 3)


# ---- decode_image: failures -------------------------------------------------------------------


def cause_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        decode_image(data, uri="mem://x.png", **kwargs)
    assert info.value.uri == "mem://x.png"
    assert "mem://x.png" in str(info.value) and info.value.cause in str(info.value)
    return info.value.cause


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"])
def test_truncated(fmt):
    data = encode(rgb_image(64, 64), fmt)
    assert cause_of(data[: len(data) // 2]) == "truncated"
    assert cause_of(data[:20]) == "truncated"  # cut inside the header


def test_empty_and_not_an_image():
    assert cause_of(b"") == "empty"
    assert cause_of(b"hello, I am a text file\n") == "not_an_image"
    assert cause_of(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "not_an_image"


def test_too_large_checked_before_decoding():
    data = encode(rgb_image(40, 50))
    assert cause_of(data, max_pixels=40 * 50 - 1) == "too_large"
    assert decode_image(data, max_pixels=40 * 50).shape == (40, 50, 3)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # a header claiming 100000 x 100000 pixels with no data behind it
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    assert cause_of(bomb + chunk(b"IEND", b"")) == "too_large"


def test_error_is_a_value_error_and_pickles():
    err = ImageReadError("s3://b/k.png", "truncated", "cut short")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.uri, again.cause, str(again)) == (err.uri, err.cause, str(err))


# ---- read_image ---------------------------------------------------------------------------------


def test_read_image_local_and_memory(tmp_path, memory_root):
    im = rgb_image(5, 7)
    path = tmp_path / "a.png"
    im.save(path)
    assert np.array_equal(read_image(path), np.asarray(im))
    assert np.array_equal(read_image(str(path)), np.asarray(im))
    assert np.array_equal(read_image(f"file://{path}"), np.asarray(im))

    uri = f"memory://{memory_root}/b.png"
    with fsspec.open(uri, "wb") as f:
        f.write(encode(im))
    assert np.array_equal(read_image(uri), np.asarray(im))


def test_read_image_errors(tmp_path, memory_root):
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "missing.png")
    assert info.value.cause == "not_found" and "missing.png" in str(info.value)
    with pytest.raises(ImageReadError) as info:
        read_image(f"memory://{memory_root}/missing.png")
    assert info.value.cause == "not_found"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "empty.png")
    assert info.value.cause == "empty" and str(tmp_path / "empty.png") in str(info.value)


class FailingFileSystem(fsspec.AbstractFileSystem):
    """A store whose every read fails with the error its path names (permission, throttling ...)."""

    protocol = "failing"
    errors = {
        "denied": PermissionError("Access Denied"),
        "throttled": OSError("SlowDown: please reduce your request rate (after 5 retries)"),
        "nocreds": type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"),
    }

    def _open(self, path, mode="rb", **kwargs):
        raise self.errors[path.rsplit("/", 1)[-1].split(".")[0]]


@pytest.mark.parametrize(
    "uri, cause",
    [
        ("failing://bucket/denied.png", "permission_denied"),
        ("failing://bucket/nocreds.png", "permission_denied"),
        ("failing://bucket/throttled.png", "storage_error"),
        ("nosuchscheme://bucket/a.png", "unsupported_scheme"),
    ],
)
def test_store_failures_are_image_errors(uri, cause):
    fsspec.register_implementation("failing", FailingFileSystem, clobber=True)
    with pytest.raises(ImageReadError) as info:
        read_image(uri)
    assert info.value.cause == cause and uri in str(info.value)


def test_a_decoder_crash_is_an_image_error(monkeypatch):
    def crash(*args):
        raise ZeroDivisionError("inside the decoder")

    monkeypatch.setattr(skp_ray.images, "_to_rgb_array", crash)
    assert cause_of(encode(rgb_image(4, 4))) == "decoder_crash"


def test_max_pixels_is_the_only_pixel_limit(monkeypatch):
    """Raising max_pixels must be enough: Pillow's own bomb limit does not refuse the image first."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 2 x 100 pixels
    assert decode_image(encode(rgb_image(20, 20)), max_pixels=1000).shape == (20, 20, 3)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


def test_alpha_is_composited_on_white_or_dropped_as_published():
    rgba = Image.new("RGBA", (1, 1), (10, 20, 30, 0))
    assert decode_image(encode(rgba)).tolist() == [[[255, 255, 255]]]
    assert decode_image(encode(rgba), alpha="drop").tolist() == [[[10, 20, 30]]]
    with pytest.raises(ValueError, match="alpha"):
        decode_image(encode(rgba), alpha="black")


# ---- tensors ------------------------------------------------------------------------------------


def test_to_tensor():
    array = np.asarray(rgb_image(4, 6))
    t = to_tensor(array)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.allclose(t[:, 1, 2] * 255, torch.tensor(array[1, 2], dtype=torch.float32))
    with pytest.raises(ValueError):
        to_tensor(array.astype(np.float32))


def test_resize_batch():
    images = torch.rand(2, 3, 16, 16)
    assert resize_batch(images, 16) is images
    assert resize_batch(images, 8).shape == (2, 3, 8, 8)
    assert resize_batch(torch.rand(1, 3, 10, 30), 20).shape == (1, 3, 20, 20)  # aspect not kept
    flat = torch.full((1, 3, 12, 20), 0.3)
    assert torch.allclose(resize_batch(flat, 7), torch.full((1, 3, 7, 7), 0.3))
    # one bright column in four: antialiasing averages to 1/4 instead of sampling between columns
    stripes = torch.zeros(1, 3, 64, 64)
    stripes[..., ::4] = 1.0
    interior = resize_batch(stripes, 16)[..., 1:-1]  # the border renormalises a clipped filter
    assert torch.allclose(interior, torch.full_like(interior, 0.25), atol=1e-4)


# ---- list_images --------------------------------------------------------------------------------


def make_tree(root) -> list[str]:
    """Nested folder with images and non-images; returns the image paths, sorted."""
    files = ["a.png", "b/c.JPG", "b/d/e.jpeg", "b/d/f.webp", "g.TIFF", "h.bmp", "i.gif", "j.tif"]
    for name in files:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")
    for name in ["notes.txt", "b/data.csv", "b/d/README", "b/._c.png", "k.png.bak"]:
        with open(os.path.join(root, name), "w") as f:
            f.write("not an image")
    return sorted(os.path.join(str(root), name) for name in files)


def test_list_images_nested_local_folder(tmp_path):
    expected = make_tree(tmp_path)
    assert list_images(tmp_path) == expected
    assert list_images(str(tmp_path) + "/") == expected
    assert list_images(tmp_path / "b") == [p for p in expected if "/b/" in p]
    assert list_images(os.path.join(tmp_path, "b", "**", "*.webp")) == [os.path.join(tmp_path, "b/d/f.webp")]
    assert list_images(tmp_path / "a.png") == [str(tmp_path / "a.png")]


def test_list_images_memory_prefix(memory_root):
    for name in ["z.png", "sub/y.jpg", "sub/readme.md", "x.WEBP"]:
        with fsspec.open(f"memory://{memory_root}/{name}", "wb") as f:
            f.write(encode(rgb_image(3, 3)) if not name.endswith(".md") else b"# hi")
    uris = list_images(f"memory://{memory_root}")
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["y.jpg", "x.WEBP", "z.png"]  # sorted by full path
    assert all(u.startswith("memory://") for u in uris)
    assert read_image(uris[0]).shape == (3, 3, 3)


def write_manifests(folder: str, entries: list[str], fs=None) -> dict[str, str]:
    fs = fs or fsspec.filesystem("file")
    table = pa.table({"uri": entries, "label": list(range(len(entries)))})
    paths = {ext: f"{folder}/manifest.{ext}" for ext in ("txt", "csv", "parquet")}
    with fs.open(paths["txt"], "w") as f:
        f.write("# images\n" + "\n".join(entries) + "\n\n")
    with fs.open(paths["csv"], "wb") as f:
        pacsv.write_csv(table, f)
    with fs.open(paths["parquet"], "wb") as f:
        pq.write_table(table, f)
    return paths


@pytest.mark.parametrize("ext", ["txt", "csv", "parquet"])
def test_list_images_local_manifests(tmp_path, ext):
    (tmp_path / "imgs").mkdir()
    rgb_image().save(tmp_path / "imgs" / "one.png")
    entries = ["imgs/one.png", "../elsewhere/two.jpg", "/abs/three.png", "s3://bucket/four.png"]
    paths = write_manifests(str(tmp_path), entries)
    got = list_images(paths[ext])
    assert got == [
        str(tmp_path / "imgs" / "one.png"),
        os.path.normpath(str(tmp_path / ".." / "elsewhere" / "two.jpg")),
        "/abs/three.png",
        "s3://bucket/four.png",
    ]
    assert read_image(got[0]).shape == (8, 12, 3)


@pytest.mark.parametrize("ext", ["txt", "csv", "parquet"])
def test_list_images_memory_manifests(memory_root, ext):
    fs = fsspec.filesystem("memory")
    with fs.open(f"{memory_root}/data/imgs/a.png", "wb") as f:
        f.write(encode(rgb_image(2, 3)))
    paths = write_manifests(f"memory://{memory_root}/data", ["imgs/a.png", "gs://b/c.png"], fs)
    got = list_images(paths[ext])
    assert got[1] == "gs://b/c.png"
    assert got[0].startswith("memory://") and got[0].endswith(f"{memory_root}/data/imgs/a.png")
    assert read_image(got[0]).shape == (2, 3, 3)


def test_list_images_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found") as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "m.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no images found"):
        list_images(tmp_path / "m.txt")
    pacsv.write_csv(pa.table({"path": ["a.png"]}), str(tmp_path / "m.csv"))
    with pytest.raises(ValueError, match="'uri' column"):
        list_images(tmp_path / "m.csv")


def test_crop_image_fills_outside_black():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    inside = crop_image(image, (1, 2, 4, 4))
    np.testing.assert_array_equal(inside, image[2:4, 1:4])
    around = crop_image(image, (-2, -1, 6, 5))  # 8 wide, 6 high, image at offset (x 2, y 1)
    assert around.shape == (6, 8, 3)
    np.testing.assert_array_equal(around[1:5, 2:7], image)
    assert around[0].sum() == 0 and around[5].sum() == 0 and around[:, :2].sum() == 0 and around[:, 7].sum() == 0
    outside = crop_image(image, (10, 10, 13, 12))
    assert outside.shape == (2, 3, 3) and outside.sum() == 0


@pytest.mark.parametrize("box", [(3, 0, 3, 4), (4, 0, 1, 4), (0, 3, 4, 1)])
def test_an_empty_or_inverted_crop_box_is_an_error_naming_the_image_and_the_box(tmp_path, box):
    rgb_image(4, 5).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError) as info:
        load_source(ImageSource(str(tmp_path / "a.png"), crop_box=box))
    assert info.value.cause == "bad_crop"
    assert str(tmp_path / "a.png") in str(info.value) and str(box) in str(info.value)


def independent_resize(array: np.ndarray, size: int) -> torch.Tensor:
    """[H, W] or [H, W, 3] in 0..1 -> float64 [C, size, size] with torch's antialiased bilinear filter."""
    t = torch.as_tensor(array, dtype=torch.float64)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return torch.nn.functional.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True)[0]


@pytest.mark.parametrize("on", [1, 255])
def test_load_source_multiplies_by_the_mask_at_the_model_size(tmp_path, on):
    """As the published Human3.6M loader: image and mask each resized to the model's side, then multiplied."""
    pixels = np.random.default_rng(0).integers(1, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[:, 5:] = on
    Image.fromarray(mask).save(tmp_path / "m.png")
    loaded = load_source(ImageSource(str(tmp_path / "a.png"), mask_uri=str(tmp_path / "m.png")), size=5)
    expected = independent_resize(pixels / 255.0, 5).clamp(0, 1) * independent_resize(mask / on, 5)
    np.testing.assert_allclose(loaded.pixels.double(), expected, atol=1e-6)
    # multiplying at the native size first gives other edges
    native = independent_resize(pixels / 255.0 * (mask / on)[..., None], 5)
    assert (native - expected).abs().max() > 1e-3
    assert (loaded.height, loaded.width, loaded.frame) == (12, 12, (0, 0, 12, 12))


def test_load_source_crops_the_image_and_its_mask_alike(tmp_path):
    pixels = np.random.default_rng(0).integers(1, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(mask[::2, ::2]).save(tmp_path / "half.png")  # a scaled copy is accepted too
    half = ImageSource(str(tmp_path / "a.png"), crop_box=(2, 1, 10, 5), mask_uri=str(tmp_path / "half.png"))
    assert load_source(half).pixels.shape == (3, 4, 8)
    source = ImageSource(str(tmp_path / "a.png"), crop_box=(2, 1, 10, 5), mask_uri=str(tmp_path / "m.png"))
    loaded = load_source(source)
    assert (loaded.height, loaded.width) == (6, 8) and loaded.pixels.shape == (3, 4, 8)
    assert loaded.frame == (2, 1, 10, 5) and loaded.frame_size == (4, 8)
    view = (loaded.pixels.permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_array_equal(view[:, 2:6], pixels[1:5, 4:8])  # mask on, inside the image
    assert view[:, :2].max() == 0 and view[:, 6:].max() == 0  # masked out left; black beyond the right edge


def test_a_mask_of_another_aspect_is_an_error_row_cause(tmp_path):
    rgb_image(6, 8).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError) as info:
        load_source(ImageSource(str(tmp_path / "a.png"), mask_uri=str(tmp_path / "m.png")))
    assert info.value.cause == "bad_mask" and "8x8" in str(info.value) and "8x6" in str(info.value)
    with pytest.raises(ImageReadError) as info:
        load_source(ImageSource(str(tmp_path / "a.png"), mask_uri=str(tmp_path / "missing.png")))
    assert info.value.cause == "bad_mask" and "missing.png" in str(info.value)


def saturated_photo() -> np.ndarray:
    """A real photograph (scikit-learn's sample) brightened until large regions saturate at 255."""
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0].astype(np.float32)
    return np.clip(photo * 1.8, 0, 255).astype(np.uint8)


def test_resizing_a_saturated_photo_stays_in_0_1(tmp_path):
    photo = saturated_photo()
    raw = torch.nn.functional.interpolate(to_tensor(photo)[None], size=(256, 256), mode="bilinear", antialias=True)
    assert raw.max() > 1  # in float32 the antialiasing filter overshoots on saturated pixels (1.0000001)
    resized = resize_batch(to_tensor(photo)[None], 256)
    assert 0 <= float(resized.min()) and float(resized.max()) <= 1
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=92)
    loaded = load_source(ImageSource(str(tmp_path / "photo.jpg")), size=256)
    assert float(loaded.pixels.max()) <= 1


def test_a_range_error_prints_the_exact_value(tiny):
    images = torch.full((1, 3, 64, 64), 0.5)
    images[0, 0, 0, 0] = 1.00000012
    with pytest.raises(ValueError) as info:
        attention_maps(tiny, images, torch.randn(4, tiny.context_dim), image_size=64, feature_upsample_res=8)
    assert repr(float(images.max())) in str(info.value)  # 1.0000001192092896, not a rounded 1


def test_content_hash_follows_the_pixels_not_the_name(tmp_path):
    rgb_image(6, 8).save(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    rgb_image(6, 8, seed=1).save(tmp_path / "other.png")
    hashes = [load_source(ImageSource(str(tmp_path / n))).content_hash for n in ("a.png", "copy.png", "other.png")]
    assert hashes[0] == hashes[1] != hashes[2]
    image = np.zeros((2, 6, 3), dtype=np.uint8)
    assert content_hash(image) != content_hash(image.reshape(6, 2, 3))  # same bytes, other shape


def test_list_sources_reads_crops_masks_and_splits_from_a_parquet_manifest(tmp_path):
    rows = [
        {"uri": "a.png", "split": "train", "crop_box": [0, 0, 4, 4], "mask_uri": "m/a.png"},
        {"uri": "b.png", "split": "test", "crop_box": None, "mask_uri": None},
        {"uri": "c.png", "split": "train", "crop_box": None, "mask_uri": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    manifest = str(tmp_path / "manifest.parquet")
    sources = list_sources(manifest)
    assert sources[0] == ImageSource(str(tmp_path / "a.png"), (0, 0, 4, 4), str(tmp_path / "m" / "a.png"))
    assert sources[1] == ImageSource(str(tmp_path / "b.png"))
    assert [s.uri for s in list_sources(manifest, split="train")] == [str(tmp_path / n) for n in ("a.png", "c.png")]
    with pytest.raises(ValueError, match="in split 'val'"):
        list_sources(manifest, split="val")
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(ValueError, match="without splits"):
        list_sources(str(tmp_path / "list.txt"), split="train")
