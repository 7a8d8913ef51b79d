"""Fixtures and helpers shared by the test files.

* Nothing a test does may write outside temporary folders: the digit classifier cache, matplotlib's
  and hypothesis' files go to one session temporary folder, and every test runs in its tmp_path.
* One tiny network config (:func:`tiny_config`) for tests of the network itself, one tiny training
  run (:data:`TINY_RUN`) that both the library and the command line can express, and one copy of
  its first half (:func:`partial_run`) that the resume, damage and post-hoc EMA tests read or copy.
"""

import contextlib
import hashlib
import io
import os
import pathlib
import pickle
import shlex
import shutil
import signal
import zipfile

# One BLAS thread per test process too, set before numpy loads its BLAS: the two xdist workers share the two
# cores, and two threads each spin-wait on each other (a 2048-d Fréchet test took 134 s with two, 16 s with one).
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # (torch's threads: below)
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import pytest
import torch

# One thread: the networks here are tiny, and OpenMP threads spin-wait when other processes load the
# cores (on a loaded 2-core machine a tiny_config forward took 2-4 s with 2 threads, 0.03 s with 1).
torch.set_num_threads(1)

# The live comparison with a checkout of NVIDIA's code is an extra for whoever has one; without it the file
# is not collected (rather than reported as skipped): tests/test_ref_edm2.py's fixtures cover the same ground.
collect_ignore = [] if os.environ.get("MPDIFF_EDM2_REF") else ["test_reference_edm2.py"]

# The files whose tests take longest (measured on the 2-core machine: 35-70 s each for the longest), run first.
# Under xdist's work stealing the long tests then start at once and the short ones fill in around them,
# instead of one long test running alone at the end while the other worker idles.
_LONGEST_FIRST = ("test_kill.py", "test_speed.py", "test_mnist_eval.py", "test_distributed.py", "test_generation.py",
                  "test_streamed_training.py", "test_training.py", "test_metrics.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _caches_in_a_temporary_folder(tmp_path_factory):
    """The digit classifier (MPDIFF_CACHE, else ~/.cache/mpdiff), matplotlib's font cache and config
    (MPLCONFIGDIR, else ~/.cache/matplotlib and ~/.config/matplotlib) and hypothesis' storage (else
    ./.hypothesis in the working directory at import, the repository) go to a session temporary folder.
    Subprocesses inherit the variables."""
    root = tmp_path_factory.mktemp("caches")
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # pragma: no cover - hypothesis is a test dependency
        set_hypothesis_home_dir = None
    if set_hypothesis_home_dir is not None:
        set_hypothesis_home_dir(root / "hypothesis")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MPDIFF_CACHE", str(root / "mpdiff"))
        env.setenv("MPLCONFIGDIR", str(root / "matplotlib"))
        env.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))
        env.setenv("XDG_CONFIG_HOME", str(root / "xdg-config"))
        env.setenv("TORCH_HOME", str(root / "torch"))
        env.setenv("OMP_NUM_THREADS", "1")  # for commands run as subprocesses, as torch above
        yield root
    if set_hypothesis_home_dir is not None:
        set_hypothesis_home_dir(None)


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own empty working directory, so that a relative path (a command's
    default run directory runs/<preset>, an output next to the input) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


# ---- networks ---------------------------------------------------------------------------------

def tiny_config(**changes):
    """A small config-G network that exercises every block type (down/up, attention, skips)."""
    from mpdiff.config import NetworkConfig
    base = NetworkConfig(img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                         channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8, 4),
                         channels_per_head=16, use_fp16=False)
    return base.replace(**changes)


def randomized_network(seed=0, **changes):
    """build_network(tiny_config(**changes)) with its scalar gains drawn from [0.2, 0.5]. At initialisation
    the output and embedding gains are zero and the network returns c_skip * x whatever its labels; with
    these gains its output depends on every input and stays of moderate size."""
    from mpdiff import build_network
    net = build_network(tiny_config(**changes))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.2 + 0.3 * torch.rand([], generator=generator).item())
    return net


# ---- the tiny training run ----------------------------------------------------------------------

# The digits preset made small, as overrides per config section. The command line can say all of it
# (tiny_run_flags), so a run made by either resumes with the other. 512 images in 8 steps of 64;
# checkpoints at 128, 256, 384, 512; snapshots and stats rows every 64 images.
TINY_RUN = dict(
    network=dict(model_channels=16),
    training=dict(batch=64, duration=512),
    cadence=dict(status_nimg=64, snapshot_nimg=64, checkpoint_nimg=128),
    run=dict(max_nonfinite_steps=2, progress=False, tensorboard=False),
)


def train_tiny(run_dir, **fields):
    """mpdiff.train.loop.train on TINY_RUN with `fields` (of any config class) changed, and sample grids
    with 2 sampler steps. Returns the Trainer."""
    from mpdiff.config import (
        Cadence,
        NetworkConfig,
        RunOptions,
        TrainingConfig,
        field_info,
    )
    from mpdiff.train.loop import train
    sections = {NetworkConfig: "network", TrainingConfig: "training", Cadence: "cadence", RunOptions: "run"}
    overrides = {section: dict(values) for section, values in TINY_RUN.items()}
    overrides["run"]["grid_steps"] = 2
    for name, value in fields.items():
        overrides[sections[field_info(name)[0]]][name] = value
    options = RunOptions(**overrides["run"], run_dir=os.fspath(run_dir))
    return train("digits", options, network=overrides["network"], training=overrides["training"],
                 cadence=overrides["cadence"])


def tiny_run_flags(**changes):
    """`mpdiff train` options for TINY_RUN (with config-field `changes`), from the flags mpdiff.config declares."""
    from mpdiff.config import field_info
    values = {name: value for section in TINY_RUN.values() for name, value in section.items()}
    values.update(changes)
    args = []
    for name, value in values.items():
        flag = field_info(name)[1].metadata["flag"]
        if "/" in flag:  # --progress/--no-progress
            args.append(flag.split("/")[0 if value else 1])
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


@pytest.fixture(scope="session")
def partial_run(tmp_path_factory):
    """The first half of TINY_RUN (checkpoints at 128 and 256 images, snapshots every 64). Read it; to
    change or resume it, use `run_copy`."""
    run_dir = tmp_path_factory.mktemp("partial") / "run"
    train_tiny(run_dir, slice_nimg=256)
    return run_dir


@pytest.fixture
def run_copy(partial_run, tmp_path):
    """A resumable copy of partial_run as the relative path "run" (tmp_path is the working directory)."""
    import pathlib
    assert os.path.samefile(os.getcwd(), tmp_path)
    shutil.copytree(partial_run, "run")
    return pathlib.Path("run")


@pytest.fixture(scope="session")
def other_run(tmp_path_factory):
    """A run of another architecture (8 base channels instead of 16): 128 images, one checkpoint."""
    run_dir = tmp_path_factory.mktemp("other") / "run"
    train_tiny(run_dir, model_channels=8, slice_nimg=128)
    return run_dir


def ckpt(run_dir, nimg):
    return os.path.join(run_dir, "checkpoints", f"training-state-{nimg:012d}.safetensors")


def snap(run_dir, nimg, sigma_rel):
    return os.path.join(run_dir, "snapshots", f"ema-{nimg:012d}-{sigma_rel:.3f}.safetensors")


def digests(directory):
    """{relative path: sha256} of every file under `directory`, except the run directory's lock file
    (whoever takes the lock writes their pid into it, even a command that is then refused)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name == ".mpdiff.lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---- image files and hostile input ------------------------------------------------------------------

def pixels(seed, size=8, channels=3):
    """Random uint8 pixels [size, size] (channels 1) or [size, size, channels], the same for the same seed."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def write_files(root, files):
    """Write {relative posix path: bytes or str} under `root` (a path or a string); returns `root`."""
    for name, content in files.items():
        path = pathlib.Path(root, *name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def write_zip(path, files, compression=zipfile.ZIP_STORED):
    """A ZIP of {member name: bytes or str}; returns `path`."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


def png_bytes(array, mode=None, fmt="PNG", **save_args):
    """The bytes of an image file (PNG unless `fmt` says otherwise) holding `array`."""
    from PIL import Image
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


class Payload:
    """A pickle that runs a shell command when unpickled (what a hostile checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def evil_pickle(marker, protocol=pickle.HIGHEST_PROTOCOL):
    return pickle.dumps(Payload(marker), protocol=protocol)


# ---- the command line ---------------------------------------------------------------------------

def _argv(arg):
    """One command-line argument as sys.argv would hold it: a path as text, bytes (an undecodable name) as the
    surrogate-escaped text Python gives a real process for them."""
    if isinstance(arg, (bytes, os.PathLike)):
        return os.fsdecode(arg)
    return str(arg)


def patch_training_loss(monkeypatch, change):
    """Make the training step's loss (and only it: not edm2_loss elsewhere) return change(loss, *args,
    **kwargs), where loss(*args, **kwargs) computes the real one."""
    import mpdiff.train.step as step
    real = step.EDM2Loss

    class Changed(real):
        def __call__(self, *args, **kwargs):
            return change(lambda *a, **k: real.__call__(self, *a, **k), *args, **kwargs)

    monkeypatch.setattr(step, "EDM2Loss", Changed)


def run_cli(*args, env=None):
    """Run `mpdiff ARGS...` in this process (click's test runner); returns the click Result. Arguments may be
    text, paths or bytes. Its stdout is strict UTF-8 and its stderr escapes what it cannot encode, as a real
    process's under a UTF-8 locale."""
    from click.testing import CliRunner

    from mpdiff.cli import cli
    return CliRunner().invoke(cli, [_argv(a) for a in args], env=env)


class Stuck(BaseException):
    """Raised by :func:`deadline`. Not an Exception, so that no `except Exception` in mpdiff or click turns it
    into an error line or exit status: it always reaches the test and fails it."""


@contextlib.contextmanager
def deadline(seconds, what):
    """Fail the test, instead of hanging the suite, when the block (a command run in this process that might
    block on a FIFO or loop on a symlink) is still running after `seconds`.

    SIGALRM interrupts a blocked system call such as open() of a FIFO, and Python then raises :class:`Stuck`
    from it. A blocking call that retries after the signal (in C or Rust code) cannot be interrupted that way:
    `faulthandler` then ends the whole test process with a traceback 30 seconds later. Main thread only."""
    import faulthandler

    def alarm(signum, frame):
        raise Stuck(f"{what}: still running after {seconds} s (blocked, or looping)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    faulthandler.dump_traceback_later(seconds + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
