"""A discovery worker's shard of images, read per step: a bounded uint8 cache and a prefetch thread.

The shard is image ``i`` of the listing for every ``i % world == rank``. Opening
it decodes each image once to learn which are readable (the step order is
drawn over the readable ones, so their number must be known before the first
step) and keeps the decoded uint8 pixels of the first ``cache_images`` of
them, within the bytes of that many images at the model's size. After that,
a batch is built from the cache or read again from storage; ``prefetch``
reads the next step's images on a background thread while the current step
computes. Memory is bounded by the cache and two batches, not by
the shard's size.

Pixels are bit-identical to ``load_source(source, size=size).pixels``: the cache
holds the decoded image (cropped, before any resize) and the float conversion
and resize are redone on every use, exactly as ``load_source`` does them. A
source with a mask is never cached: it is read through ``load_source`` itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from skp_ray.images import ImageReadError, ImageSource, crop_image, load_source, read_image, resize_batch, to_tensor

logger = logging.getLogger(__name__)


def decode_view(source: ImageSource, alpha: str) -> np.ndarray:
    """What the model sees of an unmasked source, decoded: uint8 [h, w, 3] (the crop box applied, not resized)."""
    image = read_image(source.uri, alpha=alpha)
    return crop_image(image, source.crop_box, uri=source.uri) if source.crop_box is not None else image


def view_pixels(view: np.ndarray, size: int) -> torch.Tensor:
    """float32 [3, size, size] from a decoded view, by load_source's own conversion and resize."""
    return resize_batch(to_tensor(view)[None], size)[0]


class ShardReader:
    """One worker's readable images: ``indices`` (global, in listing order), ``sizes`` ((height, width) of
    what each shows the model, before resizing), ``skipped`` (unreadable ones by cause); ``batch(positions)``
    gives their pixels [n, 3, size, size], positions being places in ``indices``."""

    def __init__(
        self, sources: list[ImageSource], rank: int, world: int, size: int, alpha: str, cache_images: int
    ) -> None:
        if cache_images < 0:
            raise ValueError(f"cache_images must be 0 or more (got {cache_images})")
        self.size, self.alpha = size, alpha
        self.indices: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.skipped: Counter = Counter()
        self._sources: list[ImageSource] = []
        self._cache: dict[int, np.ndarray] = {}  # position -> decoded view
        # Views are kept at their own size: a budget of N model-size images keeps large photos from using more.
        self._cache_bytes_left = cache_images * 3 * size * size
        for index in range(rank, len(sources), world):
            self._open(index, sources[index], cache_images)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skp-prefetch")
        self._pending: tuple[tuple[int, ...], Future] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def cached(self) -> int:
        return len(self._cache)

    def _open(self, index: int, source: ImageSource, cache_images: int) -> None:
        try:
            if source.mask_uri is not None:
                frame_size = load_source(source, alpha=self.alpha).frame_size
                view = None
            else:
                view = decode_view(source, self.alpha)
                frame_size = view.shape[:2]
        except ImageReadError as error:
            self.skipped[error.cause] += 1
            logger.warning("[discover] skipping %s", error)
            return
        if view is not None and len(self._cache) < cache_images and view.nbytes <= self._cache_bytes_left:
            self._cache[len(self.indices)] = view
            self._cache_bytes_left -= view.nbytes
        self.indices.append(index)
        self.sizes.append(tuple(int(side) for side in frame_size))
        self._sources.append(source)

    def prefetch(self, positions: list[int]) -> None:
        """Start reading these images on the background thread; the next ``batch`` of them takes the result."""
        key = tuple(positions)
        self._pending = (key, self._thread.submit(self._read, key))

    def batch(self, positions: list[int]) -> torch.Tensor:
        key = tuple(positions)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            return pending[1].result()
        return self._read(key)

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _read(self, positions: tuple[int, ...]) -> torch.Tensor:
        if not positions:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack([self._pixels(position) for position in positions])

    def _pixels(self, position: int) -> torch.Tensor:
        view = self._cache.get(position)
        if view is not None:
            return view_pixels(view, self.size)
        source = self._sources[position]
        try:
            if source.mask_uri is not None:
                return load_source(source, size=self.size, alpha=self.alpha).pixels
            return view_pixels(decode_view(source, self.alpha), self.size)
        except ImageReadError as error:
            raise RuntimeError(
                f"image {self.indices[position]} of the listing was readable when this worker opened its shard "
                f"and is not now ({error}); restore it, or restart the run under another --name without it"
            ) from error
