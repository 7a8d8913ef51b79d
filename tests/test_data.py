"""Datasets from folders and ZIP archives (SPEC §7.3-7.4): reading, labels, and refusing bad input."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from conftest import pixels, png_bytes, write_files, write_zip
from PIL import Image, ImageFile

from mpdiff.data.datasets import ImageDataset, load_dataset, open_dataset
from mpdiff.data.digits import load_builtin_digits
from mpdiff.data.image_files import MAX_IMAGE_PIXELS, decode_image
from mpdiff.errors import DatasetError
from mpdiff.storage.dataset_json import write_dataset_json

# ---- helpers ---------------------------------------------------------------------------------

def image_files(count=3, size=8, channels=3, prefix=""):
    return {f"{prefix}img{i:02d}.png": png_bytes(pixels(i, size, channels)) for i in range(count)}


def open_error(path, **kwargs):
    """The DatasetError message from loading `path` whole (load_dataset: the index of open_dataset, then
    every image decoded); asserts it is a single line."""
    with pytest.raises(DatasetError) as info:
        load_dataset(os.fspath(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---- reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_folder_without_labels_reads_exact_pixels(tmp_path, channels):
    files = image_files(3, 8, channels)
    write_files(tmp_path / "set", files)
    ds = load_dataset(tmp_path / "set")
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes, ds.labels) == (3, channels, 8, 0, None)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (3, channels, 8, 8)
    for i in range(3):
        expected = pixels(i, 8, channels)
        expected = expected[None] if channels == 1 else expected.transpose(2, 0, 1)
        np.testing.assert_array_equal(ds.images[i], expected)
    assert ds.name == "set"


def test_nested_folders_sorted_by_posix_path(tmp_path):
    names = ["b/z.png", "a/c/x.PNG", "a/b.jpg", "A.bmp", "a/c/y.webp"]
    files = {}
    for i, name in enumerate(names):
        fmt = {"png": "PNG", "jpg": "JPEG", "bmp": "BMP", "webp": "WEBP"}[name.rsplit(".", 1)[1].lower()]
        lossless = dict(lossless=True) if fmt == "WEBP" else {}
        files[name] = png_bytes(np.full((4, 4, 3), 10 * i, np.uint8), fmt=fmt, **lossless)
    write_files(tmp_path, files)
    ds = open_dataset(tmp_path, use_labels=False)
    order = sorted(names)  # "A.bmp" < "a/b.jpg" < "a/c/x.PNG" < "a/c/y.webp" < "b/z.png"
    # flat colours survive JPEG; each image identifies itself by its value 10 * original index
    got = [int(round(ds.read(k).mean())) for k in range(len(ds))]  # each image decoded when read
    assert got == [10 * names.index(name) for name in order]


def test_ignored_files_are_listed_not_read(tmp_path):
    files = image_files(2)
    files.update({"notes.txt": "x", ".DS_Store": "junk", "._img00.png": "AppleDouble junk",
                  "__MACOSX/img00.png": "junk", ".hidden/img.png": "junk", "data.gif": "GIF89a"})
    write_files(tmp_path, files)
    ds = open_dataset(tmp_path)
    assert len(ds) == 2
    assert set(ds.ignored_files) == {"notes.txt", ".DS_Store", "._img00.png", "__MACOSX/img00.png",
                                     ".hidden/img.png", "data.gif"}


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_matches_folder(tmp_path, compression):
    files = image_files(4, 16, 3, prefix="00000/")
    write_files(tmp_path / "dir", files)
    write_zip(tmp_path / "data.zip", files, compression)
    from_dir, from_zip = load_dataset(tmp_path / "dir"), load_dataset(tmp_path / "data.zip")
    np.testing.assert_array_equal(from_dir.images, from_zip.images)
    assert from_zip.name == "data" and from_zip.resolution == 16


@pytest.mark.parametrize("where", ["dir", "zip"])
def test_labels_from_dataset_json(tmp_path, where):
    files = image_files(3, prefix="00000/")
    labels = {"00000/img00.png": 4, "00000/img01.png": 0, "00000/img02.png": 2}
    files["dataset.json"] = json.dumps({"labels": [[k, v] for k, v in reversed(labels.items())]})
    path = write_files(tmp_path / "d", files) if where == "dir" else write_zip(tmp_path / "d.zip", files)
    ds = open_dataset(path)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [4, 0, 2]
    assert ds.num_classes == 5
    assert ds.labels.tolist() == [4, 0, 2]
    unlabelled = open_dataset(path, use_labels=False)
    assert unlabelled.labels is None and unlabelled.num_classes == 0


def test_null_labels_and_num_classes_field(tmp_path):
    write_files(tmp_path, image_files(2))
    (tmp_path / "dataset.json").write_text('{"labels": null}')
    assert open_dataset(tmp_path).num_classes == 0
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": [["img00.png", 1], ["img01.png", 0]], "num_classes": 10}))
    ds = open_dataset(tmp_path)
    assert ds.num_classes == 10 and ds.labels.tolist() == [1, 0]


def test_use_labels_false_ignores_even_broken_dataset_json(tmp_path):
    write_files(tmp_path, {**image_files(2), "dataset.json": "{broken"})
    assert open_dataset(tmp_path, use_labels=False).labels is None
    assert "dataset.json" in open_error(tmp_path)


def test_labels_from_top_level_directories(tmp_path):
    files = {**image_files(2, prefix="cat/"), **image_files(1, prefix="ant/sub/"), **image_files(1, prefix="dog/")}
    write_files(tmp_path, files)
    ds = open_dataset(tmp_path)
    # sorted paths: ant/sub/img00, cat/img00, cat/img01, dog/img00; classes ant=0, cat=1, dog=2
    assert ds.labels.tolist() == [0, 1, 1, 2] and ds.num_classes == 3
    assert open_dataset(tmp_path, use_labels=False).labels is None


def test_no_directory_labels_when_one_folder_or_loose_images(tmp_path):
    write_files(tmp_path / "one", image_files(2, prefix="only/"))
    assert open_dataset(tmp_path / "one").labels is None
    write_files(tmp_path / "loose", {**image_files(2, prefix="a/"), **image_files(1, prefix="b/"), "top.png": png_bytes(pixels(9))})
    assert open_dataset(tmp_path / "loose").labels is None


def test_write_dataset_json_round_trip(tmp_path):
    files = image_files(3, prefix="00000/")
    write_files(tmp_path, files)
    entries = [(name, cls) for name, cls in zip(sorted(files), [2, 0, 2])]
    path = write_dataset_json(tmp_path, entries, num_classes=4)
    assert path == os.path.join(tmp_path, "dataset.json")
    assert json.loads((tmp_path / "dataset.json").read_text())["labels"] == [[n, c] for n, c in entries]
    ds = open_dataset(tmp_path)
    assert ds.labels.tolist() == [2, 0, 2] and ds.num_classes == 4
    write_dataset_json(tmp_path, [(name, None) for name in files])
    assert json.loads((tmp_path / "dataset.json").read_text()) == {"labels": None}
    assert open_dataset(tmp_path).labels is None


def test_write_dataset_json_rejects_caller_errors(tmp_path):
    with pytest.raises(ValueError):
        write_dataset_json(tmp_path, [("a.png", 1), ("b.png", None)])
    with pytest.raises(ValueError):
        write_dataset_json(tmp_path, [("a.png", 1), ("a.png", 2)])
    with pytest.raises(ValueError):
        write_dataset_json(tmp_path, [("a\\b.png", 1)])
    with pytest.raises(ValueError):
        write_dataset_json(tmp_path, [("a.png", -1)])
    assert not (tmp_path / "dataset.json").exists()


def test_progress_bar_can_be_forced_and_disabled(tmp_path, capsys):
    write_files(tmp_path, image_files(2))
    load_dataset(tmp_path, progress=True)
    assert "2/2" in capsys.readouterr().err
    load_dataset(tmp_path, progress=False)
    assert capsys.readouterr().err == ""
    open_dataset(tmp_path, progress=True).load(progress=False)  # open reads no image: no bar; load's own flag wins
    assert capsys.readouterr().err == ""


# ---- image modes -----------------------------------------------------------------------------

def test_palette_becomes_rgb_and_1bit_becomes_gray():
    rgb = Image.fromarray(pixels(0, 8, 3)).quantize(16)
    buffer = io.BytesIO()
    rgb.save(buffer, "PNG")
    array = decode_image(buffer.getvalue(), "p.png")
    np.testing.assert_array_equal(array, np.asarray(rgb.convert("RGB")).transpose(2, 0, 1))
    buffer = io.BytesIO()
    Image.new("1", (4, 4), 1).save(buffer, "PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "b.png"), np.full((1, 4, 4), 255))


def test_opaque_alpha_is_dropped_transparent_is_refused():
    rgba = np.concatenate([pixels(0, 8, 3), np.full((8, 8, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(png_bytes(rgba), "a.png"), rgba[..., :3].transpose(2, 0, 1))
    rgba[2, 3, 3] = 7
    with pytest.raises(DatasetError, match=r"^a\.png: image has transparent pixels \(mode RGBA; 1 of 64 pixels\); flatten it "):
        decode_image(png_bytes(rgba), "a.png")
    la = np.stack([pixels(1, 8, 1), np.full((8, 8), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(png_bytes(la, "LA"), "la.png"), la[None, ..., 0])


def test_16bit_gray_is_rounded_to_8bit():
    wide = np.array([[0, 257, 65535, 128 * 257 + 128]], dtype=np.uint16).repeat(4, 0)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), "w.png")[0, 0].tolist() == [0, 1, 255, 128]


# ---- built-in digits -------------------------------------------------------------------------

def test_builtin_digits_split():
    from sklearn.datasets import load_digits

    parts = load_builtin_digits()
    train, test = parts["train_images"], parts["test_images"]
    assert train.shape == (1437, 1, 8, 8) and test.shape == (360, 1, 8, 8)
    assert train.dtype == test.dtype == np.uint8 and train.min() == 0 and train.max() == 255
    # disjoint, and together exactly the 1797 (all distinct) digits
    rows = lambda images: {image.tobytes() for image in images}
    assert not rows(train) & rows(test) and len(rows(train) | rows(test)) == 1797
    assert len(rows(np.round(load_digits().images * 255 / 16).astype(np.uint8))) == 1797
    assert set(parts["train_labels"].tolist()) == set(range(10)) == set(parts["test_labels"].tolist())
    ds = open_dataset("digits")
    assert (len(ds), ds.num_classes, ds.channels, ds.resolution, ds.name) == (1437, 10, 1, 8, "digits-train")
    np.testing.assert_array_equal(ds.labels, parts["train_labels"])
    assert open_dataset("digits", use_labels=False).labels is None


def test_image_dataset_checks_shapes():
    with pytest.raises(ValueError):
        ImageDataset(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError):
        ImageDataset(np.zeros((2, 1, 4, 4), np.uint8), labels=[1, 2, 3])


# ---- refusing bad input: each names the offending file in one line -------------------------

def valid_png():
    return png_bytes(pixels(0, 16, 3))


BAD_IMAGES = {
    "truncated.png": valid_png()[: len(valid_png()) // 2],
    "no_iend.png": valid_png()[:-12],
    "bad_crc.png": valid_png()[:40] + bytes([valid_png()[40] ^ 0xFF]) + valid_png()[41:],
    "zero.png": b"",
    "text.png": "hello, I am not an image\n",
    "truncated.jpg": png_bytes(pixels(0, 16, 3), fmt="JPEG")[:300],
}


@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
@pytest.mark.parametrize("container", ["dir", "zip"])
def test_unreadable_image_fails_when_loaded(tmp_path, bad, container):
    files = {**image_files(2, 16), "sub/" + bad: BAD_IMAGES[bad]}
    path = write_files(tmp_path / "d", files) if container == "dir" else write_zip(tmp_path / "d.zip", files)
    message = open_error(path)
    assert f"sub/{bad}: cannot read image (" in message


def test_truncated_image_refused_even_if_pil_tolerance_is_on(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    write_files(tmp_path, {"cut.png": BAD_IMAGES["truncated.png"]})
    assert "cut.png: cannot read image" in open_error(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored: we do not change others' settings


def test_decompression_bomb_is_refused(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) * 2  # 16384^2 1-bit image: tiny file, 256 Mpixels
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")
    write_files(tmp_path, {"bomb.png": buffer.getvalue()})
    message = open_error(tmp_path)
    assert "bomb.png: cannot read image (" in message and "decompression bomb" in message


def test_other_formats_are_not_decoded_even_with_image_extension(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PPM")  # PIL could read it, but only PNG/JPEG/BMP/WebP decoders run
    write_files(tmp_path, {"x.png": buffer.getvalue()})
    assert "x.png: cannot read image (not a PNG, JPEG, BMP or WebP image" in open_error(tmp_path)


def test_mode_rules_for_wide_and_float_images():
    from mpdiff.data.image_files import _to_array

    wide = Image.fromarray(np.array([[0, 65535], [257, 300]], dtype=np.int32), "I")  # 16-bit PNG in old Pillow
    assert _to_array(wide, "i.png")[0].tolist() == [[0, 255], [1, 1]]
    with pytest.raises(DatasetError, match=r"^i\.png: unsupported image mode I "):
        _to_array(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), "I"), "i.png")
    with pytest.raises(DatasetError, match=r"^f\.png: unsupported image mode F \(expected 8-bit grayscale or RGB\)$"):
        _to_array(Image.new("F", (8, 8)), "f.png")


@pytest.mark.parametrize("case, files, offender, expect", [
    ("mixed sizes", {"a.png": png_bytes(pixels(0, 8)), "b.png": png_bytes(pixels(1, 16))},
     "b.png", "image is 16x16 pixels but"),
    ("mixed channels", {"a.png": png_bytes(pixels(0, 8, 1)), "b.png": png_bytes(pixels(1, 8, 3))},
     "b.png", "image is RGB (3 channels) but"),
    ("non-square", {"a.png": png_bytes(pixels(0, 8)[:4])}, "a.png", "image is 8x4 pixels; images must be square"),
    ("not power of two", {"a.png": png_bytes(pixels(0, 12))}, "a.png", "image is 12x12 pixels; the side must be a power of two"),
    ("too small", {"a.png": png_bytes(pixels(0, 2))}, "a.png", "image is 2x2 pixels; the side must be a power of two"),
    ("transparent", {"a.png": png_bytes(np.zeros((8, 8, 4), np.uint8))}, "a.png", "image has transparent pixels"),
])
def test_inconsistent_images_fail_naming_the_file(tmp_path, case, files, offender, expect):
    write_files(tmp_path, files)
    message = open_error(tmp_path)
    assert message.startswith(os.path.join(os.fspath(tmp_path), offender) + ": ") and expect in message
    if case.startswith("mixed"):
        assert "a.png" in message  # names the first image too


LABEL_CASES = [
    ("malformed JSON", '{"labels": [["img00.png", 1],', "not valid JSON (Expecting value at line 1 column 30)"),
    ("bad UTF-8", b'{"labels": "\xff"}', "not UTF-8 text (byte 12)"),
    ("top level list", "[1, 2]", "top level must be a JSON object"),
    ("labels missing", '{"label": null}', 'missing the "labels" field'),
    ("labels not list", '{"labels": {"img00.png": 1}}', '"labels" must be a list of [path, class] pairs or null, got an object'),
    ("entry not pair", '{"labels": [["img00.png", 1], ["img01.png"]]}', "labels[1] must be a [path, class] pair"),
    ("path not string", '{"labels": [[3, 1], ["img01.png", 0]]}', "labels[0] path must be a string, got 3"),
    ("negative class", '{"labels": [["img00.png", -1], ["img01.png", 0]]}', "labels[0] ('img00.png') class must be an integer >= 0, got -1"),
    ("float class", '{"labels": [["img00.png", 1.5], ["img01.png", 0]]}', "class must be an integer >= 0, got 1.5"),
    ("bool class", '{"labels": [["img00.png", true], ["img01.png", 0]]}', "class must be an integer >= 0, got true"),
    ("vector label", '{"labels": [["img00.png", [0.5, 0.5]], ["img01.png", 0]]}', "is a vector label; only integer class labels"),
    ("class over num_classes", '{"labels": [["img00.png", 3], ["img01.png", 0]], "num_classes": 3}',
     "class 3 is out of range (\"num_classes\" is 3)"),
    ("absurd class", '{"labels": [["img00.png", 99999999], ["img01.png", 0]]}', "class 99999999 is out of range (the limit is 65536 classes)"),
    ("bad num_classes", '{"labels": null, "num_classes": 0}', '"num_classes" must be an integer from 1 to 65536, got 0'),
    ("missing file", '{"labels": [["img00.png", 1], ["img01.png", 0], ["gone.png", 2]]}', "labels[2] names 'gone.png', which is not an image"),
    ("duplicate", '{"labels": [["img00.png", 1], ["img01.png", 0], ["img00.png", 1]]}', "labels[2] repeats 'img00.png' (already labelled by labels[0])"),
    ("image without label", '{"labels": [["img01.png", 0]]}', "image 'img00.png' has no label (1 of 2 images have none)"),
]


@pytest.mark.parametrize("case, text, expect", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
@pytest.mark.parametrize("container", ["dir", "zip"])
def test_bad_labels_fail_naming_dataset_json(tmp_path, case, text, expect, container):
    files = {**image_files(2), "dataset.json": text}
    path = write_files(tmp_path / "d", files) if container == "dir" else write_zip(tmp_path / "d.zip", files)
    message = open_error(path)
    assert message.startswith(os.fspath(path) + os.sep + "dataset.json: " if container == "dir"
                              else os.fspath(path) + "/dataset.json: ")
    assert expect in message


def test_labels_checked_before_images_are_decoded(tmp_path):
    write_files(tmp_path, {"broken.png": "not an image", "dataset.json": "{"})
    assert "dataset.json" in open_error(tmp_path)


def test_dataset_json_in_subfolder_is_refused(tmp_path):
    files = {f"inner/{k}": v for k, v in image_files(2).items()}
    files["inner/dataset.json"] = '{"labels": [["img00.png", 1], ["img01.png", 0]]}'
    write_zip(tmp_path / "d.zip", files)
    message = open_error(tmp_path / "d.zip")
    assert "inner/dataset.json: dataset.json must be at the dataset root" in message
    assert len(open_dataset(tmp_path / "d.zip", use_labels=False)) == 2


def test_empty_folder_and_empty_zip(tmp_path):
    (tmp_path / "empty").mkdir()
    write_files(tmp_path / "textonly", {"a.txt": "x", "dataset.json": '{"labels": null}'})
    write_zip(tmp_path / "empty.zip", {"readme.txt": "x"})
    for name in ["empty", "textonly", "empty.zip"]:
        assert open_error(tmp_path / name).startswith(os.fspath(tmp_path / name) + ": no images found")


def test_nonexistent_path_and_non_zip_file(tmp_path):
    assert "no such file or directory" in open_error(tmp_path / "missing")
    (tmp_path / "image.png").write_bytes(valid_png())
    assert open_error(tmp_path / "image.png").endswith("image.png: not a directory or a ZIP archive")


def test_damaged_zip(tmp_path):
    write_zip(tmp_path / "good.zip", image_files(3, 16), zipfile.ZIP_DEFLATED)
    data = (tmp_path / "good.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    assert open_error(tmp_path / "cut.zip").startswith(os.fspath(tmp_path / "cut.zip") + ": damaged ZIP archive (")
    # flip a byte inside the first member's compressed data: the central directory is intact
    offset = data.index(b"img00.png") + len("img00.png") + 20
    (tmp_path / "flip.zip").write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])
    message = open_error(tmp_path / "flip.zip")
    assert message.startswith(os.fspath(tmp_path / "flip.zip") + "/img00.png: damaged ZIP entry (")


def test_special_file_with_image_name_does_not_hang(tmp_path):
    write_files(tmp_path, image_files(1))
    os.mkfifo(tmp_path / "pipe.png")
    assert open_error(tmp_path) == f"{tmp_path / 'pipe.png'}: expected a regular file, found a FIFO"


def test_control_characters_in_names_keep_messages_on_one_line(tmp_path):
    write_files(tmp_path, {"bad\nname.png": "not an image", "ok.png": png_bytes(pixels(0))})
    assert "bad\\nname.png: cannot read image (" in open_error(tmp_path)
    (tmp_path / "bad\nname.png").unlink()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["ok.png", 0], ["evil\n" + "x" * 500, 1]]}))
    message = open_error(tmp_path)
    assert "labels[1] names 'evil\\nxxx" in message and len(message) < 400 + len(os.fspath(tmp_path))
