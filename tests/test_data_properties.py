"""Property tests: hostile dataset.json and image bytes give a dataset or a DatasetError, nothing else."""

import io
import json
import os
import struct
import tempfile
import zipfile
import zlib

import numpy as np
import pytest
from conftest import pixels, png_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mpdiff.data.datasets import check_dataset, load_dataset, open_dataset
from mpdiff.data.image_files import decode_image
from mpdiff.errors import DatasetError
from mpdiff.storage.dataset_json import write_dataset_json

# Deterministic (derandomize) and small: the file runs in a few seconds. No deadline: a slow
# example is not a failure; a hang would show as the test never finishing.
SETTINGS = dict(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

NAMES = ["a.png", "b.png", "sub/c.png"]


def png(seed, size=4):
    return png_bytes(pixels(seed, size, 3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    for i, name in enumerate(NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(i))
    return root


def open_or_error(path):
    """The dataset at `path` loaded whole (every image decoded), or None after a one-line DatasetError."""
    try:
        ds = load_dataset(os.fspath(path), progress=False)
    except DatasetError as e:
        assert "\n" not in str(e)
        event("DatasetError")
        return None
    event("opened")
    return ds


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | st.text(max_size=12) | st.sampled_from(NAMES),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.just("labels"), inner, max_size=4),
    max_leaves=20)
classes = st.integers(-2, 12) | st.floats(-1, 5) | st.booleans() | st.none() | st.text(max_size=3)
entries = st.lists(st.tuples(st.sampled_from(NAMES + ["gone.png", "A.png"]), classes).map(list), max_size=5)
valid_entries = st.permutations(NAMES).flatmap(
    lambda names: st.lists(st.integers(0, 12), min_size=len(names), max_size=len(names)).map(
        lambda cls: [[name, c] for name, c in zip(names, cls)]))
near_valid_docs = st.fixed_dictionaries({"labels": st.none() | entries | valid_entries | valid_entries.map(lambda e: e[:-1])},
                                        optional={"num_classes": st.none() | st.integers(-1, 15) | st.floats(0, 12)})


def check_consistent(ds, doc):
    """A dataset that opened must carry exactly the labels the file states."""
    assert isinstance(doc, dict)
    if doc["labels"] is None:
        assert ds.labels is None and ds.num_classes == 0
        return
    stated = {path: cls for path, cls in doc["labels"]}
    assert sorted(stated) == sorted(NAMES) and len(doc["labels"]) == len(NAMES)
    assert ds.labels.tolist() == [stated[name] for name in sorted(NAMES)]
    declared = doc.get("num_classes")
    assert ds.num_classes == (max(stated.values()) + 1 if declared is None else declared)
    assert ds.labels.max() < ds.num_classes


@settings(**SETTINGS)
@given(doc=json_values | near_valid_docs)
def test_any_json_labels_open_consistently_or_fail_cleanly(base_dir, doc):
    (base_dir / "dataset.json").write_text(json.dumps(doc))
    ds = open_or_error(base_dir)
    if ds is not None:
        check_consistent(ds, doc)


@settings(**SETTINGS)
@given(data=st.binary(max_size=200) | st.sampled_from([b'{"labels": null}', b'\xef\xbb\xbf{"labels": null}',
                                                       b"[" * 100000, b'{"labels": [["a.png", 1' + b"0" * 5000 + b"]]}"]))
def test_any_bytes_as_labels_file_open_or_fail_cleanly(base_dir, data):
    (base_dir / "dataset.json").write_bytes(data)
    ds = open_or_error(base_dir)
    if ds is not None:
        check_consistent(ds, json.loads(data))


VALID_IMAGES = [png(7, 8), png(8, 4)]
for fmt in ["JPEG", "BMP", "WEBP"]:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, fmt)
    VALID_IMAGES.append(buffer.getvalue())


@st.composite
def damaged_images(draw):
    """A valid image with some bytes replaced and maybe cut short, or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


@settings(**SETTINGS)
@given(data=damaged_images())
def test_any_bytes_as_image_give_valid_dataset_or_error(data):
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "x.png"), "wb") as f:
            f.write(data)
        ds = open_or_error(root)
        try:  # the streamed reader agrees: the index refuses it, or the full check finds it, or all is well
            problems = check_dataset(root, progress=False)
        except DatasetError as e:
            problems = [str(e)]
    assert (ds is None) == (len(problems) == 1) and len(problems) <= 1
    assert all("\n" not in line and line.startswith(os.path.join(root, "x.png") + ": ") for line in problems)
    if ds is not None:
        assert len(ds) == 1 and ds.images.dtype == np.uint8 and ds.channels in (1, 3)
        assert ds.resolution >= 4 and ds.resolution & (ds.resolution - 1) == 0


def zip_bytes(compression):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr("a.png", png(1))
        archive.writestr("dataset.json", '{"labels": [["a.png", 3]]}')
    return buffer.getvalue()


ZIPS = [zip_bytes(zipfile.ZIP_STORED), zip_bytes(zipfile.ZIP_DEFLATED)]


@settings(**SETTINGS)
@given(data=st.data())
def test_damaged_zip_gives_dataset_or_error(data):
    archive = bytearray(data.draw(st.sampled_from(ZIPS)))
    for _ in range(data.draw(st.integers(1, 4))):
        archive[data.draw(st.integers(0, len(archive) - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "d.zip")
        with open(path, "wb") as f:
            cut = data.draw(st.integers(0, len(archive))) if data.draw(st.booleans()) else len(archive)
            f.write(bytes(archive[:cut]))
        ds = open_or_error(path)
    if ds is not None:
        assert len(ds) == 1 and ds.images.dtype == np.uint8


@settings(**SETTINGS)
@given(assignment=st.lists(st.integers(0, 40), min_size=1, max_size=6), extra=st.integers(0, 3),
       paths=st.permutations(["x/1.png", "x/2.png", "y/3.png", "4.png", "z/w/5.png", "6.png"]))
def test_write_dataset_json_round_trip(assignment, extra, paths):
    chosen = paths[: len(assignment)]
    with tempfile.TemporaryDirectory() as root:
        for i, name in enumerate(chosen):
            os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(root, name), "wb") as f:
                f.write(png(i))
        num_classes = max(assignment) + 1 + extra
        write_dataset_json(root, list(zip(chosen, assignment)), num_classes=num_classes)
        ds = open_or_error(root)
    assert ds is not None
    expected = dict(zip(chosen, assignment))
    assert ds.labels.tolist() == [expected[name] for name in sorted(chosen)] and ds.num_classes == num_classes


# ---- issue 10: duplicate keys, colour keys, image headers ----------------------------------------

# JSON text built token by token, so that objects can name a key twice and strings can hold escapes
# (a key spelled "\u006cabels" is "labels"; "\ud800" is a lone surrogate no file name has).
KEYS = ["labels", "num_classes", "\\u006cabels", "a", "\\ud800", "\\udcff", "x\\ny"]
LEAVES = ["null", "true", "0", "1", "-1", "2.5", "1e400", '"a.png"', '"b.png"', '"sub/c.png"', '"\\ud800"',
          '"\\udcffx.png"', '["a.png", 1]']


def json_object(children):
    return st.lists(st.tuples(st.sampled_from(KEYS), children), max_size=4).map(
        lambda pairs: "{" + ", ".join(f'"{key}": {value}' for key, value in pairs) + "}")


json_texts = st.recursive(st.sampled_from(LEAVES),
                          lambda inner: json_object(inner) | st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
                          max_leaves=25)
labelled_texts = st.tuples(valid_entries.map(json.dumps) | st.just("null"),
                           st.lists(st.tuples(st.sampled_from(KEYS), json_texts), max_size=3)).map(
    lambda parts: "{" + ", ".join([f'"labels": {parts[0]}'] + [f'"{k}": {v}' for k, v in parts[1]]) + "}")


def duplicated_key(text):
    """The first key some object of (valid JSON) `text` names twice, or None."""
    found = []

    def hook(pairs):
        keys = [key for key, _ in pairs]
        found.extend(key for i, key in enumerate(keys) if key in keys[:i])
        return dict(pairs)
    json.loads(text, object_pairs_hook=hook)
    return found[0] if found else None


@settings(**SETTINGS)
@given(text=json_texts | labelled_texts)
def test_json_naming_keys_twice_is_always_refused(base_dir, text):
    (base_dir / "dataset.json").write_text(text)  # surrogate escapes stay escapes: the file is ASCII
    duplicate = duplicated_key(text)
    event(f"duplicate key: {duplicate is not None}")
    try:
        ds = open_dataset(os.fspath(base_dir), progress=False)
    except DatasetError as e:
        message = str(e)
        assert "\n" not in message and message.isprintable()
        assert (duplicate is not None) == ("appears twice in one object" in message), message
        return
    assert duplicate is None
    check_consistent(ds, json.loads(text))


COLOUR_KEY_KINDS = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16)]  # (PNG colour type, bit depth)


@settings(**SETTINGS)
@given(data=st.data())
def test_colour_keys_never_let_a_transparent_pixel_through(data):
    """A PNG with a tRNS colour key is refused exactly when some pixel has the key's colour (16-bit RGB, which
    PIL reads at 8 bits, also when a pixel matches the key's high bytes), and otherwise gives its pixels."""
    from test_data_hostile import raw_png

    colour_type, depth = data.draw(st.sampled_from(COLOUR_KEY_KINDS))
    top, channels = 2**depth - 1, 3 if colour_type == 2 else 1
    colour = st.tuples(*[st.integers(0, top)] * channels)
    colours = data.draw(st.lists(colour, min_size=1, max_size=4))
    samples = np.array(data.draw(st.lists(st.sampled_from(colours), min_size=16, max_size=16))).reshape(4, 4, channels)
    beyond = top if depth == 1 else min(65535, 2 * top + 1)  # keys outside the samples' range mark no pixel
    key = data.draw(st.sampled_from(colours) | st.tuples(*[st.integers(0, beyond)] * channels))
    png = raw_png(samples if channels == 3 else samples[..., 0], depth, colour_type,
                  trns=struct.pack(">" + "H" * channels, *key))
    transparent = np.all(samples == np.array(key), axis=-1)
    try:
        array = decode_image(png, "x.png")
    except DatasetError as e:
        message = str(e)
        event("refused")
        assert message.startswith("x.png: image ") and "transparent pixels" in message and "\n" not in message
        if not transparent.any():  # only where the file's colours cannot be told apart at 8 bits
            assert (colour_type, depth) == (2, 16) and "may have transparent pixels" in message
            assert np.all(samples >> 8 == np.array(key) >> 8, axis=-1).any()
        return
    event("opened")
    assert not transparent.any()
    if colour_type == 2 and depth == 16:
        expected = samples >> 8  # PIL keeps the high byte
    elif depth == 16:
        expected = (samples * 255 + 32767) // 65535
    else:
        expected = samples * (255 // top)
    np.testing.assert_array_equal(array, expected.transpose(2, 0, 1))


@st.composite
def png_headers(draw):
    """A PNG signature and IHDR with any size, depth and colour type (valid or not), then anything."""
    from test_data_hostile import raw_png

    width = draw(st.integers(0, 2**31 - 1) | st.integers(1, 64) | st.just(4))
    height = draw(st.just(width) | st.integers(0, 2**31 - 1) | st.integers(1, 64))
    depth, colour_type = draw(st.sampled_from([1, 2, 4, 8, 16, 3])), draw(st.sampled_from([0, 2, 3, 4, 6, 7]))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    tail = draw(st.binary(max_size=100) | st.just(raw_png(np.zeros((4, 4), int), 8, 0)[33:]))
    return head + tail


@settings(**SETTINGS)
@given(data=png_headers())
def test_any_image_header_fails_cleanly_before_any_allocation(data):
    """Whatever size a header declares, the answer is a small dataset or one line, quickly; with a memory
    limit of 1 MiB nothing larger is ever allocated for the dataset."""
    saved = os.environ.get("MPDIFF_MAX_DATASET_BYTES")
    os.environ["MPDIFF_MAX_DATASET_BYTES"] = str(2**20)
    try:
        with tempfile.TemporaryDirectory() as root:
            with open(os.path.join(root, "x.png"), "wb") as f:
                f.write(data)
            ds = open_or_error(root)
    finally:
        if saved is None:
            del os.environ["MPDIFF_MAX_DATASET_BYTES"]
        else:
            os.environ["MPDIFF_MAX_DATASET_BYTES"] = saved
    if ds is not None:
        assert ds.images.shape == (1, 1, 4, 4)
