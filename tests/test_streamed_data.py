"""Datasets streamed, not decoded whole (issue 16): open_dataset builds an index, images are decoded when read.

* opening a folder or ZIP reads the file list, the labels and the first image's header, nothing else;
* ``read(i)`` gives what load_dataset decodes, and a bad file fails there, in one line naming it;
* the dataset pickles and works in DataLoader worker processes, each opening the folder or ZIP itself;
* check_dataset / `mpdiff dataset check` reports every bad file in one pass;
* opening a large ZIP allocates nothing that grows with its pixels.
"""

import io
import os
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from conftest import pixels, png_bytes, run_cli, write_files, write_zip
from PIL import Image

from mpdiff.data import reading, sources
from mpdiff.data.datasets import (
    ImageDataset,
    StreamedImageDataset,
    check_dataset,
    load_dataset,
    open_dataset,
)
from mpdiff.data.labels import CHUNK_FOLDERS_UNLABELLED
from mpdiff.data.shapes import convert_hint
from mpdiff.errors import DatasetError


def make(tmp_path, container, files):
    """The dataset `files` as a folder tmp_path/d or a ZIP tmp_path/d.zip; returns its path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_files(tmp_path / "d", files) if container == "dir" else write_zip(tmp_path / "d.zip", files)


def where(path, name):
    return f"{path}/{name}"


def labelled_files(count=7, size=8, channels=3):
    """`count` images in two class folders, with a dataset.json that labels them (not by folder)."""
    files = {f"{'ab'[i % 2]}/img{i}.png": png_bytes(pixels(i, size, channels)) for i in range(count)}
    entries = ", ".join(f'["{name}", {i % 5}]' for i, name in enumerate(files))
    files["dataset.json"] = '{"labels": [' + entries + "]}"
    return files


def counting(monkeypatch):
    """Count decode_image and probe_image calls, and record which files the sources open."""
    calls = {"decode": 0, "probe": 0, "opened": []}
    real_decode, real_probe = reading.decode_image, reading.probe_image

    def decode(*args):
        calls["decode"] += 1
        return real_decode(*args)

    def probe(*args):
        calls["probe"] += 1
        return real_probe(*args)

    monkeypatch.setattr(reading, "decode_image", decode)
    monkeypatch.setattr(reading, "probe_image", probe)
    for cls in (sources._FolderSource, sources._ZipSource):
        real_open = cls.open
        monkeypatch.setattr(cls, "open", lambda self, name, *a, _open=real_open, **k:
                            calls["opened"].append(name) or _open(self, name, *a, **k))
    return calls


def one_line(call):
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---- open: the index only ------------------------------------------------------------------------

@pytest.mark.parametrize("container", ["dir", "zip"])
def test_open_reads_only_the_first_header_and_a_damaged_file_fails_when_read(tmp_path, container, monkeypatch):
    files = {**labelled_files(4), "z/last.png": png_bytes(pixels(9))[:60]}  # truncated: its pixels are gone
    files["dataset.json"] = files["dataset.json"].replace("]]}", '], ["z/last.png", 2]]}')
    path = make(tmp_path, container, files)
    calls = counting(monkeypatch)
    ds = open_dataset(path, progress=True)
    assert isinstance(ds, StreamedImageDataset) and not ds.in_memory
    assert calls["decode"] == 0 and calls["probe"] == 1  # the first image's header, nothing else
    assert calls["opened"] == ["dataset.json", "a/img0.png"]
    assert len(ds) == 5 and ds.shape == (3, 8, 8) and (ds.channels, ds.resolution) == (3, 8)
    assert ds.labels.tolist() == [0, 2, 1, 3, 2] and ds.num_classes == 4 and ds.label_source == "dataset.json"
    assert ds.name == "d" and ds.path == os.fspath(path) and ds.ignored_files == ()
    assert ds.image_name(-1) == "z/last.png"
    with pytest.raises(AttributeError, match="load_dataset"):
        ds.images  # noqa: B018  (no pixel array: a caller that wants one says so)
    np.testing.assert_array_equal(ds.read(0), pixels(0).transpose(2, 0, 1))
    assert calls["decode"] == 1
    message = one_line(lambda: ds.read(4))
    assert message.startswith(where(path, "z/last.png") + ": cannot read image (")
    with pytest.raises(IndexError):
        ds.read(5)


@pytest.mark.parametrize("container", ["dir", "zip"])
def test_a_file_of_another_shape_fails_when_read_with_the_old_message(tmp_path, container):
    files = {"a.png": png_bytes(pixels(0, 8)), "b.png": png_bytes(pixels(1, 16)), "c.png": png_bytes(pixels(2, 8, 1))}
    path = make(tmp_path, container, files)
    ds = open_dataset(path)
    assert ds.read(0).shape == (3, 8, 8)
    assert one_line(lambda: ds.read(1)) == one_line(lambda: load_dataset(path)) == (
        f"{where(path, 'b.png')}: image is 16x16 pixels but {where(path, 'a.png')} is 8x8; all images must have the "
        f"same size{convert_hint(os.fspath(path), [(3, 8, 8), (3, 16, 16)])}")
    assert one_line(lambda: ds.read(2)).startswith(f"{where(path, 'c.png')}: image is grayscale (1 channel) but "
                                                   f"{where(path, 'a.png')} is RGB (3 channels); all images must have")


def test_the_first_image_is_checked_at_open(tmp_path):
    write_files(tmp_path, {"a.png": png_bytes(pixels(0, 12)), "b.png": b"junk"})
    assert one_line(lambda: open_dataset(tmp_path)).startswith(f"{tmp_path}/a.png: image is 12x12 pixels; the side "
                                                               f"must be a power of two")
    write_files(tmp_path, {"a.png": b"junk"})
    assert one_line(lambda: open_dataset(tmp_path)) == (f"{tmp_path}/a.png: cannot read image (not a PNG, JPEG, BMP "
                                                        f"or WebP image, or its header is damaged)")


# ---- read, batches, load: the same pixels as load_dataset ----------------------------------------

@pytest.mark.parametrize("container", ["dir", "zip"])
def test_read_batches_and_load_give_what_load_dataset_decodes(tmp_path, container):
    path = make(tmp_path, container, labelled_files(7, 8, 1))
    loaded, ds = load_dataset(path), open_dataset(path)
    assert isinstance(loaded, ImageDataset) and loaded.in_memory and loaded.path == os.fspath(path)
    assert loaded.images.shape == (7, 1, 8, 8) and loaded.shape == ds.shape == (1, 8, 8)
    for i in range(len(ds)):
        read = ds.read(i)
        assert read.dtype == np.uint8 and read.flags.c_contiguous
        np.testing.assert_array_equal(read, loaded.images[i])
        np.testing.assert_array_equal(ds[i], loaded.read(i))
    np.testing.assert_array_equal(ds.labels, loaded.labels)
    assert (ds.num_classes, ds.name, ds.label_source) == (loaded.num_classes, loaded.name, loaded.label_source)
    streamed = list(ds.batches(3))
    assert [len(b) for b in streamed] == [3, 3, 1] and all(b.dtype == np.uint8 for b in streamed)
    np.testing.assert_array_equal(np.concatenate(streamed), loaded.images)
    np.testing.assert_array_equal(np.concatenate(list(loaded.batches(3))), loaded.images)
    again = ds.load(progress=False)
    np.testing.assert_array_equal(again.images, loaded.images)
    assert loaded.load() is loaded and again.labels.tolist() == loaded.labels.tolist()
    with pytest.raises(ValueError):
        next(ds.batches(0))
    ds.close()
    np.testing.assert_array_equal(ds.read(6), loaded.images[6])  # opened again after close


def test_builtin_datasets_stay_in_memory():
    ds = open_dataset("digits")
    assert isinstance(ds, ImageDataset) and ds.in_memory and ds.load() is ds and ds.shape == (1, 8, 8)
    assert ds.read(5) is not None and np.array_equal(ds.read(5), ds.images[5])
    assert check_dataset("digits") == []


def test_load_keeps_the_memory_check(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "d.zip", labelled_files(3))  # 3 x 3 x 8 x 8 = 576 bytes
    monkeypatch.setenv("MPDIFF_MAX_DATASET_BYTES", "575")
    ds = open_dataset(path)  # the index holds no pixels: no limit applies
    assert ds.read(2).shape == (3, 8, 8)
    assert one_line(ds.load) == (f"{path}: 3 images of 8x8 pixels with 3 channels need 576 bytes of memory (576 bytes), "
                                 f"more than the limit of 575 bytes (575 bytes, set by MPDIFF_MAX_DATASET_BYTES)")


# ---- processes ---------------------------------------------------------------------------------

class _WhoRead(torch.utils.data.Dataset):
    """Reads one image of a streamed dataset and says which process read it, and for which process its
    source was opened."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image = self.ds.read(i)
        return image, os.getpid(), self.ds._pid


@pytest.mark.parametrize("container", ["dir", "zip"])
def test_a_streamed_dataset_pickles_and_works_in_dataloader_workers(tmp_path, container):
    path = make(tmp_path, container, labelled_files(10, 8, 3))
    loaded, ds = load_dataset(path), open_dataset(path)
    ds.read(0)  # the parent holds an open source now: pickles and forked workers must not use it
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._source is None and len(copy) == 10 and copy.labels.tolist() == ds.labels.tolist()
    np.testing.assert_array_equal(copy.read(9), loaded.images[9])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    np.testing.assert_array_equal(torch.cat(list(loader)).numpy(), loaded.images)
    seen = list(torch.utils.data.DataLoader(_WhoRead(ds), batch_size=3, num_workers=2))
    images = torch.cat([batch[0] for batch in seen]).numpy()
    pids, opened_for = torch.cat([batch[1] for batch in seen]), torch.cat([batch[2] for batch in seen])
    np.testing.assert_array_equal(images, loaded.images)
    assert os.getpid() not in pids.tolist() and torch.equal(pids, opened_for)  # each worker opened its own
    assert ds._pid == os.getpid() and ds.read(3).shape == (3, 8, 8)


# ---- check: every bad file in one pass -----------------------------------------------------------

def bad_dataset(tmp_path, container):
    good = {f"img{i}.png": png_bytes(pixels(i, 16)) for i in range(4)}
    bad = {"img1_cut.png": png_bytes(pixels(5, 16))[:100],   # a truncated PNG
           "img2_big.png": png_bytes(pixels(6, 32)),          # another size
           "img3_text.png": "I am not an image\n"}            # a text file named .png
    return make(tmp_path, container, {**good, **bad})


@pytest.mark.parametrize("container", ["dir", "zip"])
def test_check_reports_every_bad_file_in_one_pass(tmp_path, container, monkeypatch):
    path = bad_dataset(tmp_path, container)
    calls = counting(monkeypatch)
    problems = check_dataset(path, progress=False)
    assert calls["decode"] == 5  # one pass: every image decoded once
    assert len(problems) == 3 and all("\n" not in line for line in problems)
    cut, big, text = problems
    assert cut.startswith(where(path, "img1_cut.png") + ": ")
    assert big.startswith(f"{where(path, 'img2_big.png')}: image is 32x32 pixels but {where(path, 'img0.png')} is 16x16")
    assert text == where(path, "img3_text.png") + (": cannot read image (not a PNG, JPEG, BMP or WebP image, or its "
                                                   "header is damaged)")


@pytest.mark.parametrize("container", ["dir", "zip"])
def test_the_check_command(tmp_path, container):
    path = bad_dataset(tmp_path, container)
    result = run_cli("dataset", "check", path, "--no-progress")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == f"{path}: 7 images, 3 bad"
    assert [line.split(": ")[0] for line in lines[:3]] == [where(path, f"img{i}_{kind}.png")
                                                          for i, kind in ((1, "cut"), (2, "big"), (3, "text"))]
    good = make(tmp_path / "good", container, labelled_files(3))
    result = run_cli("dataset", "check", good, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{good}: 3 images, 0 bad\n"
    result = run_cli("dataset", "check", good)  # with the progress bar (stderr)
    assert result.exit_code == 0 and result.stdout == f"{good}: 3 images, 0 bad\n" and "3/3" in result.stderr


def test_the_check_command_refuses_what_the_index_refuses(tmp_path):
    files = {**labelled_files(2), "dataset.json": '{"labels": [["a/img0.png", 1]]}'}
    path = make(tmp_path, "dir", files)
    result = run_cli("dataset", "check", path, "--no-progress")
    assert result.exit_code == 1  # the summary line still comes (issue 33), then the error
    assert result.stdout == f"{path}: 2 images, not checked one by one: the dataset as a whole is refused (below)\n"
    assert result.stderr == f"error: {path}/dataset.json: image 'b/img1.png' has no label (1 of 2 images have none)\n"
    result = run_cli("dataset", "check", path, "--no-labels", "--no-progress")  # labels not read
    assert result.exit_code == 0 and result.stdout == f"{path}: 2 images, 0 bad\n"


# ---- memory: the index of a large ZIP holds no pixels --------------------------------------------

def test_opening_a_zip_of_20000_images_allocates_no_pixel_array(tmp_path, monkeypatch):
    """20,000 images of 64x64 RGB pixels would be a 245,760,000-byte array; each file is a tiny flat PNG.
    Opening may cost the index (names, labels, the ZIP's directory entries: under 1 KiB per image) but
    nothing that grows with the pixels: the bound is 8 MiB + 2 KiB per image (47 MiB), under a fourth of the array.
    (Images of 8x8 would not tell the two apart: their array would be smaller than the ZIP's directory.)"""
    count = 20_000
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i // 1000:05d}/img{i:08d}.png", data)
    pixel_bytes = count * 3 * 64 * 64
    bound = 8 * 2**20 + 2 * 2**10 * count
    assert bound < pixel_bytes / 4
    calls = counting(monkeypatch)
    tracemalloc.start()
    try:
        ds = open_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == count and ds.shape == (3, 64, 64) and ds.label_source == CHUNK_FOLDERS_UNLABELLED
    assert calls["decode"] == 0 and calls["probe"] == 1
    assert peak < bound, f"opening allocated {peak:,} bytes at its peak"
    np.testing.assert_array_equal(ds.read(count - 1)[:, 0, 0], [10, 200, 30])
