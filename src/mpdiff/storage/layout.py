"""The run directory: every path and file name that mpdiff writes into one, defined here only.

    RUN_DIR/
      config.json                                   resolved configuration (the resume contract)
      log.txt, stats.jsonl, tensorboard/            messages; one stats row per status interval
      checkpoints/training-state-<nimg>.safetensors weights, Adam, EMA averages, counters
      snapshots/ema-<nimg>-<sigma_rel>.safetensors  EMA snapshots (network files) for post-hoc EMA
      phema/phema-<nimg>-<sigma_rel>.safetensors    post-hoc EMA reconstructions (network files)
      ema-traditional.safetensors                   the latest traditional EMA, when one is tracked
      samples/grid-<kimg>.png, samples/grid-final.png
      phema/profile-<nimg>-<sigma_rel>.png          plot of a reconstructed EMA profile
      ema-sweep/                                    EMA-length sweep: networks/, table, plot

Times are image counts (``nimg``) written with 12 digits so that names sort by time; EMA lengths
are written with 3 decimals. Names are parsed with the patterns below, never by slicing, and a
name that does not match is not ours.
"""

import dataclasses
import errno
import os
import re
import stat

from mpdiff.errors import MpdiffError
from mpdiff.storage.files import kind_of, show_path, temporary_target

CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
SNAPSHOT_DIR = "snapshots"
PHEMA_DIR = "phema"
SAMPLES_DIR = "samples"
EMA_SWEEP_DIR = "ema-sweep"
PLOTS_DIR = "plots"                   # mpdiff plot-dynamics' default output folder
DYNAMICS_PLOT_FILES = ("dynamics-activations.png", "dynamics-weights.png", "dynamics-updates.png",
                       "dynamics-skips.png", "dynamics-stability.png")
TRADITIONAL_EMA_FILE = "ema-traditional.safetensors"
FINAL_GRID_FILE = "grid-final.png"

_GRID_NAME = re.compile(r"grid-(\d{7}|final)\.png")
_PROFILE_NAME = re.compile(r"profile-\d{12}-\d+\.\d{3,6}\.png")
_CHECKPOINT_NAME = re.compile(r"training-state-(\d{12})\.safetensors")
_SNAPSHOT_NAME = re.compile(r"ema-(\d{12})-(\d+\.\d{3})\.safetensors")
_PHEMA_NAME = re.compile(r"phema-(\d{12})-(\d+\.\d{3,6})\.safetensors")


def checkpoint_name(nimg):
    return f"training-state-{int(nimg):012d}.safetensors"


def snapshot_name(nimg, sigma_rel):
    return f"ema-{int(nimg):012d}-{float(sigma_rel):.3f}.safetensors"


def sigma_rel_text(sigma_rel):
    """An EMA length as a reconstruction's file name says it: 3 decimals (0.070), or up to 6 where 3 would
    name another length too (0.0704), so that two reconstructions never share a file."""
    short = f"{float(sigma_rel):.3f}"
    return short if float(short) == float(sigma_rel) else f"{float(sigma_rel):.6f}".rstrip("0")


def phema_name(nimg, sigma_rel):
    return f"phema-{int(nimg):012d}-{sigma_rel_text(sigma_rel)}.safetensors"


def profile_plot_name(nimg, sigma_rel):
    return f"profile-{int(nimg):012d}-{sigma_rel_text(sigma_rel)}.png"


def grid_name(nimg):
    return f"grid-{int(nimg) // 1000:07d}.png"


@dataclasses.dataclass(frozen=True)
class NetworkFileName:
    """What a snapshot or reconstruction file name says: its training time and EMA length."""
    nimg: int
    sigma_rel: float
    sigma_rel_text: str         # as written in the name (3 decimals; a reconstruction's up to 6), for exact comparisons


def parse_checkpoint_name(name):
    """nimg of a checkpoint file name, or None if the name is not one of ours."""
    match = _CHECKPOINT_NAME.fullmatch(os.path.basename(name))
    return int(match.group(1)) if match else None


def parse_snapshot_name(name):
    """:class:`NetworkFileName` of ``ema-<nimg>-<sigma_rel>.safetensors``, or None."""
    return _parse(_SNAPSHOT_NAME, name)


def parse_phema_name(name):
    """:class:`NetworkFileName` of ``phema-<nimg>-<sigma_rel>.safetensors``, or None."""
    return _parse(_PHEMA_NAME, name)


def _parse(pattern, name):
    match = pattern.fullmatch(os.path.basename(name))
    if not match:
        return None
    return NetworkFileName(int(match.group(1)), float(match.group(2)), match.group(2))


class RunLayout:
    """Paths inside one run directory."""

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        self.config = self.path(CONFIG_FILE)
        self.log = self.path(LOG_FILE)
        self.stats = self.path(STATS_FILE)
        self.tensorboard = self.path(TENSORBOARD_DIR)
        self.checkpoint_dir = self.path(CHECKPOINT_DIR)
        self.snapshot_dir = self.path(SNAPSHOT_DIR)
        self.phema_dir = self.path(PHEMA_DIR)
        self.samples_dir = self.path(SAMPLES_DIR)
        self.ema_sweep_dir = self.path(EMA_SWEEP_DIR)
        self.traditional_ema = self.path(TRADITIONAL_EMA_FILE)
        self.plots_dir = self.path(PLOTS_DIR)

    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def checkpoint(self, nimg):
        return self.path(CHECKPOINT_DIR, checkpoint_name(nimg))

    def profile_plot(self, nimg, sigma_rel):
        return self.path(PHEMA_DIR, profile_plot_name(nimg, sigma_rel))

    def grid(self, nimg=None):
        """samples/grid-<kimg>.png, or the end-of-training grid when `nimg` is None."""
        return self.path(SAMPLES_DIR, FINAL_GRID_FILE if nimg is None else grid_name(nimg))

    def owned_names(self):
        """{directory: test(name)} of every file name mpdiff writes into this run directory."""
        return {
            self.run_dir: lambda name: name in (CONFIG_FILE, LOG_FILE, STATS_FILE, TRADITIONAL_EMA_FILE),
            self.checkpoint_dir: lambda name: parse_checkpoint_name(name) is not None,
            self.snapshot_dir: lambda name: parse_snapshot_name(name) is not None,
            self.phema_dir: lambda name: parse_phema_name(name) is not None or bool(_PROFILE_NAME.fullmatch(name)),
            self.samples_dir: lambda name: bool(_GRID_NAME.fullmatch(name)),
            self.plots_dir: lambda name: name in DYNAMICS_PLOT_FILES,
        }

    def stale_temporaries(self):
        """Paths of the temporaries that an interrupted write of ours left in this run directory.

        Only files (never links, never directories) named as :func:`~mpdiff.storage.files.atomic_write`
        names the temporary of a file we write, and only in our own directories, which are not entered
        when they are symlinks: nothing else under the run directory is touched.
        """
        found = []
        for directory, ours in self.owned_names().items():
            try:
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    continue  # absent, a file, or a symlink: not a directory we made
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                target = temporary_target(entry.name)
                if target is not None and ours(target) and entry.is_file(follow_symlinks=False):
                    found.append(entry.path)
        return sorted(found)

    def remove_stale_temporaries(self):
        for path in self.stale_temporaries():
            try:
                os.remove(path)
            except OSError:
                pass  # gone meanwhile, or not ours to remove: left as it is

    def check_folders(self, *names):
        """:func:`check_folder` for each of the run directory's folders `names` (e.g. CHECKPOINT_DIR), before a
        command lists, makes or writes into them: a symlink loop or a file in a folder's place is one line."""
        for name in names:
            check_folder(self.path(name))

    def checkpoints(self):
        """[(nimg, path)] of the checkpoint files present, oldest first (other names are ignored)."""
        return _listed(self.checkpoint_dir, parse_checkpoint_name)

    def reconstructions(self):
        """[(NetworkFileName, path)] of the post-hoc EMA files present, oldest first."""
        return _listed(self.phema_dir, parse_phema_name)


def check_folder(path):
    """The check of a folder that mpdiff lists, makes or writes files into (a run directory's checkpoints/,
    snapshots/, phema/, tensorboard/, an --out folder). True if it is a directory (also through a symlink,
    which is the user's choice of where it lives), False if it does not exist yet; anything else is one
    MpdiffError line: a symlink loop, a symlink to nothing, a file (or FIFO, ...) in its place."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise MpdiffError(f"{show_path(path)}: a symlink to {show_path(os.readlink(path))}, which does not exist; "
                              f"create that folder or remove the link") from None
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MpdiffError(f"{show_path(path)}: a symlink loop (it leads back to itself); remove it, or link it "
                              f"to a folder") from None
        raise MpdiffError(f"{show_path(path)}: cannot open the folder ({e.strerror or e})") from None
    if not stat.S_ISDIR(mode):
        raise MpdiffError(f"{show_path(path)}: is {kind_of(mode)} where mpdiff keeps a folder; move it away")
    return True


def _listed(directory, parse):
    if not check_folder(directory):
        return []
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise MpdiffError(f"{show_path(directory)}: cannot list the folder ({e.strerror or e})") from None
    found = [(parse(name), os.path.join(directory, name)) for name in names]
    return sorted((key, path) for key, path in found if key is not None)


def snapshot_dir_of(path):
    """RUN_DIR/snapshots when `path` is a run directory, else `path` itself."""
    path = os.fspath(path)
    candidate = os.path.join(path, SNAPSHOT_DIR)
    return candidate if os.path.lexists(candidate) and check_folder(candidate) else path


def run_dir_of(path):
    """The run directory for a run directory or its snapshots/ folder."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, SNAPSHOT_DIR)):
        return path
    if os.path.basename(path) == SNAPSHOT_DIR:
        return os.path.dirname(path)
    return path
