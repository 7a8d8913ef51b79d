"""Hostile datasets (issue 10): each mechanism of the dataset reader, through load_dataset (open_dataset's index,
then every image decoded), open_dataset and the command line.

1. transparency of every kind (alpha, transparent palette entries, tRNS colour keys) follows one rule;
2. dataset.json may not name a key twice;
3. the memory a dataset needs is estimated from image headers before anything is decoded or allocated,
   and sizes declared by a ZIP's directory are checked before an entry is read;
4. dataset.json is limited relative to the number of images;
5. only regular files are read (FIFOs, devices, sockets, links to folders, link loops), and names that
   are not UTF-8 work or give one line.
Property tests for all of it are in tests/test_data_properties.py.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from conftest import deadline, pixels, png_bytes, run_cli, write_files, write_zip
from PIL import Image

from mpdiff.data import reading, sources
from mpdiff.data.datasets import load_dataset, open_dataset
from mpdiff.data.image_files import decode_image
from mpdiff.data.reading import max_dataset_bytes
from mpdiff.errors import DatasetError

RUN_ARGS = ["--duration", "256", "--batch", "256", "--channels", "8", "--no-progress"]


@pytest.fixture(autouse=True)
def no_hang():
    """Every test here fails within 60 s instead of hanging (SIGALRM interrupts a blocking open or read)."""
    def timeout(*_):
        raise AssertionError("timed out: something blocked")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def make(tmp_path, container, files):
    """The dataset `files` as a folder tmp_path/d or a ZIP tmp_path/d.zip; returns its path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_files(tmp_path / "d", files) if container == "dir" else write_zip(tmp_path / "d.zip", files)


def where(path, name):
    """How messages name file `name` of dataset `path`."""
    return f"{path}/{name}"


def open_error(path, **kwargs):
    """The DatasetError message from loading `path` whole (load_dataset); asserts it is a single line."""
    with pytest.raises(DatasetError) as info:
        load_dataset(path if isinstance(path, bytes) else os.fspath(path), progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message and message.strip() == message
    return message


def good_images(count=2, size=8, channels=3):
    return {f"img{i}.png": png_bytes(pixels(i, size, channels)) for i in range(count)}


# ---- 1. transparency ---------------------------------------------------------------------------

def raw_png(samples, depth, colour_type, trns=None, palette=None):
    """A PNG written byte by byte: `samples` [H, W] (grayscale, palette) or [H, W, 3] (RGB) of raw sample
    values at `depth` bits, with a tRNS chunk `trns` (bytes) when given. PIL cannot write every such file."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def row_bytes(row):
        row = np.asarray(row).reshape(-1)
        if depth == 16:
            return row.astype(">u2").tobytes()
        if depth == 8:
            return row.astype(np.uint8).tobytes()
        per = 8 // depth
        padded = np.zeros(-(-len(row) // per) * per, np.int64)
        padded[: len(row)] = row
        shifts = 8 - depth * (np.arange(per) + 1)
        return (padded.reshape(-1, per) << shifts).sum(1).astype(np.uint8).tobytes()

    samples = np.asarray(samples)
    height, width = samples.shape[:2]
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", bytes(palette))
    if trns is not None:
        out += chunk(b"tRNS", trns)
    out += chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row_bytes(row) for row in samples)))
    return out + chunk(b"IEND", b"")


def gray_key(value):
    return struct.pack(">H", value)


def rgb_key(r, g, b):
    return struct.pack(">HHH", r, g, b)


def keyed(size=8):
    """8-bit RGB pixels in which exactly pixel (2, 3) is black, and a PNG with black as its colour key."""
    rgb = pixels(3, size, 3) | 1  # no channel is 0, so no pixel is black ...
    rgb[2, 3] = 0                 # ... but this one
    return rgb


def palette_png(transparent_index_used):
    """A palette PNG whose entry 0 is transparent; pixel (0, 0) uses it or not."""
    indices = np.full((8, 8), 1)
    if transparent_index_used:
        indices[0, 0] = 0
    return raw_png(indices, 8, 3, trns=b"\x00\xff", palette=[0, 0, 0, 200, 100, 50])


TRANSPARENT = {  # name: (file bytes, the detail in the message)
    "rgb8 key": (raw_png(keyed(), 8, 2, trns=rgb_key(0, 0, 0)), "mode RGB, colour key (0, 0, 0); 1 of 64 pixels"),
    "rgb8 key, PIL": (png_bytes(keyed(), transparency=(0, 0, 0)), "mode RGB, colour key (0, 0, 0); 1 of 64 pixels"),
    "gray8 key": (png_bytes(np.eye(8, dtype=np.uint8) * 200, transparency=200), "mode L, 8-bit colour key 200; 8 of 64"),
    "gray4 key": (raw_png(np.eye(8, dtype=int) * 9, 4, 0, trns=gray_key(9)), "mode L, 4-bit colour key 9; 8 of 64"),
    "gray2 key": (raw_png(np.eye(8, dtype=int), 2, 0, trns=gray_key(1)), "mode L, 2-bit colour key 1; 8 of 64"),
    "gray1 key": (raw_png(np.eye(8, dtype=int), 1, 0, trns=gray_key(0)), "mode 1, colour key 0; 56 of 64"),
    "gray16 key": (raw_png(np.eye(8, dtype=int) * 1000, 16, 0, trns=gray_key(1000)), "colour key 1000; 8 of 64"),
    "rgb16 key": (raw_png(keyed().astype(int) * 257, 16, 2, trns=rgb_key(0, 0, 0)),
                  "mode RGB, 16-bit colour key (0, 0, 0), compared by its high bytes (0, 0, 0); 1 of 64"),
    "palette": (palette_png(True), "mode P; 1 of 64 pixels"),
    "rgba": (png_bytes(np.dstack([keyed(), np.full((8, 8), 254, np.uint8)])), "mode RGBA; 64 of 64 pixels"),
}


@pytest.mark.parametrize("case", sorted(TRANSPARENT))
@pytest.mark.parametrize("container", ["dir", "zip"])
def test_every_kind_of_transparency_is_refused(tmp_path, case, container):
    data, detail = TRANSPARENT[case]
    path = make(tmp_path, container, {"x.png": data})
    message = open_error(path, use_labels=False)
    assert message.startswith(where(path, "x.png") + ": image ")
    assert "transparent pixels (" in message and detail in message
    assert message.endswith("; flatten it onto a background first")


def test_colour_key_message_is_exact(tmp_path):
    write_files(tmp_path, {"x.png": TRANSPARENT["rgb8 key"][0]})
    assert open_error(tmp_path) == (f"{tmp_path}/x.png: image has transparent pixels (mode RGB, colour key (0, 0, 0); "
                                    f"1 of 64 pixels); flatten it onto a background first")


OPAQUE = {  # name: (file bytes, the uint8 pixels [C, H, W] it must give)
    "rgb8 key unused": (raw_png(keyed() | 2, 8, 2, trns=rgb_key(0, 0, 0)), (keyed() | 2).transpose(2, 0, 1)),
    "gray8 key unused": (png_bytes(np.eye(8, dtype=np.uint8) * 200, transparency=7), np.eye(8)[None] * 200),
    # PIL scales 2-bit samples to 0..255 (1 -> 85) but keeps the key raw: a key of 85 is out of the 2-bit range
    # and marks no pixel, though PIL's own convert("LA") would make the 85-valued pixels transparent
    "gray2 key out of range": (raw_png(np.eye(8, dtype=int), 2, 0, trns=gray_key(85)), np.eye(8)[None] * 85),
    "gray16 key unused": (raw_png(np.eye(8, dtype=int) * 1000, 16, 0, trns=gray_key(1001)),
                          np.round(np.eye(8)[None] * 1000 / 257)),
    "rgb16 key unused": (raw_png(keyed().astype(int) * 257, 16, 2, trns=rgb_key(1 * 257, 2 * 257, 3 * 257)),
                         keyed().transpose(2, 0, 1)),
    "palette entry unused": (palette_png(False), np.array([200, 100, 50])[:, None, None] * np.ones((1, 8, 8))),
    "rgba opaque": (png_bytes(np.dstack([keyed(), np.full((8, 8), 255, np.uint8)])), keyed().transpose(2, 0, 1)),
}


@pytest.mark.parametrize("case", sorted(OPAQUE))
@pytest.mark.parametrize("container", ["dir", "zip"])
def test_transparency_that_marks_no_pixel_is_dropped(tmp_path, case, container):
    data, expected = OPAQUE[case]
    ds = load_dataset(make(tmp_path, container, {"x.png": data}), progress=False)
    assert ds.images.shape == (1, *expected.shape)
    np.testing.assert_array_equal(ds.images[0], expected.astype(np.uint8))


def test_sixteen_bit_rgb_key_matching_only_high_bytes_is_refused_as_possibly_transparent():
    """PIL reads 16-bit RGB by its high bytes, so a key that differs from a pixel only in its low bytes
    cannot be told apart: refused, and the message says it may be transparent."""
    samples = keyed().astype(int) * 257
    data = raw_png(samples, 16, 2, trns=rgb_key(5, 0, 0))  # pixel (2, 3) is (0, 0, 0): high bytes equal the key's
    with pytest.raises(DatasetError, match=r"^x\.png: image may have transparent pixels \(mode RGB, 16-bit colour key "
                                           r"\(5, 0, 0\), compared by its high bytes \(0, 0, 0\); 1 of 64 pixels\)"):
        decode_image(data, "x.png")


# ---- 2. dataset.json naming a key twice --------------------------------------------------------

DUPLICATES = {
    "labels then null": ('{"labels": [["img0.png", 1], ["img1.png", 0]], "labels": null}', "labels"),
    "num_classes twice": ('{"labels": [["img0.png", 1], ["img1.png", 0]], "num_classes": 2, "num_classes": 9}',
                          "num_classes"),
    "nested object": ('{"labels": null, "meta": [{"a": 1, "b": {"k": 1, "k": 2}}]}', "k"),
    "escaped names": ('{"labels": null, "\\u006cabels": null}', "labels"),
    "odd key": ('{"labels": null, "x": {"\\ud800\\n": 1, "\\ud800\\n": 2}}', "\\ud800\\n"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
@pytest.mark.parametrize("container", ["dir", "zip"])
def test_dataset_json_naming_a_key_twice_is_refused(tmp_path, case, container):
    text, key = DUPLICATES[case]
    path = make(tmp_path, container, {**good_images(), "dataset.json": text})
    assert open_error(path) == f'{where(path, "dataset.json")}: key {key!r} appears twice in one object'
    assert len(open_dataset(path, use_labels=False)) == 2  # without labels, dataset.json is not read


# ---- 3. memory, estimated from headers ---------------------------------------------------------

def bomb_png(side=8192):
    """A 1-bit black PNG of side x side pixels: 8 KB of file, 64 MiB of uint8 pixels."""
    import io
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def refuse_decoding(monkeypatch):
    def decode(*args):
        raise AssertionError("an image was decoded")
    monkeypatch.setattr(reading, "decode_image", decode)


def test_memory_is_estimated_from_headers_before_anything_is_decoded(tmp_path, monkeypatch):
    """A 700 KB ZIP of 80 images of 8192x8192 pixels would need 5 GiB: refused from the headers alone."""
    real = os.sysconf
    fake = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**21}  # a machine with 8 GiB
    monkeypatch.setattr(os, "sysconf", lambda name: fake[name] if name in fake else real(name))
    monkeypatch.delenv("MPDIFF_MAX_DATASET_BYTES", raising=False)
    data = bomb_png()
    path = write_zip(tmp_path / "big.zip", {f"{i:05d}.png": data for i in range(80)}, zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < 2**20
    refuse_decoding(monkeypatch)
    assert open_error(path) == (f"{path}: 80 images of 8192x8192 pixels with 1 channel need 5.0 GiB of memory "
                                f"(5,368,709,120 bytes), more than the limit of 4.0 GiB (4,294,967,296 bytes, half of "
                                f"this machine's 8.0 GiB of memory; set MPDIFF_MAX_DATASET_BYTES to change it)")


def test_memory_limit_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("MPDIFF_MAX_DATASET_BYTES", raising=False)
    limit, origin = max_dataset_bytes()
    assert limit == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 and origin.startswith("half of")
    write_files(tmp_path, good_images(3))  # 3 x 3 x 8 x 8 = 576 bytes
    monkeypatch.setenv("MPDIFF_MAX_DATASET_BYTES", "576")
    assert len(load_dataset(tmp_path, progress=False)) == 3
    monkeypatch.setenv("MPDIFF_MAX_DATASET_BYTES", "575")
    refuse_decoding(monkeypatch)
    assert open_error(tmp_path) == (f"{tmp_path}: 3 images of 8x8 pixels with 3 channels need 576 bytes of memory "
                                    f"(576 bytes), more than the limit of 575 bytes (575 bytes, set by "
                                    f"MPDIFF_MAX_DATASET_BYTES)")
    monkeypatch.setenv("MPDIFF_MAX_DATASET_BYTES", "lots")
    assert open_error(tmp_path) == "MPDIFF_MAX_DATASET_BYTES: expected a whole number of bytes, got 'lots'"


def test_shapes_are_checked_from_headers_before_decoding(tmp_path, monkeypatch):
    """A dataset whose last image has another size fails before the first one is decoded."""
    write_files(tmp_path, {**good_images(3, 8), "z.png": bomb_png()})
    refuse_decoding(monkeypatch)
    assert open_error(tmp_path) == (f"{tmp_path}/z.png: image is 8192x8192 pixels but {tmp_path}/img0.png is 8x8; "
                                    f"all images must have the same size; convert it with: mpdiff dataset convert "
                                    f"{tmp_path} {tmp_path}-8 --resolution 8 --transform center-crop")


def forge_zip_sizes(path, name, declared):
    """Rewrite the uncompressed size of entry `name` in the ZIP's central directory (the local header is
    left alone): the archive now claims `declared` bytes for it."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")  # the first central directory header
    while True:
        length = struct.unpack("<H", data[at + 28: at + 30])[0]
        if data[at + 46: at + 46 + length] == name.encode():
            break
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 24: at + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(data))


def test_zip_entry_sizes_are_checked_from_the_directory_before_reading(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "d.zip", {**good_images(2), "huge.png": png_bytes(pixels(5))})
    forge_zip_sizes(path, "huge.png", 4_000_000_000)  # a 4 GB entry, as the directory says
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, *a, **k: opened.append(info) or real_open(self, info, *a, **k))
    assert open_error(path) == (f"{path}/huge.png: file is 4,000,000,000 bytes, above the limit of "
                                f"{sources.MAX_FILE_BYTES:,} bytes")
    assert "huge.png" not in [getattr(info, "filename", info) for info in opened]


def test_file_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 4096)  # instead of writing 512 MiB
    files = {**good_images(2), "big.png": png_bytes(pixels(5, 64))}
    assert len(files["big.png"]) > 4096
    for container in ["dir", "zip"]:
        path = make(tmp_path, container, files)
        assert open_error(path) == (f"{where(path, 'big.png')}: file is {len(files['big.png']):,} bytes, above the "
                                    f"limit of 4,096 bytes")


# ---- 4. dataset.json size ----------------------------------------------------------------------

@pytest.mark.parametrize("container", ["dir", "zip"])
def test_dataset_json_is_limited_by_the_number_of_images(tmp_path, container):
    limit = 2**20 + 2 * 2**10  # two images
    labels = '{"labels": [["img0.png", 1], ["img1.png", 0]]}'
    at_limit = labels + " " * (limit - len(labels))
    path = make(tmp_path, container, {**good_images(2), "dataset.json": at_limit})
    assert open_dataset(path, progress=False).labels.tolist() == [1, 0]
    path = make(tmp_path / "over", container, {**good_images(2), "dataset.json": at_limit + " "})
    assert open_error(path) == (f"{where(path, 'dataset.json')}: file is {limit + 1:,} bytes, above the limit of "
                                f"{limit:,} bytes for the dataset.json of a dataset of 2 images (1 MiB + 1 KiB per image)")


def test_huge_sparse_dataset_json_is_refused_without_reading(tmp_path, monkeypatch):
    write_files(tmp_path, good_images(3))
    with open(tmp_path / "dataset.json", "wb") as f:
        f.truncate(400_000_000)  # 400 MB, sparse: costs nothing to make
    monkeypatch.setattr(reading, "parse_labels_document", lambda *a: pytest.fail("dataset.json was parsed"))
    assert open_error(tmp_path) == (f"{tmp_path}/dataset.json: file is 400,000,000 bytes, above the limit of "
                                    f"1,051,648 bytes for the dataset.json of a dataset of 3 images "
                                    f"(1 MiB + 1 KiB per image)")


# ---- 5. non-regular files, links and names -----------------------------------------------------

def test_fifo_as_dataset_json_does_not_hang(tmp_path):
    write_files(tmp_path, good_images(2))
    os.mkfifo(tmp_path / "dataset.json")
    assert open_error(tmp_path) == f"{tmp_path}/dataset.json: expected a regular file, found a FIFO"
    assert len(open_dataset(tmp_path, use_labels=False, progress=False)) == 2


def test_devices_and_sockets_named_like_images_are_refused(tmp_path):
    write_files(tmp_path, good_images(2))
    os.symlink("/dev/zero", tmp_path / "zero.png")
    assert open_error(tmp_path) == f"{tmp_path}/zero.png: expected a regular file, found a character device"
    os.unlink(tmp_path / "zero.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(tmp_path / "sock.png"))
        message = open_error(tmp_path)
    assert message.startswith(f"{tmp_path}/sock.png: ")  # 'cannot read (No such device or address)' or 'found a socket'


def test_symbolic_links(tmp_path):
    root = write_files(tmp_path / "d", good_images(2))
    write_files(tmp_path / "elsewhere", {"far.png": png_bytes(pixels(9))})
    os.symlink(tmp_path / "elsewhere" / "far.png", root / "link.png")  # a link to an image file: read
    os.symlink("..", root / "up")                                      # links to folders: listed, not followed
    os.symlink("/", root / "everything")
    os.symlink("loop", root / "loop")                                  # a loop with another name: listed
    ds = open_dataset(root, progress=False)
    assert len(ds) == 3 and set(ds.ignored_files) == {"up/", "everything/", "loop"}
    np.testing.assert_array_equal(ds.read(2), pixels(9).transpose(2, 0, 1))  # img0, img1, link
    os.symlink("loop.png", root / "loop.png")                          # a loop named like an image: one line
    assert open_error(root).startswith(f"{root}/loop.png: cannot read (")
    os.unlink(root / "loop.png")
    os.symlink("nowhere.png", root / "dangling.png")
    assert open_error(root) == f"{root}/dangling.png: file not found"


def test_deep_folder_tree(tmp_path):
    """The walk is iterative: a tree deeper than Python's recursion limit is read, not a RecursionError."""
    levels = [os.path.join(os.fspath(tmp_path), *["d"] * depth) for depth in range(1, 1101)]  # 2,200 characters
    bottom = os.path.join(levels[-1], "x.png")
    try:
        for level in levels:  # (os.makedirs and shutil.rmtree recurse too)
            os.mkdir(level)
        for path, seed in [(bottom, 0), (os.path.join(tmp_path, "y.png"), 1)]:
            with open(path, "wb") as f:
                f.write(png_bytes(pixels(seed)))
        ds = open_dataset(tmp_path, progress=False)
        assert len(ds) == 2 and ds.labels is None
    finally:  # pytest's clean-up would hit the recursion limit
        if os.path.exists(bottom):
            os.unlink(bottom)
        for level in reversed(levels):
            if os.path.isdir(level):
                os.rmdir(level)


def bytes_dataset(tmp_path, files):
    """A dataset folder named b'\\xff\\xfeset' with class folders b'\\xfe\\xffcls' and b'other' (not UTF-8)."""
    root = os.fsencode(tmp_path) + b"/\xff\xfeset"
    for name, data in files.items():
        path = root + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return root


def test_names_that_are_not_utf8(tmp_path):
    files = {b"\xfe\xffcls/a.png": png_bytes(pixels(0)), b"\xfe\xffcls/b.png": png_bytes(pixels(1)),
             b"other/c.png": png_bytes(pixels(2)), b"other/\xffnotes.txt": b"x"}
    root = bytes_dataset(tmp_path, files)
    for spec in [root, os.fsdecode(root)]:
        ds = open_dataset(spec, progress=False)
        # sorted by code point: "other" < "\udcfe\udcffcls" (undecodable bytes become U+DC80..U+DCFF)
        assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 1] and ds.label_source == "directories"
        assert ds.name == "\\xff\\xfeset" and ds.name.isprintable()
        assert ds.ignored_files == ("other/\udcffnotes.txt",)
    with open(root + b"/\xfe\xffcls/bad\xff.png", "wb") as f:
        f.write(b"not an image")
    assert open_error(root) == (f"{tmp_path}/\\xff\\xfeset/\\xfe\\xffcls/bad\\xff.png: cannot read image (not a PNG, "
                                f"JPEG, BMP or WebP image, or its header is damaged)")
    # dataset.json can name such files with JSON's surrogate escapes, as Python does
    os.unlink(root + b"/\xfe\xffcls/bad\xff.png")
    labels = {"labels": [["\udcfe\udcffcls/a.png", 3], ["\udcfe\udcffcls/b.png", 1], ["other/c.png", 0]]}
    with open(root + b"/dataset.json", "w") as f:
        f.write(json.dumps(labels))
    assert open_dataset(root, progress=False).labels.tolist() == [0, 3, 1]
    labels["labels"][0][0] = "\ud800/a.png"  # a lone surrogate no file system name has
    with open(root + b"/dataset.json", "w") as f:
        f.write(json.dumps(labels))
    assert "labels[0] names '\\ud800/a.png', which is not an image in the dataset" in open_error(root)


# ---- the command line: one line, exit 1, no run directory ----------------------------------------

def gray32(count):
    return {f"img{i}.png": png_bytes(pixels(i, 32, 1)) for i in range(count)}


CLI_CASES = {  # name: (command, files, the message)
    # what the index shows (dataset.json, the first image's header): train refuses it before any run directory
    "duplicate key": ("train", {**good_images(), "dataset.json": DUPLICATES["labels then null"][0]},
                      "dataset.json: key 'labels' appears twice in one object"),
    "dataset.json size": ("train", {**good_images(1), "dataset.json": " " * (2**20 + 2**10 + 1)},
                          "dataset.json: file is 1,049,601 bytes, above the limit of 1,049,600 bytes"),
    "not utf-8": ("train", None, "\\xff\\xfeset/\\xfe\\xffcls/bad.png: cannot read image ("),
    # what only decoding shows: `mpdiff dataset check` finds it (training would stop when it meets the file)
    "colour key": ("check", {"a.png": TRANSPARENT["rgb8 key"][0]},
                   "a.png: image has transparent pixels (mode RGB, colour key"),
    "fifo": ("check", {**good_images(1)}, "pipe.png: expected a regular file, found a FIFO"),
    # memory: checked where a dataset is decoded whole (eval of 32x32 grayscale samples loads them)
    "memory": ("eval", gray32(3), ": 3 images of 32x32 pixels with 1 channel need 3.0 KiB of memory (3,072 bytes)"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_hostile_datasets_in_one_line(tmp_path, case):
    command, files, expect = CLI_CASES[case]
    if files is None:  # the bad file sorts first ("bad.png" < "c.png"): its header is read at open
        data = os.fsdecode(bytes_dataset(tmp_path, {b"\xfe\xffcls/c.png": png_bytes(pixels(0)),
                                                    b"\xfe\xffcls/bad.png": b"junk"}))
    else:
        data = write_files(tmp_path / "data", files)
    if case == "fifo":
        os.mkfifo(data / "pipe.png")
    if command == "check":
        with deadline(60, "dataset check with a FIFO"):   # a FIFO opened for reading would block
            result = run_cli("dataset", "check", data, "--no-progress")
        assert result.exit_code == 1, result.output
        lines = result.stdout.splitlines()
        count = len(files) + (case == "fifo")
        summary = f"{data}: {count} image{'s' if count > 1 else ''}, 1 bad"
        assert len(lines) == 2 and expect in lines[0] and lines[1] == summary, result.output
        assert result.stderr == ""
        return
    args = ["train", "--data", data, "--run-dir", tmp_path / "run", *RUN_ARGS] if command == "train" else ["eval", data]
    result = run_cli(*args, env={"MPDIFF_MAX_DATASET_BYTES": "3071"} if case == "memory" else None)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_cli_process_with_undecodable_dataset_path(tmp_path):
    """A real process: the path arrives as bytes in argv and the message leaves through stderr's encoder."""
    root = bytes_dataset(tmp_path, {b"\xfe\xffcls/c.png": png_bytes(pixels(0)), b"\xfe\xffcls/bad.png": b"junk"})
    run_dir = os.fsencode(tmp_path) + b"/run"  # the bad file sorts first: its header is read at open
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([sys.executable.encode(), b"-m", b"mpdiff", b"train", b"--data", root, b"--run-dir", run_dir,
                           *[arg.encode() for arg in RUN_ARGS]], capture_output=True, env=env, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode("ascii") == (f"error: {tmp_path}/\\xff\\xfeset/\\xfe\\xffcls/bad.png: cannot read image "
                                           f"(not a PNG, JPEG, BMP or WebP image, or its header is damaged)\n")
    assert not os.path.exists(run_dir)
