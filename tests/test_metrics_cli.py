"""Reference statistics and streamed metrics (issue 14): `mpdiff ref`, `mpdiff metrics`, the .npz format."""

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from conftest import run_cli

from mpdiff import build_network
from mpdiff.config import NetworkConfig
from mpdiff.errors import MpdiffError
from mpdiff.metrics.compute import (
    DigitsDetector,
    accumulate,
    compute_metrics,
    load_reference,
    network_batches,
    parse_metrics,
    save_reference,
)
from mpdiff.metrics.detectors import Detector, FeatureStats


class Mean(Detector):
    """A cheap detector: per-channel means and a few pixels, so tests need no weights."""

    name, metric, feature_dim = "mean", "fd_digits", 4

    def preprocess(self, images):
        return images.float()

    def embed(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3)), x[:, 0, 0, 0], x[:, 0, -1, -1], x[:, 0, 3, 4]], dim=1)


def test_metrics_stream_generated_images_without_keeping_them():
    """A network's samples go through the detectors one batch at a time: at no point are more than two
    batches of images alive (the bound), whatever the number of images."""
    net = build_network(NetworkConfig(img_resolution=8, img_channels=1, label_dim=0, model_channels=8,
                                      channel_mult=(1, 2), num_blocks=1, attn_resolutions=()))
    alive, peak = [], [0]

    def watched(batches):
        for images in batches:
            alive.append(weakref.ref(images))
            gc.collect()
            peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
            yield images
            del images

    stats = accumulate(watched(network_batches(net, 300, batch_size=50, num_steps=2)), [Mean()])
    assert stats["fd_digits"].count == 300
    assert peak[0] <= 2  # the bound: the batch being measured and at most the one just finished
    bound_bytes = 2 * 50 * 1 * 8 * 8
    assert peak[0] * 50 * 64 <= bound_bytes


def test_reference_file_round_trip_and_edm_fid_files(tmp_path):
    rng = np.random.default_rng(0)
    stats = FeatureStats(4).add(rng.standard_normal((100, 4)))
    path = tmp_path / "ref.npz"
    save_reference(path, {"fd_digits": stats}, source="digits")
    loaded = load_reference(path)
    mu, sigma = stats.mean_cov()
    assert list(loaded) == ["fd_digits"]
    np.testing.assert_array_equal(loaded["fd_digits"][0], mu)
    np.testing.assert_array_equal(loaded["fd_digits"][1], sigma)
    edm = tmp_path / "fid-refs.npz"
    np.savez(edm, mu=np.zeros(3), sigma=np.eye(3))
    assert list(load_reference(edm)) == ["fid"]
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MpdiffError, match="broken.npz"):
        load_reference(broken)
    bad = tmp_path / "bad.npz"
    np.savez(bad, fid_mu=np.zeros(3), fid_sigma=np.eye(2))
    with pytest.raises(MpdiffError, match="shapes"):
        load_reference(bad)
    with pytest.raises(MpdiffError, match="no fid"):
        compute_metrics(iter(()), load_reference(path), ["fid"])


def test_parse_metrics_names_the_unknown():
    assert parse_metrics("fid, fd_dinov2,fid") == ("fid", "fd_dinov2")
    with pytest.raises(Exception, match="fd_inception"):
        parse_metrics("fid,fd_inception")


@pytest.mark.slow
def test_ref_and_metrics_commands_on_the_digits(tmp_path):
    ref = tmp_path / "digits-ref.npz"
    result = run_cli("ref", "digits", "--out", ref, "--metrics", "fd_digits", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "1,437 images" in result.output
    # The training digits against their own statistics: FD 0 (up to rounding).
    from mpdiff.data.digits import load_builtin_digits
    from mpdiff.metrics.compute import dataset_batches

    train = load_builtin_digits()["train_images"]
    same = compute_metrics(dataset_batches(train, 100), load_reference(ref), ["fd_digits"],
                           detectors=[DigitsDetector()])
    assert same["fd_digits"] < 1e-6 and same["num_images"] == 1437
    # A folder of images, and the refusals of the command line.
    from PIL import Image

    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(train[:20]):
        Image.fromarray(image[0]).save(folder / f"{i:03d}.png")
    shown = run_cli("metrics", "--images", folder, "--ref", ref, "--metrics", "fd_digits", "--json", "--no-progress")
    assert shown.exit_code == 0, shown.output
    assert '"num_images": 20' in shown.output
    both = run_cli("metrics", "--images", folder, "--net", folder, "--ref", ref)
    assert both.exit_code != 0 and "exactly one of --images" in both.output
    missing = run_cli("metrics", "--images", folder, "--ref", ref, "--metrics", "fid")
    assert missing.exit_code != 0 and "no fid" in missing.output



def test_ref_and_metrics_stream_a_folder_without_decoding_it_whole(tmp_path, monkeypatch):
    """`mpdiff ref` and `mpdiff metrics --images` read a folder or ZIP one batch at a time (open_dataset's
    index, then batches): never load(); a bad file met on the way stops them with its one line."""
    from conftest import pixels, png_bytes, write_files, write_zip

    from mpdiff.data import datasets
    from mpdiff.data.datasets import load_dataset, open_dataset
    from mpdiff.metrics import compute
    from mpdiff.metrics.compute import dataset_batches

    files = {f"{i:03d}.png": png_bytes(pixels(i, 8, 1)) for i in range(10)}
    folder, archive = write_files(tmp_path / "samples", files), write_zip(tmp_path / "samples.zip", files)
    whole = load_dataset(folder).images
    batches = list(dataset_batches(open_dataset(archive), 4))
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == torch.uint8 for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), whole)

    monkeypatch.setattr(compute, "make_detector", lambda *a, **k: Mean())
    monkeypatch.setattr(datasets.StreamedImageDataset, "load", lambda *a, **k: pytest.fail("decoded whole"))
    ref = tmp_path / "ref.npz"
    result = run_cli("ref", folder, "--out", ref, "--metrics", "fd_digits", "--batch", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "10 images" in result.output
    expected = accumulate(dataset_batches(whole, 5), [Mean()])["fd_digits"].mean_cov()
    np.testing.assert_allclose(load_reference(ref)["fd_digits"][0], expected[0])
    shown = run_cli("metrics", "--images", archive, "--ref", ref, "--metrics", "fd_digits", "--batch", "4", "--json",
                    "--no-progress")
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.output)
    assert result["num_images"] == 10 and abs(result["fd_digits"]) < 1e-6  # the same images: distance 0

    (folder / "005.png").write_bytes(b"damaged")
    result = run_cli("ref", folder, "--out", tmp_path / "again.npz", "--metrics", "fd_digits", "--no-progress")
    assert result.exit_code == 1 and not (tmp_path / "again.npz").exists()
    assert result.stderr == (f"error: {folder}/005.png: cannot read image (not a PNG, JPEG, BMP or WebP image, or its "
                             f"header is damaged)\n")
