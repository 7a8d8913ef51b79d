"""Latent files (SPEC §7.1, §7.3): NumPy ``.npy`` files of float32 [8, R, R], read without trusting them.

:func:`probe_latent` reads the shape from the header alone, and refuses a header that declares more or
less data than the file holds (so a lying header never makes NumPy allocate); :func:`decode_latent` reads
the whole file, refusing pickled objects (never unpickled), another dtype or shape, a size that does not
match the header, non-finite values and negative standard deviations (:func:`latent_value_problem`,
which `mpdiff dataset encode` also applies to what it is about to write). Every problem is one
:class:`~mpdiff.errors.DatasetError` line naming the file.
"""

import contextlib
import math

import numpy as np

from mpdiff.data.shapes import LATENT_DATA_CHANNELS, MIN_RESOLUTION
from mpdiff.data.sources import stream_size
from mpdiff.errors import DatasetError, first_line
from mpdiff.storage.tensors import NPY_MAX_HEADER_BYTES, npy_header


def probe_latent(stream, where):
    """(8, R, R) of a latent .npy file from its header alone; DatasetError (one line naming the file) when
    the header is damaged or does not describe a float32 [8, R, R] array (see :func:`decode_latent`), or
    when the data it declares is not exactly what follows it in the file (the file's size, or a ZIP
    entry's declared size: nothing is read or allocated to find out)."""
    size = stream_size(stream)
    if size == 0:
        raise DatasetError(f"{where}: cannot read latent (empty file)")
    with _latent_errors(where):
        shape, dtype = npy_header(stream)
        header_bytes = stream.tell()
    _check_latent_header(shape, dtype, where)
    _check_data_size(shape, size - header_bytes, where)
    return tuple(int(n) for n in shape)


def _check_data_size(shape, present, where):
    """The header's shape (float32) must account for exactly the `present` bytes after it: a header that
    claims more (e.g. [8, 4096, 4096] in a file of 200 bytes) is refused before NumPy allocates for it."""
    declared = 4 * math.prod(int(n) for n in shape)
    if present < declared:
        raise DatasetError(f"{where}: cannot read latent, not a valid .npy file (EOF: its header declares "
                           f"{list(shape)} float32, {declared:,} bytes of data, and {max(present, 0):,} follow; "
                           f"the file is truncated or damaged)")
    if present > declared:
        raise DatasetError(f"{where}: cannot read latent ({present - declared:,} bytes after the array; the file "
                           f"is damaged)")


def decode_latent(data, where):
    """One latent .npy file's bytes -> float32 [8, R, R] (native byte order), refusing anything doubtful:
    not NumPy's .npy format, a damaged or truncated file, trailing bytes, pickled objects (never
    unpickled: allow_pickle=False), another dtype than float32, another shape than [8, R, R] with R a
    power of two >= MIN_RESOLUTION, non-finite values, or a negative standard deviation."""
    import io

    if len(data) == 0:
        raise DatasetError(f"{where}: cannot read latent (empty file)")
    stream = io.BytesIO(data)
    with _latent_errors(where):
        shape, dtype = npy_header(stream)
    _check_latent_header(shape, dtype, where)  # before reading any data: no object array is ever built
    _check_data_size(shape, len(data) - stream.tell(), where)  # nor one larger than the file
    stream.seek(0)
    with _latent_errors(where):
        array = np.lib.format.read_array(stream, allow_pickle=False, max_header_size=NPY_MAX_HEADER_BYTES)
    array = np.ascontiguousarray(array, dtype=np.float32)  # native byte order
    problem = latent_value_problem(array)
    if problem:
        raise DatasetError(f"{where}: latent has {problem}")
    return array


def latent_value_problem(array):
    """What is wrong with the values of a latent, float32 [8, h, w] or a batch [N, 8, h, w], or None: the
    one rule for latents read (:func:`decode_latent`) and about to be written (`mpdiff dataset encode`):
    all finite, and the standard deviations (channels 4-7) not negative."""
    array = np.asarray(array)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        return f"{bad:,} non-finite values (NaN or infinity) of {array.size:,}"
    half = LATENT_DATA_CHANNELS // 2
    negative = int(np.count_nonzero(array[..., half:, :, :] < 0))
    if negative:
        return (f"{negative:,} negative standard deviations (channels {half}-{LATENT_DATA_CHANNELS - 1} hold the "
                f"VAE's standard deviations)")
    return None


def _check_latent_header(shape, dtype, where):
    if dtype.hasobject:
        raise DatasetError(f"{where}: latent holds Python objects (a pickled array); refused, expected float32 "
                           f"[{LATENT_DATA_CHANNELS}, R, R]")
    if dtype.kind != "f" or dtype.itemsize != 4 or dtype.fields is not None or dtype.subdtype is not None:
        raise DatasetError(f"{where}: latent is {dtype.str.lstrip('<>|=')} ({dtype.name}), expected float32 "
                           f"[{LATENT_DATA_CHANNELS}, R, R] (the VAE's 4 means and 4 standard deviations)")
    if len(shape) != 3 or shape[0] != LATENT_DATA_CHANNELS:
        raise DatasetError(f"{where}: latent has shape {list(shape)}, expected [{LATENT_DATA_CHANNELS}, R, R] "
                           f"(the VAE's 4 means and 4 standard deviations)")
    _, height, width = shape
    if height != width or width < MIN_RESOLUTION or width & (width - 1):
        raise DatasetError(f"{where}: latent has shape {list(shape)}; its two sides must be equal, a power of two "
                           f"of at least {MIN_RESOLUTION}")


@contextlib.contextmanager
def _latent_errors(where):
    """Any exception of NumPy's .npy reader as one DatasetError line naming the file."""
    try:
        yield
    except DatasetError:
        raise
    except MemoryError:
        raise DatasetError(f"{where}: cannot read latent (out of memory while reading it)") from None
    except Exception as e:  # ValueError (not .npy, bad header, pickled data, truncated), EOFError, OSError, ...
        raise DatasetError(f"{where}: cannot read latent, not a valid .npy file ({first_line(e)})") from None
