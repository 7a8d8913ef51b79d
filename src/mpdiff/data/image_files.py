"""The image decoding policy of a dataset (SPEC §7.3): which files are decoded, how, and what is refused.

:func:`probe_image` reads an image's shape from its header alone; :func:`decode_image` decodes a whole
file into uint8 [C, H, W]. Only PIL's PNG, JPEG, BMP and WebP decoders run, with its tolerance of
truncated files forced off and a pixel limit against decompression bombs; modes become 1 or 3
channels, and any transparency (an alpha channel or a colour key) that a pixel uses is refused. Every
problem is one :class:`~mpdiff.errors.DatasetError` line naming the file.
"""

import contextlib
import warnings

import numpy as np

from mpdiff.errors import DatasetError, first_line

PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # the only decoders run (JPEG includes multi-picture MPO)
MAX_IMAGE_PIXELS = 8192 * 8192         # larger images are refused as possible decompression bombs

# Channels after the mode rules of mpdiff.data.datasets.open_dataset, by the mode PIL reports from the header alone.
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1,
                  "P": 3, "PA": 3, "RGB": 3, "RGBA": 3, "RGBX": 3, "CMYK": 3, "YCbCr": 3}
_KEYED_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "RGB")  # where PNG's tRNS chunk is a colour key


def probe_image(stream, where):
    """(channels, height, width) of an image from its header alone, without decoding any pixel.

    `stream` is a seekable binary file; the same files are refused as by :func:`decode_image`
    (not an image of our formats, damaged header, decompression bomb, unsupported mode).
    """
    from PIL import Image

    with _image_errors(where):
        if not stream.read(1):
            raise DatasetError(f"{where}: cannot read image (empty file)")
        stream.seek(0)
        with Image.open(stream, formats=_formats()) as image:  # lazy: reads the header only
            width, height = image.size
            mode = image.mode
    if mode not in _MODE_CHANNELS:
        raise _unsupported_mode(mode, where)
    return _MODE_CHANNELS[mode], height, width


def decode_image(data, where):
    """Decode one image file's bytes into uint8 [C, H, W] (C = 1 or 3), refusing anything doubtful.

    `where` names the file in messages. The whole file is decoded and, for PNG, every chunk
    checksum is verified, with PIL's truncated-image tolerance forced off.
    """
    import io

    from PIL import Image

    if len(data) == 0:
        raise DatasetError(f"{where}: cannot read image (empty file)")
    with _image_errors(where):
        with Image.open(io.BytesIO(data), formats=_formats()) as image:
            image.verify()  # PNG: CRC of every chunk, through IEND
        with Image.open(io.BytesIO(data), formats=_formats()) as image:
            image.load()
            # PNG's IHDR (verified above) gives the bit depth, which PIL's modes hide: tRNS keys are raw samples
            depth = data[24] if image.format == "PNG" and len(data) > 24 else 8
            return _to_array(image, where, depth)


def _formats():
    from PIL import Image

    Image.init()  # register every plugin, so that the names in PIL_FORMATS are known
    return [name for name in PIL_FORMATS if name in Image.OPEN]  # WEBP needs libwebp


@contextlib.contextmanager
def _image_errors(where):
    """PIL's strict settings, and any exception of PIL's as one DatasetError line naming the file."""
    from PIL import Image

    try:
        with _strict_pil(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # checked by Image.open
            yield
    except DatasetError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # PIL's own check, at open
        raise DatasetError(f"{where}: cannot read image (more than {MAX_IMAGE_PIXELS} pixels; refused as a "
                           f"possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{where}: cannot read image (not a PNG, JPEG, BMP or WebP image, or its header is "
                           f"damaged)") from None
    except MemoryError:
        raise DatasetError(f"{where}: cannot read image (out of memory while decoding it)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...) on damaged data
        raise DatasetError(f"{where}: cannot read image ({first_line(e)})") from None


@contextlib.contextmanager
def _strict_pil():
    """Force PIL's global tolerances to our values while decoding, whatever another library set."""
    from PIL import Image, ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False   # True would pad a truncated file with grey, silently
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL warns above this, errors above twice this
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _to_array(image, where, depth=8):
    """PIL image -> uint8 [C, H, W] following the mode rules of :func:`open_dataset`.

    depth: the file's bits per sample (PNG: 1, 2, 4, 8 or 16), needed to compare a colour key.
    """
    mode = image.mode
    key = image.info.get("transparency") if mode in _KEYED_MODES else None
    if mode in ("L", "RGB"):
        array = np.asarray(image)
    elif mode == "1":
        array = np.asarray(image.convert("L"))
    elif mode in ("P", "PA"):
        if mode == "PA" or "transparency" in image.info:
            array = _drop_opaque_alpha(np.asarray(image.convert("RGBA")), mode, where)
        else:
            array = np.asarray(image.convert("RGB"))
    elif mode in ("LA", "RGBA"):
        array = _drop_opaque_alpha(np.asarray(image), mode, where)
    elif mode in ("RGBX", "CMYK", "YCbCr"):
        array = np.asarray(image.convert("RGB"))
    elif mode.startswith("I;16") or (mode == "I" and _fits_16_bits(image)):  # older Pillow opens 16-bit PNG as I
        wide = np.asarray(image).astype(np.int64)
        if key is not None:
            _refuse_transparent(wide == key, where, f"mode {mode}, colour key {key}")
            key = None
        array = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(x / 257): 16 -> 8 bits
    else:
        raise _unsupported_mode(mode, where)
    if key is not None:
        _check_colour_key(array, key, depth, mode, where)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.uint8)


def _unsupported_mode(mode, where):
    return DatasetError(f"{where}: unsupported image mode {mode} (expected 8-bit grayscale or RGB)")


def _fits_16_bits(image):
    low, high = image.getextrema()
    return 0 <= low and high <= 65535


def _check_colour_key(array, key, depth, mode, where):
    """Refuse an 8-bit grayscale or RGB image (uint8 [H, W] or [H, W, 3]) in which a pixel has the colour key.

    PNG's tRNS chunk for grayscale and RGB images names one colour (in raw samples of the file's bit
    depth) that is fully transparent. PIL reads 1, 2 and 4-bit grayscale scaled to 0..255 and 16-bit RGB
    by its high bytes, so the key is brought to the same scale; for 16-bit RGB this cannot tell apart
    colours that differ only in their low bytes, and such an image is refused as possibly transparent.
    """
    if mode == "1":  # PIL already gives 0 or 255
        _refuse_transparent(array == key, where, f"mode 1, colour key {key}")
    elif mode == "L":
        top = 2**min(depth, 8) - 1
        if isinstance(key, int) and 0 <= key <= top:  # a key outside the samples' range marks no pixel
            _refuse_transparent(array == key * (255 // top), where, f"mode L, {depth}-bit colour key {key}")
    elif mode == "RGB" and isinstance(key, tuple) and len(key) == 3:
        if depth == 16:
            high = tuple(int(k) >> 8 for k in key)
            _refuse_transparent(np.all(array == np.array(high, np.uint8), axis=-1), where,
                                f"mode RGB, 16-bit colour key {key}, compared by its high bytes {high}", maybe=True)
        elif all(0 <= k <= 255 for k in key):
            _refuse_transparent(np.all(array == np.array(key, np.uint8), axis=-1), where,
                                f"mode RGB, colour key {key}")


def _drop_opaque_alpha(array, mode, where):
    """Drop the alpha channel of uint8 [H, W, C+1] when every pixel is opaque; refuse it otherwise."""
    _refuse_transparent(array[..., -1] != 255, where, f"mode {mode}")
    return array[..., :-1]


def _refuse_transparent(transparent, where, detail, maybe=False):
    """The one rule for transparency: an image in which any pixel is not fully opaque is refused."""
    count = int(np.count_nonzero(transparent))
    if count:
        raise DatasetError(f"{where}: image {'may have' if maybe else 'has'} transparent pixels ({detail}; "
                           f"{count:,} of {transparent.size:,} pixels); flatten it onto a background first")
