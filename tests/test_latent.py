"""Latent diffusion as in the paper (issue 17, SPEC §7.1-7.4): latent datasets, the latent encoder, the
Stable Diffusion VAE (here a tiny randomly initialised AutoencoderKL saved in diffusers format), and
convert -> encode -> train -> generate end to end. Everything offline; the tests that need diffusers
skip without it."""

import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import evil_pickle, pixels, png_bytes, run_cli, tiny_run_flags, train_tiny, write_files, write_zip

from mpdiff.data.datasets import open_dataset
from mpdiff.data.latents import (
    RAW_MEAN,
    RAW_STD,
    LatentEncoder,
    encoder_for,
    latent_entry_name,
    npy_bytes,
)
from mpdiff.data.pixels import PixelEncoder
from mpdiff.errors import ConfigError, DatasetError
from mpdiff.train.data_order import derived_seed

EPS32 = torch.finfo(torch.float32).eps


def latent(seed, side=8):
    """A plausible stored latent: float32 [8, side, side], means around RAW_MEAN, standard deviations > 0."""
    rs = np.random.RandomState(seed)
    mean = np.array(RAW_MEAN, np.float32)[:, None, None] + rs.randn(4, side, side).astype(np.float32) * 3
    std = rs.uniform(0.01, 0.2, (4, side, side)).astype(np.float32)
    return np.concatenate([mean, std])


def latent_files(count, side=8, classes=None):
    """{EDM2 latent name: .npy bytes} and, with `classes`, a dataset.json labelling them."""
    files = {latent_entry_name(i): npy_bytes(latent(i, side)) for i in range(count)}
    if classes is not None:
        files["dataset.json"] = json.dumps({"labels": [[latent_entry_name(i), classes[i]] for i in range(count)]})
    return files


def one_line(text):
    return "\n" not in str(text).strip()


# ---- the normalisation (SPEC §7.1) ------------------------------------------------------------------

def test_the_normalisation_and_its_inverse_agree_to_float32_rounding():
    """encode with std 0 then denormalize gives back the mean. Tolerance: each element within
    4 float32 ulps of the larger of |mean| and |raw_mean| (a subtraction, two multiplications by constants
    that are themselves rounded, and an addition: each rounds by at most half an ulp of that size)."""
    encoder = LatentEncoder()
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor(RAW_MEAN).reshape(1, 4, 1, 1) + torch.randn(64, 4, 16, 16, generator=generator) * 10
    batch = torch.cat([mean, torch.zeros_like(mean)], dim=1)
    x = encoder.encode(batch, generator=generator)
    back = encoder.denormalize(x)
    scale = torch.maximum(mean.abs(), torch.tensor(RAW_MEAN).abs().reshape(1, 4, 1, 1))
    assert ((back - mean).abs() <= 4 * EPS32 * scale).all()
    y = torch.randn(8, 4, 8, 8, generator=generator)
    assert ((encoder.normalize(encoder.denormalize(y)) - y).abs() <= 4 * EPS32 * (y.abs() + 4)).all()
    # the constants standardise: data with the raw statistics comes out with mean 0 and std 0.5 per channel
    raw = torch.tensor(RAW_MEAN).reshape(1, 4, 1, 1) + torch.tensor(RAW_STD).reshape(1, 4, 1, 1) * \
        torch.randn(256, 4, 16, 16, generator=generator)
    normalized = encoder.normalize(raw)
    assert torch.allclose(normalized.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.01)
    assert torch.allclose(normalized.std(dim=(0, 2, 3)), torch.full((4,), 0.5), atol=0.01)


def test_the_stored_mean_and_std_are_sampled_as_mean_plus_std_eps():
    encoder = LatentEncoder()
    stored = torch.from_numpy(np.stack([latent(i) for i in range(5)]))
    mean, std = stored[:, :4], stored[:, 4:]
    got = encoder.encode(stored, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    mean_t, std_t = torch.tensor(RAW_MEAN).reshape(1, 4, 1, 1), torch.tensor(RAW_STD).reshape(1, 4, 1, 1)
    expected = (mean + std * eps - mean_t) * (0.5 / std_t)
    assert got.shape == (5, 4, 8, 8) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=0, atol=8 * EPS32 * 10)
    assert torch.equal(got, encoder.encode(stored, eps=eps))  # the same eps given, not drawn
    other = encoder.encode(stored, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(got, other)  # a fresh sample for other noise
    assert torch.equal(encoder.encode(torch.cat([mean, torch.zeros_like(std)], 1), eps=eps),
                       encoder.encode(torch.cat([mean, torch.zeros_like(std)], 1), eps=-eps))  # std 0: the mean
    with pytest.raises(ValueError, match=r"latent batches are float32 \[N, 8, h, w\]"):
        encoder.encode(stored[:, :4])


def test_encoders_by_channel_count_and_the_network_channels():
    assert isinstance(encoder_for(8), LatentEncoder) and encoder_for(8).channels(8) == 4
    assert isinstance(encoder_for(3), PixelEncoder) and encoder_for(3).channels(3) == 3
    assert encoder_for(1).channels(1) == 1
    for channels in (2, 4):
        with pytest.raises(ConfigError, match=f"a dataset of {channels}-channel data has no encoder"):
            encoder_for(channels)
    with pytest.raises(ConfigError, match=r"vae is for latent datasets"):
        encoder_for(3, vae="somewhere")
    assert not LatentEncoder().can_decode and LatentEncoder("somewhere").can_decode


def test_a_training_step_draws_the_latent_eps_from_seed_and_image_count():
    from mpdiff.config import TrainingConfig
    from mpdiff.train.step import TrainStep

    stored = torch.from_numpy(np.stack([latent(i) for i in range(6)]))
    training = TrainingConfig(batch=4, duration=8)
    step = TrainStep(stored, None, training, seed=3, encoder=LatentEncoder())
    assert step.shape == (4, 8, 8)
    _, _, noise = step.draw(4)
    assert noise.shape == (4, 4, 8, 8)  # the network's channels, not the data's
    eps = step.encoding_noise(4)
    # Image j of the step at 4 images draws from its own generator, seeded by (seed, 'latent', 4, j).
    expected = torch.stack([torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(
        derived_seed(3, "latent", 4, j))) for j in range(4)])
    assert torch.equal(eps, expected) and torch.equal(step.encoding_noise(4), eps)
    assert not torch.equal(step.encoding_noise(8), eps)
    pixel_step = TrainStep(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), None, training, seed=3)
    assert pixel_step.encoding_noise(4) is None and pixel_step.shape == (3, 8, 8)


# ---- latent datasets ----------------------------------------------------------------------------------

def test_a_latent_zip_opens_like_an_image_dataset(tmp_path):
    write_zip(tmp_path / "lat.zip", latent_files(5, classes=[0, 2, 1, 2, 0]))
    ds = open_dataset(tmp_path / "lat.zip", progress=False)
    assert ds.latent and ds.dtype == np.float32 and ds.shape == (8, 8, 8)
    assert (ds.channels, ds.resolution, len(ds), ds.num_classes) == (8, 8, 5, 3)
    assert ds.labels.tolist() == [0, 2, 1, 2, 0] and ds.label_source == "dataset.json"
    assert np.array_equal(ds.read(3), latent(3)) and ds.read(3).dtype == np.float32
    batches = list(ds.batches(2))
    assert [b.shape for b in batches] == [(2, 8, 8, 8), (2, 8, 8, 8), (1, 8, 8, 8)] and batches[0].dtype == np.float32
    assert ds.check(False) == []
    write_files(tmp_path / "folder", latent_files(3))
    folder = open_dataset(tmp_path / "folder", progress=False)
    assert folder.latent and folder.labels is None and np.array_equal(folder.read(2), latent(2))
    with pytest.raises(DatasetError, match=r"a latent dataset \(\.npy files\) is read file by file"):
        folder.load()


def test_damaged_latents_give_one_line_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    pickled = io.BytesIO()
    np.save(pickled, np.array([evil_pickle(marker)] * 8, dtype=object), allow_pickle=True)
    nan = latent(4)
    nan[0, 0, 0] = np.nan
    cases = {
        "truncated": (npy_bytes(latent(1))[:-5], "cannot read latent, not a valid .npy file (EOF"),
        "not npy": (b"this is not an array", "cannot read latent, not a valid .npy file (the magic string"),
        "pickled": (pickled.getvalue(), "latent holds Python objects (a pickled array); refused"),
        "float64": (npy_bytes(latent(2)).replace(b"<f4", b"<f8"), "latent is f8 (float64), expected float32"),
        "shape": (npy_bytes(latent(3, side=16)), "latent is 8x16x16 but"),
        "4 channels": (npy_bytes(latent(3)[:4]), "latent has shape [4, 8, 8], expected [8, R, R]"),
        "nan": (npy_bytes(nan), "latent has 1 non-finite values"),
        "negative std": (npy_bytes(-latent(5)), "negative standard deviations"),
        "empty": (b"", "cannot read latent (empty file)"),
        "trailing": (npy_bytes(latent(6)) + b"xx", "2 bytes after the array"),
    }
    for kind, (data, expected) in cases.items():
        files = latent_files(4)
        bad = latent_entry_name(2)
        files[bad] = data
        write_zip(tmp_path / f"{kind}.zip", files)
        ds = open_dataset(tmp_path / f"{kind}.zip", progress=False)  # the first file is good: open succeeds
        with pytest.raises(DatasetError) as error:
            ds.read(2)
        message = str(error.value)
        assert one_line(message) and message.startswith(f"{tmp_path}/{kind}.zip/{bad}: ") and expected in message, kind
        assert ds.check(False) == [message]
        np.testing.assert_array_equal(ds.read(3), latent(3))
    assert not marker.exists()  # the pickle was never unpickled
    files = latent_files(2)
    files[latent_entry_name(0)] = b"garbage"
    write_zip(tmp_path / "first.zip", files)
    with pytest.raises(DatasetError, match=r"first\.zip/00000/img-mean-std-00000000\.npy: cannot read latent"):
        open_dataset(tmp_path / "first.zip", progress=False)


def test_images_and_latents_in_one_dataset_are_refused(tmp_path):
    files = latent_files(2)
    files["x.png"] = png_bytes(pixels(0, 8))
    write_files(tmp_path / "mixed", files)
    with pytest.raises(DatasetError, match=r"img-mean-std-00000000\.npy is a latent \(\.npy\) but .*x\.png is an image; "
                                           r"a dataset holds images or latents, not both"):
        open_dataset(tmp_path / "mixed", progress=False)
    from mpdiff.data.convert import convert_dataset

    write_files(tmp_path / "lat", latent_files(2))
    with pytest.raises(DatasetError, match=r"holds latents \(\.npy files\); convert takes images"):
        convert_dataset(tmp_path / "lat", tmp_path / "out", progress=False)


def test_training_on_latents_needs_no_vae_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Without diffusers at all: the run trains on a latent ZIP (4-channel network), records its encoder,
    draws no grid, and a sliced run repeats the uninterrupted one exactly (the sample noise comes from
    (seed, image count))."""
    from safetensors.torch import load_file

    monkeypatch.setitem(sys.modules, "diffusers", None)
    write_zip(tmp_path / "lat.zip", latent_files(8, classes=[0, 1] * 4))
    whole = train_tiny(tmp_path / "whole", dataset=str(tmp_path / "lat.zip"), duration=128, dynamics=False)
    assert whole.resolved.network.img_channels == 4 and whole.resolved.network.label_dim == 2
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["encoder"]["name"] == "stability-vae" and config["encoder"]["raw_mean"] == list(RAW_MEAN)
    assert config["encoder"]["raw_std"] == list(RAW_STD) and config["run"]["vae"] is None
    log = (tmp_path / "whole" / "log.txt").read_text()
    assert "no sample grids: this latent run has no VAE to decode them (--vae DIR)" in log
    assert "(no final grid: no --vae to decode latents)" in log and not (tmp_path / "whole" / "samples").exists()
    train_tiny(tmp_path / "sliced", dataset=str(tmp_path / "lat.zip"), duration=128, slice_nimg=64, dynamics=False)
    train_tiny(tmp_path / "sliced", dataset=str(tmp_path / "lat.zip"), duration=128, dynamics=False)
    name = "checkpoints/training-state-000000000128.safetensors"
    a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "sliced" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_diffusers_encode_says_how_to_install_and_pixel_training_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    write_files(tmp_path / "img", {f"{i}.png": png_bytes(pixels(i, 32)) for i in range(2)})
    result = run_cli("dataset", "encode", tmp_path / "img", tmp_path / "lat.zip", "--vae", tmp_path / "vae",
                     "--no-progress")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: mpdiff dataset encode needs the diffusers package")
    assert result.output.rstrip().endswith('pip install "mpdiff[latent]"')
    assert not (tmp_path / "lat.zip").exists()
    trained = run_cli("train", "--run-dir", tmp_path / "run", *tiny_run_flags(duration=64), "--no-final-grid")
    assert trained.exit_code == 0, trained.output
    assert "done: " in trained.output


# ---- with a tiny Stable-Diffusion-shaped VAE ---------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL with the SD VAE's shape (4 blocks: 3 halvings, 8x; 4 latent channels),
    saved in diffusers format."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latent_zip(vae_dir, tmp_path_factory):
    """convert (ADM crop to 64) -> encode (the command line) of a small class-per-folder tree of odd sizes
    and modes; (image zip, latent zip)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("latents")
    rs = np.random.RandomState(0)
    files = {}
    for i, (height, width) in enumerate([(70, 90), (65, 64), (130, 97), (64, 64), (99, 150), (81, 80)]):
        cls = ("n01440764", "n01443537")[i % 2]
        files[f"{cls}/{i}.JPEG" if i == 2 else f"{cls}/{i}.png"] = png_bytes(
            rs.randint(0, 256, (height, width, 3), dtype=np.uint8), fmt="JPEG" if i == 2 else "PNG")
    gray = Image.fromarray(rs.randint(0, 256, (72, 66), dtype=np.uint8), "L")  # grayscale among RGB
    buffer = io.BytesIO()
    gray.save(buffer, "PNG")
    files["n01443537/gray.png"] = buffer.getvalue()
    write_files(root / "train", files)
    converted = run_cli("dataset", "convert", root / "train", root / "img.zip", "--resolution", "64", "--transform",
                        "center-crop-dhariwal", "--no-progress")
    assert converted.exit_code == 0, converted.output
    encoded = run_cli("dataset", "encode", root / "img.zip", root / "lat.zip", "--vae", vae_dir, "--batch", "3",
                      "--no-progress")
    assert encoded.exit_code == 0, encoded.output
    assert encoded.output == (f"wrote 7 latents (8x8x8 float32: 4 means, 4 standard deviations, of 64x64 images; "
                              f"2 classes) to {root}/lat.zip\n")
    return root / "img.zip", root / "lat.zip"


def test_encode_stores_the_vae_mean_and_std_of_pixels_in_0_1(vae_dir, latent_zip):
    from mpdiff.data.latents import load_vae

    images, latents = (open_dataset(path, progress=False) for path in latent_zip)
    assert latents.latent and latents.shape == (8, 8, 8) and len(latents) == len(images) == 7
    assert latents.labels.tolist() == images.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    with zipfile.ZipFile(latent_zip[1]) as archive:
        names = archive.namelist()
        assert names == [latent_entry_name(i) for i in range(7)] + ["dataset.json"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    vae = load_vae(vae_dir)
    x = torch.from_numpy(images.read(4)).float()[None] / 255  # the VAE sees [0, 1]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    expected = torch.cat([dist.mean, dist.std], 1)[0]
    got = torch.from_numpy(latents.read(4))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)  # batch 3 vs 1: float rounding only


def test_decode_runs_the_vae_in_small_batches_and_rounds_to_uint8(vae_dir):
    from mpdiff.data.latents import load_vae

    vae = load_vae(vae_dir)
    x = torch.randn(7, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    small, whole = LatentEncoder(vae, batch_size=3), LatentEncoder(vae, batch_size=7)
    images = small.decode(x)
    assert images.shape == (7, 3, 64, 64) and images.dtype == torch.uint8
    with torch.no_grad():
        reference = (vae.decode(small.denormalize(x)).sample.clamp(0, 1) * 255).round().to(torch.uint8)
    assert (images.int() - reference.int()).abs().max() <= 1  # batch composition: float rounding only
    assert torch.equal(whole.decode(x), reference)
    lazy = LatentEncoder(vae_dir)  # a folder: loaded on the first decode
    assert lazy._vae is None and lazy.decode(x[:2]).shape == (2, 3, 64, 64) and lazy._vae is not None


def test_convert_encode_train_generate_end_to_end(vae_dir, latent_zip, tmp_path):
    run = tmp_path / "run"
    trained = run_cli("train", "--data", latent_zip[1], "--run-dir", run, "--vae", vae_dir,
                      *tiny_run_flags(duration=128, dynamics=True))
    assert trained.exit_code == 0, trained.output
    assert f"done: {run} (samples: {run}/samples/grid-final.png)" in trained.output
    config = json.loads((run / "config.json").read_text())
    assert config["network"]["img_channels"] == 4 and config["dataset"]["channels"] == 8
    assert config["encoder"]["name"] == "stability-vae" and config["run"]["vae"] == str(vae_dir)
    from PIL import Image

    with Image.open(run / "samples" / "grid-final.png") as grid:
        assert grid.mode == "RGB" and min(grid.size) >= 64  # tiles of decoded 64x64 images
    out = tmp_path / "samples"
    generated = run_cli("generate", run, "--seeds", "0-4", "--out", out, "--steps", "2", "--batch", "3",
                        "--no-progress")  # the VAE folder comes from the run's config.json
    assert generated.exit_code == 0, generated.output
    assert "decoder: latents decoded with the Stable Diffusion VAE in" in generated.output
    ds = open_dataset(out, progress=False)
    assert len(ds) == 5 and ds.shape == (3, 64, 64) and not ds.latent
    # the same network as a plain state_dict in NVIDIA's layout (as load_edm2 takes the released img512
    # networks): no run config, so --vae is needed, and it gives the same pixels
    from mpdiff.loading import resolve_network

    net, _ = resolve_network(run)
    torch.save(net.state_dict(), tmp_path / "edm2.pt")
    refused = run_cli("generate", tmp_path / "edm2.pt", "--seeds", "0-4", "--out", tmp_path / "nv", "--steps", "2")
    assert refused.exit_code == 1 and "makes 4-channel latents of the Stable Diffusion VAE; to decode them, download " \
        "stabilityai/sd-vae-ft-mse" in refused.output and refused.output.count("\n") <= 3
    nvidia = run_cli("generate", tmp_path / "edm2.pt", "--seeds", "0-4", "--out", tmp_path / "nv", "--steps", "2",
                     "--vae", vae_dir, "--no-progress")
    assert nvidia.exit_code == 0, nvidia.output
    assert np.array_equal(open_dataset(tmp_path / "nv", progress=False).read(3), ds.read(3))
    # an EMA sweep of the run decodes its samples with the run's VAE: grids of 64x64 RGB pixels
    swept = run_cli("ema-sweep", run, "--sigma-rel", "0.1", "--seeds", "0-1", "--steps", "2", "--no-progress")
    assert swept.exit_code == 0, swept.output
    with Image.open(run / "ema-sweep" / "grid-0.100.png") as grid:
        assert grid.mode == "RGB" and min(grid.size) >= 64


def test_metrics_of_a_latent_network_are_measured_on_decoded_pixels(vae_dir, latent_zip, tmp_path, monkeypatch):
    from mpdiff.metrics import compute
    from mpdiff.metrics.detectors import Detector

    seen = []

    class Shapes(Detector):
        name, metric, feature_dim = "shapes", "fid", 2

        def preprocess(self, images):
            seen.append(tuple(images.shape[1:]))
            return images.float()

        def embed(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)), x[:, 1].std(dim=(1, 2))], dim=1)

    train_tiny(tmp_path / "run", dataset=str(latent_zip[1]), duration=64, final_grid=False, dynamics=False)
    monkeypatch.setattr(compute, "make_detector", lambda metric, device="cpu", dinov2=None: Shapes())
    compute.save_reference(tmp_path / "ref.npz", {"fid": _stats([[1.0, 2.0], [3.0, 1.0], [2.0, 5.0]])})
    without = run_cli("metrics", "--net", tmp_path / "run", "--ref", tmp_path / "ref.npz", "--num", "3", "--steps", "2")
    assert without.exit_code == 1 and "to decode them, download stabilityai/sd-vae-ft-mse" in without.output
    result = run_cli("metrics", "--net", tmp_path / "run", "--ref", tmp_path / "ref.npz", "--num", "3", "--batch", "2",
                     "--steps", "2", "--vae", vae_dir, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {(3, 64, 64)}, (seen, result.output)  # decoded RGB, never latents
    assert json.loads(result.output[result.output.index("{"):])["num_images"] == 3


def _stats(rows):
    from mpdiff.metrics.detectors import FeatureStats

    stats = FeatureStats(len(rows[0]))
    stats.add(np.array(rows, dtype=np.float64))
    return stats


def test_bad_vae_folders_and_options_are_one_line(vae_dir, tmp_path):
    write_files(tmp_path / "img", {f"{i}.png": png_bytes(pixels(i, 32)) for i in range(2)})
    write_files(tmp_path / "notvae", {"config.json": json.dumps({"_class_name": "UNet2DModel"})})
    write_files(tmp_path / "small", {"a.png": png_bytes(pixels(0, 16))})
    write_zip(tmp_path / "lat.zip", latent_files(2))
    cases = [
        (["dataset", "encode", tmp_path / "img", tmp_path / "o1.zip", "--vae", tmp_path / "absent"],
         "VAE folder " + str(tmp_path / "absent") + ": no such folder; download stabilityai/sd-vae-ft-mse"),
        (["dataset", "encode", tmp_path / "img", tmp_path / "o2.zip", "--vae", tmp_path / "notvae"],
         "config.json describes UNet2DModel, not an AutoencoderKL"),
        (["dataset", "encode", tmp_path / "small", tmp_path / "o3.zip", "--vae", vae_dir],
         "images are 16x16 with 3 channel(s); the VAE needs RGB or grayscale images whose side is a multiple of 8 of "
         "at least 32"),
        (["dataset", "encode", tmp_path / "lat.zip", tmp_path / "o4.zip", "--vae", vae_dir],
         "holds latents (.npy files) already; encode takes images"),
        (["train", "--run-dir", tmp_path / "r", "--vae", vae_dir, *tiny_run_flags(duration=64)],
         "--vae is for latent datasets (8-channel .npy files); this dataset has 1-channel images"),
    ]
    for args, expected in cases:
        result = run_cli(*args, "--no-progress")
        assert result.exit_code == 1 and result.output.count("\n") == 1, (args, result.output)
        assert result.output.startswith("error: ") and expected in result.output, (expected, result.output)
    assert sorted(os.listdir(tmp_path)) == ["img", "lat.zip", "notvae", "small"]


def test_reference_statistics_of_latents_are_refused_in_one_line(tmp_path):
    write_zip(tmp_path / "lat.zip", latent_files(3))
    result = run_cli("ref", tmp_path / "lat.zip", "--out", tmp_path / "ref.npz")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"{tmp_path / 'lat.zip'}: holds latents of the Stable Diffusion VAE, not images" in result.output
    assert not (tmp_path / "ref.npz").exists()
