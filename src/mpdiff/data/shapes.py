"""The shape every file of a dataset must have, and what to do about one that differs (SPEC §7.3).

Images: one channel count (1 or 3) and one square size whose side is a power of two of at least
:data:`MIN_RESOLUTION` (the U-Net halves the resolution once per level). Latents: float32
[:data:`LATENT_DATA_CHANNELS`, R, R] with R the same rule. The messages for images of another size end
with the `mpdiff dataset convert` command that would fix them (:func:`convert_hint`).
"""

import os
import shlex

from mpdiff.data.sources import show_name
from mpdiff.errors import DatasetError

MIN_RESOLUTION = 4                     # the U-Net halves the resolution once per level
LATENT_DATA_CHANNELS = 8               # the VAE encoder's 4 means, then its 4 standard deviations


def check_first_shape(shape, where, path):
    _, height, width = shape
    if height != width:
        raise DatasetError(f"{where}: image is {width}x{height} pixels; images must be square, with a "
                           f"power-of-two side of at least {MIN_RESOLUTION}{convert_hint(path, [shape])}")
    if width < MIN_RESOLUTION or width & (width - 1):
        raise DatasetError(f"{where}: image is {width}x{height} pixels; the side must be a power of two of at "
                           f"least {MIN_RESOLUTION} (the U-Net halves the resolution at each level)"
                           f"{convert_hint(path, [shape])}")


def raise_shape_mismatch(shape, where, first_where, first_shape, path):
    if first_shape[0] == LATENT_DATA_CHANNELS or shape[0] == LATENT_DATA_CHANNELS:  # latents: no convert advice
        raise DatasetError(f"{where}: latent is {_dims(shape)} but {first_where} is {_dims(first_shape)}; all "
                           f"latents must have the same shape")
    if shape[1:] != first_shape[1:]:
        raise DatasetError(f"{where}: image is {shape[2]}x{shape[1]} pixels but {first_where} is "
                           f"{first_shape[2]}x{first_shape[1]}; all images must have the same size"
                           f"{convert_hint(path, [first_shape, shape])}")
    kind = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
    raise DatasetError(f"{where}: image is {kind[shape[0]]} but {first_where} is {kind[first_shape[0]]}; "
                       f"all images must have the same channel count{convert_hint(path, [first_shape, shape])}")


def suggested_conversion(shapes):
    """(resolution, ' --resolution R --transform T' or '') that suit images of `shapes` ((C, H, W) each).

    Grayscale images a little below a power of two (MNIST's 28x28) are padded to it: a thin black border
    around dark-background digits. Otherwise the short side goes to the nearest power of two below it
    (48x48 photos: 32, where padding to 64 would add black borders and cost 4x the training), or just
    above it when that is at most a quarter larger (60x60: 64): resized when all images are one square
    size, else centre-cropped. Sizes that are fine already (only the channels differ): no options."""
    sides = [side for _, height, width in shapes for side in (height, width)]
    sizes = {shape[1:] for shape in shapes}
    if len(sizes) == 1 and sides[0] == sides[1] and sides[0] >= MIN_RESOLUTION \
            and not sides[0] & (sides[0] - 1):
        return sides[0], ""
    big, small = max(sides), min(sides)
    above = 1 << (big - 1).bit_length()
    if all(channels == 1 for channels, _, _ in shapes) and (above - big) * 4 <= big:
        resolution, transform = max(MIN_RESOLUTION, above), "pad"
    else:
        below, above = 1 << (small.bit_length() - 1), 1 << (small - 1).bit_length()
        resolution = max(MIN_RESOLUTION, above if (above - small) * 4 <= small else below)
        transform = "resize" if len(sizes) == 1 and sides[0] == sides[1] else "center-crop"
    return resolution, f" --resolution {resolution} --transform {transform}"


def convert_hint(path, shapes):
    """'; convert it with: mpdiff dataset convert SRC DEST ...' for the dataset at `path`, whose images
    include those of `shapes` ((C, H, W) each): the options of :func:`suggested_conversion`, and DEST
    named after SRC."""
    resolution, options = suggested_conversion(shapes)
    source = os.path.normpath(path)
    stem, ext = (source[:-4], source[-4:]) if source.lower().endswith(".zip") else (source, "")
    dest = f"{stem}-{resolution}{ext}"
    return f"; convert it with: mpdiff dataset convert {shlex.quote(show_name(source, None))} " \
           f"{shlex.quote(show_name(dest, None))}{options}"


def _dims(shape):
    return "x".join(str(n) for n in shape)
