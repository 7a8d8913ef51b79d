"""Writing images: PNG files (atomically) and sample grids."""

import io
import math

import numpy as np
from PIL import Image

from mpdiff.storage.files import write_bytes


def to_pil(image_uint8):
    """uint8 array [C, H, W] (C = 1 or 3) -> PIL image."""
    array = np.asarray(image_uint8)
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(np.transpose(array, (1, 2, 0)), mode="RGB")


def from_pil(picture):
    """PIL image (mode L or RGB) -> uint8 array [C, H, W]."""
    array = np.asarray(picture)
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


def png_bytes(image_uint8):
    buffer = io.BytesIO()
    to_pil(image_uint8).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path, image_uint8):
    write_bytes(path, png_bytes(image_uint8))


def make_grid(images_uint8, columns=None, pad=1, upscale=1, pad_value=80):
    """Tile uint8 images [N, C, H, W] into one uint8 image [C, H', W'] (row-major)."""
    images = np.asarray(images_uint8)
    n, c, h, w = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    if upscale > 1:
        images = images.repeat(upscale, axis=2).repeat(upscale, axis=3)
        h, w = h * upscale, w * upscale
    grid = np.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), pad_value, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = image
    return grid


def save_grid(path, images_uint8, columns=None, upscale=None):
    images_uint8 = np.asarray(images_uint8)
    if upscale is None:  # make tiny images (e.g. 8x8 digits) visible
        upscale = max(1, 64 // images_uint8.shape[-1])
    save_png(path, make_grid(images_uint8, columns=columns, upscale=upscale))


def class_grid(images_uint8, classes, per_class=16, max_images=256):
    """(tiles, columns) for :func:`save_grid`: one column per class present, up to `per_class` rows
    (blank tiles fill short columns), or the first `max_images` row-major when there are no classes."""
    images = np.asarray(images_uint8)
    present = sorted({c for c in classes if c is not None}) if classes is not None else []
    if not present:
        return images[:max_images], None
    columns = {c: [i for i, k in enumerate(classes) if k == c][:per_class] for c in present}
    rows = max(len(v) for v in columns.values())
    blank = np.zeros_like(images[0])
    tiles = [images[columns[c][r]] if r < len(columns[c]) else blank for r in range(rows) for c in present]
    return np.stack(tiles), len(present)
