"""Hostile inputs, round three (issue 30), data inputs: each class fixed at its mechanism and checked through
the command line (`mpdiff dataset convert/encode/check`, `mpdiff train --data`, `mpdiff generate --vae`).

Mechanisms: data.reading.probe_file (what a file will take in memory is bounded from its header: an image's
pixel limit, a latent header that must account for exactly the bytes of its file, and the dataset memory
budget) and data.reading.read_checked (a file, a ZIP entry too, is read whole only after its header was
looked at); data.convert (a long thin image takes the ADM crop without making the whole resized picture;
files named as images of kinds convert does not read are refused, or left out with a line saying so);
data.latents.vae_moments / vae_pixels (every batch the VAE encodes or decodes is checked before anyone can
write it, by the rule latent files are read with)."""

import io
import os
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from conftest import (
    pixels,
    png_bytes,
    randomized_network,
    run_cli,
    tiny_config,
    tiny_run_flags,
    write_files,
    write_zip,
)
from test_hostile3 import _one_line_failure
from test_latent import latent_files, vae_dir  # noqa: F401  (vae_dir: the tiny SD-shaped VAE fixture)

from mpdiff.data.image_files import MAX_IMAGE_PIXELS

TRAIN = ("--run-dir", "run", *tiny_run_flags(duration=64))


def _npy_header(shape):
    """The bytes of an .npy header (format 1.0) that declares a float32 array of `shape`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _png_header_only(width, height):
    """A PNG whose IHDR declares width x height 8-bit grayscale pixels, followed by a tiny IDAT and IEND:
    a decompression bomb as its header describes it, at 60 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


# ---- memory is bounded from headers before anything is allocated -------------------------------------

def test_a_latent_header_that_claims_more_than_its_file_holds_is_refused_from_the_header(tmp_path):
    # [8, 4096, 4096] in a file of 192 bytes: NumPy allocated the 512 MiB array before finding the data short,
    # and training built a network of that resolution. The header must account for exactly its file.
    lying = _npy_header((8, 4096, 4096)) + bytes(64)
    write_files(tmp_path / "lat", {"00000/img-mean-std-00000000.npy": lying})
    line = _one_line_failure(run_cli("train", "--data", tmp_path / "lat", *TRAIN))
    assert line.endswith("img-mean-std-00000000.npy: cannot read latent, not a valid .npy file (EOF: its header "
                         "declares [8, 4096, 4096] float32, 536,870,912 bytes of data, and 64 follow; the file is "
                         "truncated or damaged)"), line
    assert not os.path.exists("run/config.json")
    # the same file as the third entry of a ZIP whose others are good: `dataset check` names it
    files = latent_files(4)
    files["00000/img-mean-std-00000002.npy"] = lying
    write_zip(tmp_path / "lat.zip", files)
    result = run_cli("dataset", "check", tmp_path / "lat.zip", "--no-progress")
    assert result.exit_code == 1, result.output
    assert f"{tmp_path}/lat.zip/00000/img-mean-std-00000002.npy: cannot read latent, not a valid .npy file " \
           f"(EOF: its header declares [8, 4096, 4096]" in result.output
    assert result.output.endswith(f"{tmp_path}/lat.zip: 4 images, 1 bad\n")


def test_one_file_larger_than_the_memory_budget_is_refused_from_its_header(tmp_path):
    # a true header: 8 x 8 x 8 float32 is 2,048 bytes, more than a budget of 1,000
    write_files(tmp_path / "lat", latent_files(2))
    line = _one_line_failure(run_cli("train", "--data", tmp_path / "lat", *TRAIN,
                                     env={"MPDIFF_MAX_DATASET_BYTES": "1000"}))
    assert line.endswith("img-mean-std-00000000.npy: 1 latent of 8x8 pixels with 8 channels need 2.0 KiB of "
                         "memory (2,048 bytes), more than the limit of 1000 bytes (1,000 bytes, set by "
                         "MPDIFF_MAX_DATASET_BYTES)"), line


def test_zip_entries_are_read_whole_only_after_their_header(tmp_path):
    # b.png: 64 MiB of deflated zeros (64 KiB in the archive). Its header says it is no image: refused
    # before the entry is inflated whole (it was read into memory first, then refused).
    path = tmp_path / "d.zip"
    write_zip(path, {"a.png": png_bytes(pixels(0, 8))})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive, archive.open("b.png", "w") as entry:
        for _ in range(64):
            entry.write(bytes(2**20))
    tracemalloc.start()
    try:
        result = run_cli("dataset", "check", path, "--no-progress")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 1 and result.output == (
        f"{path}/b.png: cannot read image (not a PNG, JPEG, BMP or WebP image, or its header is damaged)\n"
        f"{path}: 2 images, 1 bad\n"), result.output
    assert peak < 16 * 2**20, f"{peak:,} bytes allocated: the entry was read whole"


def test_a_decompression_bomb_is_refused_from_its_header_by_every_command(tmp_path):
    bomb = _png_header_only(20000, 20000)  # 400 million pixels
    write_files(tmp_path / "src", {"a.png": png_bytes(pixels(0, 8)), "b.png": bomb})
    message = f"{tmp_path}/src/b.png: cannot read image (more than {MAX_IMAGE_PIXELS} pixels; refused as a possible " \
              f"decompression bomb)"
    line = _one_line_failure(run_cli("dataset", "convert", tmp_path / "src", tmp_path / "out", "--resolution", "8",
                                     "--transform", "center-crop-dhariwal", "--no-progress"))
    assert line.endswith(message), line
    assert sorted(os.listdir(tmp_path)) == ["src"]
    result = run_cli("dataset", "check", tmp_path / "src", "--no-progress")
    assert result.exit_code == 1 and message in result.output, result.output
    # as the first image, it is refused when the dataset is opened
    write_files(tmp_path / "first", {"a.png": bomb})
    line = _one_line_failure(run_cli("train", "--data", tmp_path / "first", *TRAIN))
    assert line.endswith(message.replace("/src/b.png", "/first/a.png")), line


def test_a_long_thin_image_takes_the_adm_crop_without_making_the_whole_resized_picture(tmp_path, monkeypatch):
    # 8192x1 to 512 with center-crop-dhariwal: the bicubic resize to a short side of 512 is 4,194,304x512 pixels
    # (6 GiB of RGB: MemoryError). The square is resized straight from its box of the source instead.
    from PIL import Image

    row = np.random.RandomState(0).randint(0, 256, (1, 8192, 3), dtype=np.uint8)
    write_files(tmp_path / "src", {"strip.png": png_bytes(row)})
    sizes, real_resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or
                        real_resize(self, size, *a, **k))
    result = run_cli("dataset", "convert", tmp_path / "src", tmp_path / "out", "--resolution", "512", "--transform",
                     "center-crop-dhariwal", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sizes and max(width * height for width, height in sizes) <= MAX_IMAGE_PIXELS, sizes
    with Image.open(tmp_path / "out" / "00000" / "img00000000.png") as image:
        square = np.asarray(image)
    assert square.shape == (512, 512, 3)
    assert (square == square[:1]).all()  # one source row, stretched: every row the same
    middle = row[0, 4094:4098].astype(int)  # the square covers the middle pixel of the row, a little either side
    assert middle.min() - 8 <= square.min() and square.max() <= middle.max() + 8


def test_the_bounded_adm_crop_is_the_recipe_up_to_rounding(monkeypatch):
    # where both can be made, the square resized from its box and the centre of the whole resized picture
    # differ only by rounding (PIL rounds once per pass, and orders the passes by their cost)
    import mpdiff.data.convert as convert
    from PIL import Image

    for height, width, size in [(5, 300, 16), (200, 7, 8), (40, 100, 32)]:
        yy, xx = np.mgrid[0:height, 0:width]
        image = (127 + 100 * np.sin(xx / 7.0) * np.cos(yy / 5.0)).astype(np.uint8)[None].repeat(3, 0)
        whole = convert.transform_image(image, "center-crop-dhariwal", size)
        monkeypatch.setattr(convert, "MAX_IMAGE_PIXELS", 0)  # every resize goes the bounded way
        bounded = convert.transform_image(image, "center-crop-dhariwal", size)
        monkeypatch.undo()
        picture = Image.fromarray(image.transpose(1, 2, 0))
        scale = size / min(picture.size)
        resized = np.asarray(picture.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC))
        top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
        assert np.array_equal(whole, resized[top:top + size, left:left + size].transpose(2, 0, 1))
        assert bounded.shape == whole.shape and np.abs(bounded.astype(int) - whole).max() <= 2


# ---- nothing is left out without a word ----------------------------------------------------------------

def test_files_named_as_images_of_other_kinds_are_refused_or_left_out_with_a_line(tmp_path):
    gif = png_bytes(pixels(1, 8), fmt="GIF")
    write_files(tmp_path / "src", {"a.png": png_bytes(pixels(0, 8)), "b.gif": gif, "sub/c.GIF": gif,
                                   "d.tiff": png_bytes(pixels(2, 8), fmt="TIFF"), "notes.txt": "mine",
                                   ".hidden.gif": gif})
    line = _one_line_failure(run_cli("dataset", "convert", tmp_path / "src", tmp_path / "out", "--no-progress"))
    assert line.endswith(f"{tmp_path}/src: 3 files are named as images of kinds convert does not read (2 .gif "
                         f"(b.gif, sub/c.GIF), 1 .tiff (d.tiff)); it reads .bmp, .jpeg, .jpg, .png and .webp files: "
                         f"convert them to PNG first, or pass --skip-other-images to leave them out"), line
    assert sorted(os.listdir(tmp_path)) == ["src"]
    result = run_cli("dataset", "convert", tmp_path / "src", tmp_path / "out", "--skip-other-images", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 1 image (8x8, 3 channels, unlabelled) to {tmp_path}/out\n"
    assert result.stderr == (f"{tmp_path}/src: skipped 3 images of kinds convert does not read: 2 .gif (b.gif, "
                             f"sub/c.GIF), 1 .tiff (d.tiff)\n"
                             f"{tmp_path}/src: ignored 2 files that are not images: .hidden.gif, notes.txt\n")
    help_text = run_cli("dataset", "convert", "--help").output
    assert "--skip-other-images" in help_text and "Nothing is left out without a word" in help_text


def test_training_names_images_of_kinds_it_does_not_read_apart_from_other_files(tmp_path):
    gif = png_bytes(pixels(1, 8), fmt="GIF")
    write_files(tmp_path / "src", {**{f"{i}.png": png_bytes(pixels(i, 8)) for i in range(4)}, "b.gif": gif,
                                   "notes.txt": "mine"})
    flags = tiny_run_flags(batch=4, duration=4, status_nimg=4, snapshot_nimg=4, checkpoint_nimg=4)
    result = run_cli("train", "--data", tmp_path / "src", "--run-dir", tmp_path / "run", *flags)
    assert result.exit_code == 0, result.output
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "dataset src: ignored images of kinds mpdiff does not read: 1 .gif (b.gif); convert them to PNG" in log
    assert "dataset src: ignored 1 file(s) that are not images: notes.txt" in log


# ---- every encoded or decoded tensor is checked before it is written -----------------------------------

def _damaged_vae(vae_dir, dest, part):  # noqa: F811  (vae_dir: the path the fixture gave)
    """A copy of the tiny VAE with one weight of its `part` ("encoder" or "decoder") set to NaN."""
    import diffusers
    import torch

    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        getattr(vae, part).conv_in.weight[0, 0, 0, 0] = float("nan")
    vae.save_pretrained(dest)
    return dest


def test_a_vae_making_non_finite_latents_writes_nothing(vae_dir, tmp_path):  # noqa: F811
    nan_vae = _damaged_vae(vae_dir, tmp_path / "nan-vae", "encoder")
    write_files(tmp_path / "img", {f"{i}.png": png_bytes(pixels(i, 32)) for i in range(3)})
    before = sorted(os.listdir(tmp_path))
    for dest in ("lat.zip", "lat"):
        line = _one_line_failure(run_cli("dataset", "encode", tmp_path / "img", tmp_path / dest, "--vae", nan_vae,
                                         "--batch", "2", "--no-progress"))
        assert line.endswith(f"VAE folder {nan_vae}: its encoder made latents with 256 non-finite values (NaN or "
                             f"infinity) of 256 from {tmp_path}/img/0.png and the 1 image after it; the VAE is the "
                             f"likely cause (damaged or non-finite weights): nothing of them is written"), line
        assert sorted(os.listdir(tmp_path)) == before  # no DEST, no temporary file or partial folder
    encoded = run_cli("dataset", "encode", tmp_path / "img", tmp_path / "lat.zip", "--vae", vae_dir, "--no-progress")
    assert encoded.exit_code == 0, encoded.output  # the same images with the good VAE


def test_a_vae_decoding_to_non_finite_pixels_makes_no_image(vae_dir, tmp_path):  # noqa: F811
    # a NaN VAE decoder made black images with exit 0
    from mpdiff.storage.network_files import save_network

    nan_vae = _damaged_vae(vae_dir, tmp_path / "nan-vae", "decoder")
    changes = dict(img_channels=4, label_dim=0)
    save_network(tmp_path / "net.safetensors", randomized_network(**changes).state_dict(), tiny_config(**changes))
    result = run_cli("generate", tmp_path / "net.safetensors", "--vae", nan_vae, "--seeds", "0-1", "--steps", "2",
                     "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]  # after generate's lines about the network and its decoder
    assert line.endswith(f"VAE folder {nan_vae}: its decoder made 98,304 non-finite values (NaN or infinity) of "
                         f"98,304 from finite latents; the VAE is the likely cause (damaged or non-finite weights): "
                         f"no image is made of them"), line
    assert not [name for _, _, names in os.walk(tmp_path / "out") for name in names if name.endswith(".png")]
