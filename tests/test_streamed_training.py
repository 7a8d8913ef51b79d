"""Training on a folder or ZIP streams it (issue 16): memory bounded by the batches in flight, the first
step within seconds, the same run as from memory, and a bad file met mid-run stops with its line and a
checkpoint of the last good state."""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import torch
from conftest import ckpt, run_cli, tiny_run_flags
from PIL import Image

from mpdiff.storage.tensors import load_tensors

TIMEOUT = 300
FLAGS = tiny_run_flags(duration=128, checkpoint_nimg=64, status_nimg=64) + ["--no-dynamics", "--no-final-grid"]


def png(seed, size=32):
    array = np.random.RandomState(seed % 997).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_zip(path, count, bad=None):
    """`count` 32x32 RGB PNGs (997 distinct ones, repeated) in a stored ZIP; `bad`: {index: bytes}."""
    tiles = [png(i) for i in range(997)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(count):
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", (bad or {}).get(i, tiles[i % 997]))
    return path


def peak_rss_mib(run_dir, data, *extra):
    """Run the training and return (exit status, stderr, peak RSS of the training process in MiB)."""
    proc = subprocess.Popen([sys.executable, "-m", "mpdiff", "train", *FLAGS, "--data", str(data),
                             "--run-dir", str(run_dir), "--data-workers", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err.decode(), usage.ru_maxrss / 1024  # Linux: KiB


def test_training_memory_does_not_grow_with_the_dataset(tmp_path):
    # 5,000 and 50,000 images of 32x32x3: decoded, 15 MiB and 146 MiB. Streamed, the training process
    # holds the index (names and labels) and the batches in flight. The bound: the 50,000-image run's
    # peak RSS exceeds the 5,000-image run's by less than 66 MiB (the zipfile index of 45,000 more
    # entries is ~30 MiB; decoding the extra images would add 132 MiB). Separate processes: peak RSS.
    small, big = write_zip(tmp_path / "small.zip", 5_000), write_zip(tmp_path / "big.zip", 50_000)
    code, err, rss_small = peak_rss_mib(tmp_path / "run-small", small)
    assert code == 0, err[-3000:]
    code, err, rss_big = peak_rss_mib(tmp_path / "run-big", big)
    assert code == 0, err[-3000:]
    assert "50,000 images" in err
    assert rss_big - rss_small < 66, (rss_small, rss_big)


def test_streamed_training_equals_training_from_memory(tmp_path):
    # The same ZIP, streamed by 2 worker processes and loaded whole into memory (the in-memory feed,
    # forced by opening the ZIP as a loaded dataset): bit for bit the same weights.
    from mpdiff.data.datasets import load_dataset
    from mpdiff.train import loop

    data = write_zip(tmp_path / "d.zip", 300)
    streamed = subprocess.run([sys.executable, "-m", "mpdiff", "train", *FLAGS, "--data", str(data), "--run-dir",
                               str(tmp_path / "streamed"), "--data-workers", "2"], capture_output=True,
                              timeout=TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert streamed.returncode == 0, streamed.stderr.decode()[-3000:]

    import mpdiff.train.run as run_module

    real_open = run_module.open_dataset
    run_module.open_dataset = lambda spec, *a, **k: load_dataset(spec, *a, **k)  # everything in memory
    try:
        from click.testing import CliRunner

        from mpdiff.cli import cli
        result = CliRunner().invoke(cli, ["train", *FLAGS, "--data", str(data), "--run-dir", str(tmp_path / "memory")])
        assert result.exit_code == 0, result.output
    finally:
        run_module.open_dataset = real_open
    del loop
    a, _ = load_tensors(ckpt(tmp_path / "streamed", 128))
    b, _ = load_tensors(ckpt(tmp_path / "memory", 128))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("net."))


def test_a_bad_file_met_mid_run_stops_with_its_line_and_keeps_the_last_good_state(tmp_path):
    # A truncated PNG that the second step's batch needs (and the first does not): the run stops with
    # one line naming it, after writing a checkpoint of the state before that step.
    from mpdiff.train.data_order import batch_indices

    first = set(batch_indices(0, 300, 0, 64))
    victim = next(i for i in batch_indices(0, 300, 64, 64) if i not in first)
    data = write_zip(tmp_path / "bad.zip", 300, bad={victim: png(victim)[:60]})
    result = run_cli("train", *FLAGS, "--checkpoint", "128", "--data", data, "--run-dir", tmp_path / "run")
    err = result.stderr
    # exit status 1 by the command's own error handling, not an exception escaping it
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and "Traceback" not in err, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"img{victim:08d}.png" in line[0] and "stopped at 64 images" in line[0], err[-2000:]
    assert os.path.exists(ckpt(tmp_path / "run", 64))  # the last good state (the cadence alone: only at 128)
