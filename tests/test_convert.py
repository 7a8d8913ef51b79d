"""`mpdiff dataset convert`: any images -> an EDM2-style dataset that open_dataset accepts (issue 11)."""

import io
import json
import os
import shlex
import zipfile

import numpy as np
import pytest
from conftest import pixels, png_bytes, run_cli, write_files

from mpdiff.data import convert as convert_module
from mpdiff.data.convert import convert_dataset, entry_name, transform_image
from mpdiff.data.datasets import load_dataset, open_dataset
from mpdiff.data.labels import CHUNK_FOLDERS_UNLABELLED
from mpdiff.errors import ConfigError, DatasetError


def chw(array):
    """[H, W] or [H, W, C] -> [C, H, W]."""
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def rect(height, width, channels=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (channels, height, width), dtype=np.uint8)


@pytest.fixture
def cli_with_dataset(monkeypatch):
    """`mpdiff dataset ...` through the real top-level group, whether or not cli.py has added it yet."""
    from mpdiff.cli import cli
    from mpdiff.cli_dataset import dataset
    monkeypatch.setitem(cli.commands, "dataset", dataset)


# ---- transforms on known inputs -------------------------------------------------------------------

def test_pad_centres_the_image_on_a_black_canvas():
    image = rect(28, 28, 1) | 1  # no zero pixel: the content is told from the border
    out = transform_image(image, "pad", 32)
    assert out.shape == (1, 32, 32) and out.dtype == np.uint8
    assert np.array_equal(out[:, 2:30, 2:30], image)  # rows and columns 2..29
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not out[:, border].any()
    odd = transform_image(rect(5, 3, 3) | 1, "pad", 8)  # an odd margin puts the extra pixel after the image
    assert [np.flatnonzero(odd[0].any(axis=1)).tolist(), np.flatnonzero(odd[0].any(axis=0)).tolist()] == \
        [[1, 2, 3, 4, 5], [2, 3, 4]]
    with pytest.raises(ValueError, match="does not fit"):
        transform_image(rect(33, 8), "pad", 32)


def test_every_transform_leaves_an_image_of_the_right_size_alone():
    image = rect(16, 16)
    for transform in convert_module.TRANSFORMS:
        assert np.array_equal(transform_image(image, transform, 16), image)


def test_resize_stretches_to_RxR():
    image = np.zeros((3, 20, 40), np.uint8)
    image[:, :, 20:] = 200  # right half bright: still the right half when squeezed to a square
    out = transform_image(image, "resize", 16)
    assert out.shape == (3, 16, 16)
    assert out[:, :, :6].max() <= 3 and out[:, :, 10:].min() >= 197  # Lanczos rings a little at the edge
    assert (out == out[:, :1]).all()  # no vertical structure was added: every row alike


def test_center_crop_keeps_the_centre():
    wide = np.zeros((3, 20, 40), np.uint8)   # 40 wide, 20 high: the crop is columns 10..29
    wide[:, :, :10], wide[:, :, 10:30], wide[:, :, 30:] = 50, 200, 90
    out = transform_image(wide, "center-crop", 16)
    assert out.shape == (3, 16, 16) and (out == 200).all()
    tall = wide.transpose(0, 2, 1).copy()    # 20 wide, 40 high: rows 10..29
    assert (transform_image(tall, "center-crop", 8) == 200).all()
    gray = transform_image(wide[:1], "center-crop", 32)  # grayscale stays one channel; upscaling too
    assert gray.shape == (1, 32, 32) and (gray == 200).all()


def test_center_crop_dhariwal_follows_the_adm_recipe():
    image = np.zeros((3, 384, 512), np.uint8)  # 512 wide, 384 high
    image[:, :, :24] = 255  # a band at the left edge, outside the centred square
    image[:, 150:230, 220:290] = 100  # a patch in the middle
    out = transform_image(image, "center-crop-dhariwal", 32)
    assert out.shape == (3, 32, 32)
    # 512x384 -> box-halved three times to 64x48 (the short side stops above 2R = 64), bicubic to 43x32,
    # centre crop from column (43 - 32) // 2 = 5: the band (columns 0..2 at 64x48) is cut away
    assert out[:, :, :2].max() < 8 and out[:, 14:18, 14:18].min() > 60
    exact = rect(64, 64)  # a short side of exactly 2R is halved once, by 2x2 averages, and nothing else
    halved = exact.reshape(3, 32, 2, 32, 2).astype(float).mean(axis=(2, 4))
    assert np.abs(transform_image(exact, "center-crop-dhariwal", 32) - halved).max() <= 1
    gray = transform_image(rect(300, 200, 1), "center-crop-dhariwal", 16)
    assert gray.shape == (1, 16, 16)


def test_edm2_entry_names_have_1000_images_per_folder():
    assert [entry_name(i) for i in (0, 999, 1000, 123456)] == [
        "00000/img00000000.png", "00000/img00000999.png", "00001/img00001000.png", "00123/img00123456.png"]


# ---- whole conversions ------------------------------------------------------------------------------

def test_mnist_sized_images_padded_into_a_zip_open_with_the_same_labels(tmp_path):
    src = tmp_path / "mnist"
    files = {f"img{i}.png": png_bytes(pixels(i, 28, 1)) for i in range(5)}
    files["dataset.json"] = json.dumps({"labels": [[f"img{i}.png", [3, 1, 4, 1, 5][i]] for i in range(5)],
                                        "num_classes": 10})
    write_files(src, files)
    result = convert_dataset(src, tmp_path / "mnist-32.zip", 32, "pad", progress=False)
    assert result.summary() == f"wrote 5 images (32x32, 1 channel, 10 classes from dataset.json) to {tmp_path}/mnist-32.zip"
    with zipfile.ZipFile(tmp_path / "mnist-32.zip") as archive:
        assert archive.namelist() == [f"00000/img0000000{i}.png" for i in range(5)] + ["dataset.json"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        assert json.loads(archive.read("dataset.json"))["labels"][1] == ["00000/img00000001.png", 1]
    ds = load_dataset(tmp_path / "mnist-32.zip", progress=False)
    assert ds.images.shape == (5, 1, 32, 32) and ds.labels.tolist() == [3, 1, 4, 1, 5] and ds.num_classes == 10
    assert np.array_equal(ds.images[2, 0, 2:30, 2:30], pixels(2, 28, 1)) and ds.label_source == "dataset.json"


def test_class_folders_of_mixed_sizes_and_modes_become_a_labelled_folder(tmp_path):
    """Class-per-folder labels carry over; grayscale among RGB becomes gray RGB; JPEG, palette and
    opaque RGBA images are read as the dataset reader reads them."""
    gray = pixels(1, 40, 1)
    write_files(tmp_path / "src", {
        "cat/a.png": png_bytes(pixels(0, 24)),
        "cat/b.png": png_bytes(gray[:, :20]),                      # 20 wide, 40 high
        "dog/c.jpg": png_bytes(pixels(2, 50), fmt="JPEG"),
        "dog/d.png": png_bytes(np.dstack([pixels(3, 16), np.full((16, 16), 255, np.uint8)])),  # opaque RGBA
        "notes.txt": "not an image",
    })
    result = convert_dataset(tmp_path / "src", tmp_path / "out", 16, "center-crop", progress=False)
    assert result.summary() == f"wrote 4 images (16x16, 3 channels, 2 classes from top-level folders: cat, dog) to {tmp_path}/out"
    assert sorted(os.listdir(tmp_path / "out")) == ["00000", "dataset.json"]
    ds = load_dataset(tmp_path / "out", progress=False)
    assert ds.images.shape == (4, 3, 16, 16) and ds.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds.images[1, 0], ds.images[1, 2])  # the grayscale image, repeated into RGB
    assert np.array_equal(ds.images[3], chw(pixels(3, 16)))  # already 16x16: unchanged


def test_a_dataset_of_the_right_size_converts_to_the_same_dataset(tmp_path):
    """No options needed when the images already share one power-of-two size; an unlabelled source
    gives "labels": null."""
    write_files(tmp_path / "src", {f"x/{i}.png": png_bytes(pixels(i, 8)) for i in range(3)})
    result = convert_dataset(tmp_path / "src", tmp_path / "out.zip", progress=False)
    assert (result.count, result.resolution, result.num_classes) == (3, 8, 0)
    assert result.summary().endswith("(8x8, 3 channels, unlabelled) to " + os.fspath(tmp_path / "out.zip"))
    before, after = load_dataset(tmp_path / "src", progress=False), load_dataset(tmp_path / "out.zip", progress=False)
    assert np.array_equal(before.images, after.images) and after.labels is None
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert json.loads(archive.read("dataset.json")) == {"labels": None}


def test_missing_or_bad_options_are_refused_before_anything_is_written(tmp_path):
    write_files(tmp_path / "src", {"a.png": png_bytes(pixels(0, 8)), "b.png": png_bytes(pixels(1, 12))})
    dest = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"images have 2 different sizes \(e\.g\. 8x8 and 12x12 at .*b\.png\); "
                                          r"choose --resolution R \(a power of two >= 4\) and --transform pad\|resize"):
        convert_dataset(tmp_path / "src", dest, progress=False)
    with pytest.raises(ConfigError, match=r"b\.png: image is 12x12 pixels, not 8x8; choose --transform"):
        convert_dataset(tmp_path / "src", dest, 8, progress=False)
    with pytest.raises(ConfigError, match=r"^--resolution must be a power of two of at least 4 .*got 12$"):
        convert_dataset(tmp_path / "src", dest, 12, "pad", progress=False)
    with pytest.raises(DatasetError, match=r"b\.png: image is 12x12 pixels, larger than 8x8; --transform pad only adds"):
        convert_dataset(tmp_path / "src", dest, 8, "pad", progress=False)
    write_files(tmp_path / "odd", {"a.png": png_bytes(pixels(0, 12))})
    with pytest.raises(ConfigError, match=r"images are 12x12 pixels, not square with a power-of-two side >= 4"):
        convert_dataset(tmp_path / "odd", dest, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["odd", "src"]


def test_transparent_images_are_refused_as_the_reader_refuses_them(tmp_path):
    write_files(tmp_path / "src", {"a.png": png_bytes(np.zeros((8, 8, 4), np.uint8))})
    with pytest.raises(DatasetError, match=r"a\.png: image has transparent pixels .*flatten it onto a background"):
        convert_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_destination_is_refused(tmp_path):
    write_files(tmp_path / "src", {"a.png": png_bytes(pixels(0, 8))})
    write_files(tmp_path / "full", {"keep.txt": "mine"})
    with pytest.raises(ConfigError, match="full is not empty; convert writes a complete new dataset"):
        convert_dataset(tmp_path / "src", tmp_path / "full", progress=False)
    write_files(tmp_path, {"old.zip": b"PK"})
    with pytest.raises(ConfigError, match="old.zip already exists"):
        convert_dataset(tmp_path / "src", tmp_path / "old.zip", progress=False)
    with pytest.raises(ConfigError, match="is inside SRC"):
        convert_dataset(tmp_path / "src", tmp_path / "src" / "sub", progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (tmp_path / "old.zip").read_bytes() == b"PK"
    os.mkdir(tmp_path / "empty")  # an empty folder is filled
    convert_dataset(tmp_path / "src", tmp_path / "empty", progress=False)
    assert sorted(os.listdir(tmp_path / "empty")) == ["00000", "dataset.json"]


@pytest.mark.parametrize("dest", ["out", "out.zip"])
@pytest.mark.parametrize("failure", [DatasetError("damaged"), KeyboardInterrupt()])
def test_an_interrupted_conversion_leaves_no_destination(tmp_path, monkeypatch, dest, failure):
    write_files(tmp_path / "src", {f"{i}.png": png_bytes(pixels(i, 8)) for i in range(4)})
    real, calls = convert_module.decode_image, []

    def fail_at_the_third(data, where):
        calls.append(where)
        if len(calls) == 3:
            raise failure
        return real(data, where)

    monkeypatch.setattr(convert_module, "decode_image", fail_at_the_third)
    with pytest.raises(type(failure)):
        convert_dataset(tmp_path / "src", tmp_path / dest, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no DEST, no hidden partial folder or temporary ZIP
    monkeypatch.setattr(convert_module, "decode_image", real)
    assert convert_dataset(tmp_path / "src", tmp_path / dest, progress=False).count == 4  # and it can be redone


def test_a_partial_folder_left_by_a_killed_conversion_is_removed_only_if_it_carries_its_token(tmp_path):
    from mpdiff.storage.files import write_json
    from mpdiff.storage.staging import TOKEN_FILE, new_token

    write_files(tmp_path / "src", {"a.png": png_bytes(pixels(0, 8))})
    write_files(tmp_path, {".out.partial-abcd1234/00000/img00000000.png": b"torn",      # a killed conversion's
                           ".out.partial-mybackup/00000/img00000000.png": b"mine"})     # named like one
    killed = tmp_path / ".out.partial-abcd1234"
    write_json(killed / TOKEN_FILE, new_token(killed))
    convert_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == [".out.partial-mybackup", "out", "src"]


# ---- what open_dataset and load_dataset say about sizes and chunk folders ------------------------------

def test_the_size_errors_of_open_dataset_name_the_convert_command(tmp_path, cli_with_dataset):
    write_files(tmp_path / "mnist", {f"{i}.png": png_bytes(pixels(i, 28, 1)) for i in range(2)})
    with pytest.raises(DatasetError) as error:
        open_dataset(tmp_path / "mnist", progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}/mnist/0.png: image is 28x28 pixels; the side must")
    suffix = f"; convert it with: mpdiff dataset convert {tmp_path}/mnist {tmp_path}/mnist-32 --resolution 32 --transform pad"
    assert message.endswith(suffix)
    command = shlex.split(message.split("convert it with: mpdiff ")[1])  # the advice works as written
    result = run_cli(*command, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote 2 images (32x32, 1 channel, unlabelled) to {tmp_path}/mnist-32\n"
    assert load_dataset(tmp_path / "mnist-32", progress=False).images.shape == (2, 1, 32, 32)

    write_files(tmp_path / "photos.zip.d", {"a.png": png_bytes(pixels(0, 128)), "b.png": png_bytes(pixels(1, 96)[:80])})
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for name in ("a.png", "b.png"):
            archive.write(tmp_path / "photos.zip.d" / name, name)
    with pytest.raises(DatasetError, match=r"b\.png: image is 96x80 pixels but .*a\.png is 128x128; all images must have "
                                           r"the same size; convert it with: mpdiff dataset convert .*photos\.zip "
                                           r".*photos-64\.zip --resolution 64 --transform center-crop$"):
        load_dataset(tmp_path / "photos.zip", progress=False)  # b.png is not the first image: met when decoded


def test_edm2_chunk_folders_are_not_classes(tmp_path):
    write_files(tmp_path / "chunks", {entry_name(i): png_bytes(pixels(i, 8)) for i in (0, 1, 1000, 1001)})
    ds = open_dataset(tmp_path / "chunks", progress=False)
    assert ds.labels is None and ds.num_classes == 0 and ds.label_source == CHUNK_FOLDERS_UNLABELLED
    assert ds.label_source == "none (EDM2 chunk folders 00000/... are not classes)"
    result = convert_dataset(tmp_path / "chunks", tmp_path / "again.zip", progress=False)
    assert "unlabelled: EDM2 chunk folders 00000/... are not classes" in result.summary()
    write_files(tmp_path / "classes", {f"{c}/{i}.png": png_bytes(pixels(i, 8)) for c in ("00000", "cats") for i in range(2)})
    assert open_dataset(tmp_path / "classes", progress=False).labels.tolist() == [0, 0, 1, 1]  # not all chunk names


# ---- the command line --------------------------------------------------------------------------------

def test_the_command_line_converts_and_reports_errors_in_one_line(tmp_path, cli_with_dataset):
    write_files(tmp_path / "src", {"a/0.png": png_bytes(pixels(0, 20)), "b/1.png": png_bytes(pixels(1, 30))})
    result = run_cli("dataset", "convert", tmp_path / "src", tmp_path / "out.zip", "--resolution", "16",
                     "--transform", "center-crop-dhariwal", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote 2 images (16x16, 3 channels, 2 classes from top-level folders: a, b) to {tmp_path}/out.zip\n"
    refused = run_cli("dataset", "convert", tmp_path / "src", tmp_path / "out.zip", "--no-progress")
    assert refused.exit_code == 1 and refused.output.startswith("error: ") and refused.output.count("\n") == 1
    bad = run_cli("dataset", "convert", tmp_path / "src", tmp_path / "x", "--transform", "stretch")
    assert bad.exit_code == 2 and "'stretch' is not one of 'pad', 'resize', 'center-crop', 'center-crop-dhariwal'" in bad.output
    help_text = run_cli("dataset", "convert", "--help").output
    assert "aspect ratio is NOT kept" in help_text and "--no-progress" in help_text


def test_a_run_on_edm2_chunk_folders_trains_unconditional_and_says_why(tmp_path):
    from conftest import train_tiny

    write_files(tmp_path / "chunks", {entry_name(i): png_bytes(pixels(i, 8)) for i in list(range(8)) + [1000, 1001]})
    run_dir = tmp_path / "run"
    trainer = train_tiny(run_dir, dataset=str(tmp_path / "chunks"), duration=64, final_grid=False)
    assert trainer.resolved.network.label_dim == 0
    assert ("unconditional (labels: none (EDM2 chunk folders 00000/... are not classes))"
            in (run_dir / "log.txt").read_text())


def test_palette_and_16_bit_images_convert_to_their_pixels(tmp_path):
    # A palette image becomes the RGB of its palette entries; a 16-bit grayscale image is rounded to
    # 8 bits (value / 257); both padded from 6x6 onto an 8x8 black canvas.
    from PIL import Image

    index = (np.arange(36).reshape(6, 6) % 3).astype(np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    p_image = Image.fromarray(index, "P")
    p_image.putpalette(palette + [0] * (768 - len(palette)))
    deep = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800)
    buffers = {}
    for name, image in (("p.png", p_image), ("deep.png", Image.fromarray(deep))):
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        buffers[name] = path
    assert Image.open(buffers["p.png"]).mode == "P" and Image.open(buffers["deep.png"]).mode.startswith("I")
    convert_dataset(tmp_path / "src", tmp_path / "out", 8, "pad", progress=False)
    ds = load_dataset(tmp_path / "out", progress=False)
    by_name = dict(zip(sorted(buffers), range(2)))  # written in sorted source order: deep.png, p.png
    deep_out, p_out = ds.images[by_name["deep.png"]], ds.images[by_name["p.png"]]
    expected_rgb = np.array(palette, np.uint8).reshape(3, 3)[index]          # [6, 6, 3]
    assert np.array_equal(p_out[:, 1:7, 1:7], expected_rgb.transpose(2, 0, 1))
    assert p_out[:, 0].max() == 0 and p_out[:, 7].max() == 0               # the black border
    expected_gray = np.round(deep / 257).astype(np.uint8)
    assert np.array_equal(deep_out[0, 1:7, 1:7], expected_gray)             # gray among RGB: repeated
    assert np.array_equal(deep_out[0], deep_out[2])


# ---- ADM's centre crop (SPEC §7.3) on constructed images; ImageNet-style trees, streamed --------------------

def adm_reference(image, size):
    """SPEC §7.3 written out step by step on a PIL image: while the shorter side is >= 2x the target, halve
    the image with a box filter; then a bicubic resize so that the shorter side equals the target (the
    longer one rounded); then the centred square, its offset rounded down."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    array = array[top:top + size, left:left + size]
    return chw(array)


@pytest.mark.parametrize("height, width", [(64, 64), (65, 64), (64, 129), (127, 128), (128, 128), (257, 129),
                                           (31, 45), (16, 16), (200, 31), (513, 1024), (17, 16)])
@pytest.mark.parametrize("channels", [1, 3])
def test_center_crop_dhariwal_is_spec_7_3_on_non_square_and_odd_sizes(height, width, channels):
    from PIL import Image

    image = rect(height, width, channels, seed=height * 1000 + width)
    got = transform_image(image, "center-crop-dhariwal", 32)
    picture = Image.fromarray(image[0] if channels == 1 else image.transpose(1, 2, 0))
    assert got.shape == (channels, 32, 32) and got.dtype == np.uint8
    assert np.array_equal(got, adm_reference(picture, 32))


def test_center_crop_dhariwal_known_answers():
    # 4R x 6R made of constant 4x4 blocks: two box halvings give exactly the block values, and stop (the short
    # side is then R < 2R); a bicubic "resize" to the same size changes nothing; the crop takes the middle R
    # columns of 1.5R: from column R/4
    blocks = np.random.RandomState(1).randint(0, 256, (3, 16, 24), dtype=np.uint8)
    image = blocks.repeat(4, axis=1).repeat(4, axis=2)             # 64 x 96, R = 16
    assert np.array_equal(transform_image(image, "center-crop-dhariwal", 16), blocks[:, :, 4:20])
    # short side exactly R: no halving, no resize; an odd excess of 3 columns puts the extra one on the right
    narrow = rect(16, 19, seed=2)
    assert np.array_equal(transform_image(narrow, "center-crop-dhariwal", 16), narrow[:, :, 1:17])
    # a constant image stays that constant through box, bicubic and crop, whatever its size
    flat = np.full((3, 301, 199), 77, np.uint8)
    assert (transform_image(flat, "center-crop-dhariwal", 16) == 77).all()


def test_an_imagenet_style_tree_converts_streamed_with_adm_crop(tmp_path, monkeypatch):
    """Class-per-folder (WordNet ids, .JPEG), odd and non-square sizes, grayscale, palette and opaque RGBA: one
    image is decoded, transformed and written at a time (never all first), in source order, and the result is
    SPEC §7.3 applied to the image as the reader decodes it."""
    from PIL import Image

    rs = np.random.RandomState(3)
    palette = Image.fromarray(rs.randint(0, 4, (50, 70), dtype=np.uint8), "P")
    palette.putpalette(list(rs.randint(0, 256, 12)) + [0] * (768 - 12))
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    files = {
        "n01440764/n01440764_10026.JPEG": png_bytes(rs.randint(0, 256, (75, 100, 3), dtype=np.uint8), fmt="JPEG"),
        "n01440764/n01440764_2.png": png_bytes(rs.randint(0, 256, (33, 47), dtype=np.uint8)),        # grayscale
        "n01443537/a.png": buffer.getvalue(),                                                       # palette
        "n01443537/b.png": png_bytes(np.dstack([rs.randint(0, 256, (41, 40, 3), dtype=np.uint8),
                                                np.full((41, 40), 255, np.uint8)])),                # opaque RGBA
        "n01484850/c.png": png_bytes(rs.randint(0, 256, (130, 66, 3), dtype=np.uint8)),
    }
    write_files(tmp_path / "train", files)
    decoded, encoded = [], []
    real_decode, real_png = convert_module.decode_image, convert_module._png

    def decode(data, where):
        decoded.append(where)
        return real_decode(data, where)

    def png(image):
        encoded.append(len(decoded))
        return real_png(image)

    monkeypatch.setattr(convert_module, "decode_image", decode)
    monkeypatch.setattr(convert_module, "_png", png)
    result = convert_dataset(tmp_path / "train", tmp_path / "out.zip", 16, "center-crop-dhariwal", progress=False)
    assert encoded == [1, 2, 3, 4, 5]  # streamed: each image written right after it was decoded
    assert result.summary() == (f"wrote 5 images (16x16, 3 channels, 3 classes from top-level folders: n01440764, "
                                f"n01443537, n01484850) to {tmp_path}/out.zip")
    out = load_dataset(tmp_path / "out.zip", progress=False)
    assert out.labels.tolist() == [0, 0, 1, 1, 2]
    source = load_dataset_images(tmp_path / "train", sorted(files))
    for i, image in enumerate(source):
        picture = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        expected = adm_reference(picture, 16)
        expected = np.repeat(expected, 3, axis=0) if expected.shape[0] == 1 else expected  # gray among RGB
        assert np.array_equal(out.images[i], expected), sorted(files)[i]


def load_dataset_images(root, names):
    """Each file decoded as the dataset reader decodes it (any size)."""
    from mpdiff.data.image_files import decode_image
    return [decode_image((root / name).read_bytes(), name) for name in names]


def test_a_bad_file_in_a_class_tree_is_one_line_naming_it(tmp_path):
    good = png_bytes(pixels(0, 40))
    write_files(tmp_path / "train", {"n1/a.png": good, "n1/b.JPEG": b"\xff\xd8\xff not a jpeg", "n2/c.png": good})
    with pytest.raises(DatasetError) as error:
        convert_dataset(tmp_path / "train", tmp_path / "out.zip", 16, "center-crop-dhariwal", progress=False)
    assert str(error.value).startswith(f"{tmp_path}/train/n1/b.JPEG: cannot read image (") and "\n" not in str(error.value)
    truncated = png_bytes(pixels(1, 40))
    write_files(tmp_path / "train", {"n1/b.JPEG": png_bytes(pixels(2, 40), fmt="JPEG"), "n2/c.png": truncated[:-30]})
    with pytest.raises(DatasetError, match=r"train/n2/c\.png: cannot read image \("):  # its header is fine: met when decoded
        convert_dataset(tmp_path / "train", tmp_path / "out.zip", 16, "center-crop-dhariwal", progress=False)
    assert not (tmp_path / "out.zip").exists()
