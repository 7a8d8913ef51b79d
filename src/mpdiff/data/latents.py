"""Latent diffusion (SPEC §7.1, §7.3): the Stable Diffusion VAE, latent datasets and the latent encoder.

* The VAE is diffusers' ``AutoencoderKL`` (EDM2: ``stabilityai/sd-vae-ft-mse``), loaded from a local
  folder in diffusers format only (:func:`load_vae`); the hub is never contacted. diffusers is an
  optional dependency (``pip install "mpdiff[latent]"``), imported only when a VAE is used, so that
  everything else, training on a latent dataset included, works without it.
* :func:`encode_dataset` (`mpdiff dataset encode`) turns an image dataset into a latent dataset as
  EDM2 stores it: per image a float32 ``.npy`` [8, R/8, R/8] holding the encoder's 4 means, then its 4
  standard deviations (``00000/img-mean-std-00000000.npy``), and dataset.json with the same labels.
  The VAE sees pixels in [0, 1] (uint8 / 255), the range the normalisation constants were made for.
* :class:`LatentEncoder` is the encoder seam of training and sampling for such data (as
  :class:`mpdiff.data.pixels.PixelEncoder` is for images): ``encode`` draws ``z = mean + std * eps``
  and standardises it per channel, ``(z - raw_mean) * (0.5 / raw_std)``; ``decode`` inverts that, runs
  the VAE decoder a few latents at a time, clamps to [0, 1], x 255 and rounds to uint8.
"""

import io
import math
import os
from typing import NamedTuple

import numpy as np
import torch

from mpdiff.data.latent_files import latent_value_problem
from mpdiff.data.pixels import PixelEncoder
from mpdiff.data.shapes import MIN_RESOLUTION
from mpdiff.data.sources import show_name
from mpdiff.errors import ConfigError, DatasetError, MpdiffError, first_line
from mpdiff.storage.files import read_json, show_path
from mpdiff.storage.layout import CONFIG_FILE, PHEMA_DIR, SNAPSHOT_DIR

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)    # per-channel mean of the VAE's latents over ImageNet (SPEC §7.1)
RAW_STD = (4.17, 4.62, 3.71, 3.28)      # ... and their standard deviation
SCALE = 0.5                             # the standardised latents' standard deviation: sigma_data
LATENT_CHANNELS = 4                     # what the network sees and makes
DATA_CHANNELS = 2 * LATENT_CHANNELS     # what a latent dataset stores: 4 means, then 4 standard deviations
DOWNSAMPLING = 8                        # the VAE's spatial factor: 512x512x3 -> 64x64x4
ENCODE_BATCH = 8                        # images per VAE encoder call (SPEC §7.1)
DECODE_BATCH = 8                        # latents per VAE decoder call
VAE_REPO = "stabilityai/sd-vae-ft-mse"  # the VAE EDM2 used, on the Hugging Face hub
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INSTALL_HINT = 'pip install "mpdiff[latent]"'
ENCODER_NAME = "stability-vae"          # LatentEncoder.name, as config.json records it
IMAGES_PER_FOLDER = 1000                # 00000/img-mean-std-00000000.npy ... as EDM2's dataset tool names them


def vae_hint():
    """How to get the VAE folder, for the end of a one-line error."""
    return (f"download {VAE_REPO} on a machine with internet with `hf download {VAE_REPO} --local-dir DIR` "
            f"(huggingface_hub; older versions: `huggingface-cli download ...`), then pass --vae DIR")


def import_diffusers(purpose="the Stable Diffusion VAE"):
    """The diffusers module, or MpdiffError with the install command when it cannot be imported."""
    try:
        import diffusers
        from diffusers import AutoencoderKL  # noqa: F401  (diffusers imports its models lazily)
    except ImportError as e:
        raise MpdiffError(f"{purpose} needs the diffusers package, which cannot be imported here "
                          f"({first_line(e, 120)}): {INSTALL_HINT}") from None
    return diffusers


# ---- the VAE ------------------------------------------------------------------------------------

def check_vae_dir(path):
    """Check that `path` is a local diffusers folder of an AutoencoderKL that makes 4-channel latents at
    1/8 of the resolution (as sd-vae-ft-mse), without loading it; MpdiffError (one line) otherwise.
    Returns the config (a dict)."""
    shown = show_path(os.fspath(path))
    if not os.path.exists(path):
        raise MpdiffError(f"VAE folder {shown}: no such folder; {vae_hint()}")
    if not os.path.isdir(path):
        raise MpdiffError(f"VAE folder {shown}: not a folder; {vae_hint()}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise MpdiffError(f"VAE folder {shown}: no config.json, so not a diffusers model folder; {vae_hint()}")
    config = read_json(config_path, what="VAE config")
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise MpdiffError(f"VAE folder {shown}: config.json describes {kind or 'no model class'!s:.60}, not an "
                          f"AutoencoderKL; {vae_hint()}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in VAE_WEIGHTS):
        raise MpdiffError(f"VAE folder {shown}: no weights ({' or '.join(VAE_WEIGHTS)}); {vae_hint()}")
    channels, blocks = config.get("latent_channels", 4), config.get("block_out_channels", [None] * 4)
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
    if channels != LATENT_CHANNELS or factor != DOWNSAMPLING:
        raise MpdiffError(f"VAE folder {shown}: this AutoencoderKL makes {channels!s:.20}-channel latents at 1/"
                          f"{factor} of the resolution; EDM2's latents are {LATENT_CHANNELS} channels at 1/"
                          f"{DOWNSAMPLING} ({VAE_REPO})")
    return config


def load_vae(path, device="cpu"):
    """The AutoencoderKL of a local diffusers folder (:func:`check_vae_dir`), in float32, in eval mode,
    without gradients, on `device`. The hub is never contacted (local_files_only)."""
    path = os.fspath(path)
    import_diffusers()
    check_vae_dir(path)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False,
                                            torch_dtype=torch.float32)
    except Exception as e:  # damaged weights, a config diffusers cannot build, ...
        raise MpdiffError(f"VAE folder {show_path(path)}: cannot load it as an AutoencoderKL "
                          f"({type(e).__name__}: {first_line(e, 160)})") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_moments(vae, images_uint8, name="the VAE", images="these images"):
    """uint8 images [N, 1 or 3, H, W] -> float32 [N, 8, H/8, W/8] on the CPU: the VAE encoder's 4 means,
    then its 4 standard deviations. Pixels go in as [0, 1] (uint8 / 255); grayscale is repeated to RGB.

    Every batch is checked before anyone can write it, by the rule latent files are read with
    (:func:`~mpdiff.data.latent_files.latent_value_problem`): non-finite values or negative standard
    deviations from finite pixels are the VAE's fault, one MpdiffError line naming it (`name`) and the
    `images` it was given."""
    device = next(vae.parameters()).device
    x = torch.as_tensor(images_uint8).to(device=device, dtype=torch.float32) / 255
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        moments = torch.cat([dist.mean, dist.std], dim=1).to(torch.float32).cpu()
    problem = latent_value_problem(moments.numpy())
    if problem:
        raise MpdiffError(f"{name}: its encoder made latents with {problem} from {images}; the VAE is the likely "
                          f"cause (damaged or non-finite weights): nothing of them is written")
    return moments


def vae_pixels(vae, z, name="the VAE"):
    """Raw VAE latents [N, 4, h, w] -> uint8 images [N, 3, 8h, 8w] on the CPU: decoded, clamped to [0, 1],
    x 255, rounded. Non-finite latents, or a non-finite decoded value (which would become a black pixel),
    are one MpdiffError line naming the likely cause: the network that made the latents, or the VAE
    (`name`)."""
    device = next(vae.parameters()).device
    z = torch.as_tensor(z).to(device=device, dtype=torch.float32)
    bad = int((~torch.isfinite(z)).sum())
    if bad:
        raise MpdiffError(f"the latents to decode have {bad:,} non-finite values (NaN or infinity) of {z.numel():,}; "
                          f"the network that made them is the likely cause, not {name}")
    with torch.no_grad():
        x = vae.decode(z).sample
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise MpdiffError(f"{name}: its decoder made {bad:,} non-finite values (NaN or infinity) of {x.numel():,} "
                          f"from finite latents; the VAE is the likely cause (damaged or non-finite weights): "
                          f"no image is made of them")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ---- the encoder of latent data --------------------------------------------------------------------

class LatentEncoder:
    """The encoder of a latent dataset (SPEC §7.1), with the methods of
    :class:`~mpdiff.data.pixels.PixelEncoder`.

    `vae`: the VAE folder (or an AutoencoderKL), needed only to decode; it is loaded on first use.
    `raw_mean`, `raw_std`: the per-channel constants of the standardisation.
    """

    name = ENCODER_NAME
    stochastic = True       # encode draws z = mean + std * eps: its eps must come from a seeded generator

    def __init__(self, vae=None, raw_mean=RAW_MEAN, raw_std=RAW_STD, device="cpu", batch_size=DECODE_BATCH):
        self.raw_mean = tuple(float(v) for v in raw_mean)
        self.raw_std = tuple(float(v) for v in raw_std)
        if len(self.raw_mean) != LATENT_CHANNELS or len(self.raw_std) != LATENT_CHANNELS \
                or not all(math.isfinite(v) for v in self.raw_mean + self.raw_std) or min(self.raw_std) <= 0:
            raise ConfigError(f"latent constants must be {LATENT_CHANNELS} finite means and {LATENT_CHANNELS} "
                              f"positive standard deviations, got {list(raw_mean)} and {list(raw_std)}")
        is_module = isinstance(vae, torch.nn.Module)
        self.vae_dir = None if vae is None or is_module else os.fspath(vae)
        self._vae = vae if is_module else None
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    @property
    def can_decode(self):
        return self._vae is not None or self.vae_dir is not None

    @property
    def vae(self):
        """The VAE, loaded on first use."""
        if self._vae is None:
            if self.vae_dir is None:
                raise ConfigError(f"decoding latents needs the VAE; {vae_hint()}")
            self._vae = load_vae(self.vae_dir, self.device)
        return self._vae

    def channels(self, data_channels=DATA_CHANNELS):
        """The network's channel count (4) for a latent dataset of `data_channels` (8) channels."""
        if data_channels != DATA_CHANNELS:
            raise ConfigError(f"a latent dataset has {DATA_CHANNELS} channels (4 means, 4 standard deviations), "
                              f"got {data_channels}")
        return LATENT_CHANNELS

    def _constants(self, x):
        """(raw_mean, raw_std) as float32 [1, 4, 1, 1] on x's device."""
        return [torch.tensor(v, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
                for v in (self.raw_mean, self.raw_std)]

    def normalize(self, z):
        """Raw VAE latents -> what the network sees: (z - raw_mean) * (0.5 / raw_std), per channel."""
        z = torch.as_tensor(z).to(torch.float32)
        mean, std = self._constants(z)
        return (z - mean) * (SCALE / std)

    def denormalize(self, x):
        """The inverse of :meth:`normalize`: x * (raw_std / 0.5) + raw_mean."""
        x = torch.as_tensor(x).to(torch.float32)
        mean, std = self._constants(x)
        return x * (std / SCALE) + mean

    def encode(self, batch, generator=None, eps=None):
        """float32 [N, 8, h, w] (means, then standard deviations) -> [N, 4, h, w]: a sample
        z = mean + std * eps, standardised. `eps` (unit normal, [N, 4, h, w]) is drawn from `generator`
        (torch.randn) unless given."""
        batch = torch.as_tensor(batch).to(torch.float32)
        if batch.ndim != 4 or batch.shape[1] != DATA_CHANNELS:
            raise ValueError(f"latent batches are float32 [N, {DATA_CHANNELS}, h, w], got {list(batch.shape)}")
        mean, std = batch[:, :LATENT_CHANNELS], batch[:, LATENT_CHANNELS:]
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                              device=generator.device if generator is not None else mean.device)
        return self.normalize(mean + std * eps.to(mean.device, torch.float32))

    def decode(self, x):
        """What the network made, [N, 4, h, w] -> uint8 images [N, 3, 8h, 8w] on the CPU, through the VAE
        decoder :attr:`batch_size` latents at a time."""
        z = self.denormalize(torch.as_tensor(x).detach().cpu())
        if len(z) == 0:
            return torch.zeros(0, 3, z.shape[2] * DOWNSAMPLING, z.shape[3] * DOWNSAMPLING, dtype=torch.uint8)
        return torch.cat([vae_pixels(self.vae, z[start:start + self.batch_size], self._vae_name())
                          for start in range(0, len(z), self.batch_size)])

    def _vae_name(self):
        return f"VAE folder {show_path(self.vae_dir)}" if self.vae_dir else "the VAE"

    def describe(self, with_vae=False):
        """What a run's config.json records about the encoder (and, `with_vae`, the VAE folder too)."""
        info = {"name": self.name, "vae": f"{VAE_REPO} (diffusers AutoencoderKL), pixels in [0, 1]",
                "data_channels": DATA_CHANNELS, "channels": LATENT_CHANNELS,
                "raw_mean": list(self.raw_mean), "raw_std": list(self.raw_std), "scale": SCALE,
                "encode": "(mean + std * eps - raw_mean) * (scale / raw_std)"}
        if with_vae:
            info["vae_dir"] = os.path.abspath(self.vae_dir) if self.vae_dir else None
        return info


def encoder_for(data_channels, vae=None, device="cpu"):
    """The encoder of a dataset with `data_channels` channels (SPEC §7.4): 8 -> :class:`LatentEncoder`
    (decoding with the VAE folder `vae`, if given), 1 or 3 -> PixelEncoder; anything else is an error."""
    if data_channels == DATA_CHANNELS:
        return LatentEncoder(vae, device=device)
    if data_channels in (1, 3):
        if vae is not None:
            raise ConfigError(f"{{vae}} is for latent datasets ({DATA_CHANNELS}-channel .npy files); this dataset has "
                              f"{data_channels}-channel images", fields=("vae",))
        return PixelEncoder()
    raise ConfigError(f"a dataset of {data_channels}-channel data has no encoder: images have 1 or 3 channels, "
                      f"latents {DATA_CHANNELS}")


def recorded_encoder(source):
    """(encoder dict, VAE folder) that the config.json of the run holding network `source` (a run
    directory, or a file in its snapshots/ or phema/ folder) records; (None, None) when there is none."""
    if source is None:
        return None, None
    source = os.path.abspath(os.fspath(source))
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    if os.path.basename(folder) in (SNAPSHOT_DIR, PHEMA_DIR):
        folder = os.path.dirname(folder)
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        config = read_json(path, what="run config")
    except MpdiffError:
        return None, None
    encoder = config.get("encoder") if isinstance(config, dict) else None
    run = config.get("run") if isinstance(config, dict) else None
    vae = run.get("vae") if isinstance(run, dict) else None
    return (encoder if isinstance(encoder, dict) else None), (vae if isinstance(vae, str) else None)


def network_encoder(net, source=None, vae=None, device="cpu", recorded=None):
    """The encoder that turns what network `net` makes into uint8 images, for `mpdiff generate` and
    `mpdiff metrics --net`: pixels for a 1- or 3-channel network; for a 4-channel (latent) network a
    :class:`LatentEncoder` with the constants its run recorded (else SPEC §7.1's) and the VAE folder
    `vae` (else the one its run recorded). `recorded`, an encoder description that came with the network
    file (a release pickle's, a converted file's), takes the place of the run's. The VAE folder and
    diffusers are checked here; the VAE itself is loaded when the first batch is decoded."""
    channels = net.img_channels
    shown = show_path(os.fspath(source)) if source is not None else "the network"
    if channels in (1, 3):
        if vae is not None:
            raise ConfigError(f"--vae is for latent networks; {shown} makes {channels}-channel images")
        return PixelEncoder()
    if channels != LATENT_CHANNELS:
        raise ConfigError(f"{shown} makes {channels}-channel data: neither images (1 or 3 channels) nor latents "
                          f"({LATENT_CHANNELS} channels)")
    run_recorded, recorded_vae = recorded_encoder(source)
    recorded = recorded if isinstance(recorded, dict) else run_recorded
    vae_dir = vae if vae is not None else recorded_vae
    if vae_dir is None:
        raise ConfigError(f"{shown} makes {LATENT_CHANNELS}-channel latents of the Stable Diffusion VAE; to decode "
                          f"them, {vae_hint()}")
    import_diffusers("decoding latents")
    try:
        check_vae_dir(vae_dir)
    except MpdiffError as e:
        if vae is None:  # the run's folder: say where it came from
            raise MpdiffError(f"{e} (the VAE folder recorded in the run's config.json; --vae DIR gives "
                              f"another)") from None
        raise
    raw_mean, raw_std = RAW_MEAN, RAW_STD
    if recorded is not None and recorded.get("name") == ENCODER_NAME:
        raw_mean, raw_std = recorded.get("raw_mean", RAW_MEAN), recorded.get("raw_std", RAW_STD)
    return LatentEncoder(vae_dir, raw_mean, raw_std, device=device)


# ---- encoding a dataset (`mpdiff dataset encode`) --------------------------------------------------

def latent_entry_name(index):
    """EDM2's name for the latent of this index: 00000/img-mean-std-00000000.npy, ..."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img-mean-std-{index:08d}.npy"


def npy_bytes(array):
    """The .npy file (format 1.0, no pickle) of a float32 array."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


class Encoding(NamedTuple):
    """What :func:`encode_dataset` wrote."""
    dest: str
    count: int
    image_resolution: int
    resolution: int         # of the latents
    num_classes: int

    def summary(self):
        labels = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        return (f"wrote {self.count:,} latent{'' if self.count == 1 else 's'} ({DATA_CHANNELS}x{self.resolution}x"
                f"{self.resolution} float32: 4 means, 4 standard deviations, of {self.image_resolution}x"
                f"{self.image_resolution} images; {labels}) to {show_path(self.dest)}")


def encode_dataset(src, dest, vae, batch_size=ENCODE_BATCH, device="cpu", progress=True):
    """Encode the image dataset `src` (a folder or ZIP as :func:`~mpdiff.data.datasets.open_dataset`
    reads it) with the VAE folder `vae` into the latent dataset `dest` (a ZIP when the name ends in .zip,
    else a new folder), `batch_size` images per VAE call on `device`; returns an :class:`Encoding`.

    Streamed: one batch of images is decoded and encoded at a time, and each latent is written as it is
    made; the ZIP goes into a temporary file renamed at the end, a folder into a hidden sibling, so that
    an interrupted encoding leaves no DEST. dataset.json carries the source's labels.
    """
    from tqdm import tqdm

    from mpdiff.data.convert import check_destination, write_dataset
    from mpdiff.data.datasets import open_dataset

    src, dest = os.fsdecode(os.fspath(src)), os.fsdecode(os.fspath(dest))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch must be a positive whole number, got {batch_size!r}")
    import_diffusers("mpdiff dataset encode")  # before any work: a missing package costs nothing
    check_vae_dir(vae)
    check_destination(src, dest, command="encode")
    ds = open_dataset(src, use_labels=True, progress=False)
    if getattr(ds, "latent", False):
        raise DatasetError(f"{show_path(src)}: holds latents (.npy files) already; encode takes images")
    side = ds.resolution
    if ds.channels not in (1, 3) or side % DOWNSAMPLING or side // DOWNSAMPLING < MIN_RESOLUTION:
        raise DatasetError(f"{show_path(src)}: images are {side}x{side} with {ds.channels} channel(s); the VAE needs "
                           f"RGB or grayscale images whose side is a multiple of {DOWNSAMPLING} of at least "
                           f"{DOWNSAMPLING * MIN_RESOLUTION} (EDM2: 512x512, convert with --transform "
                           f"center-crop-dhariwal)")
    model = load_vae(vae, device)

    def files():
        index = 0
        with tqdm(total=len(ds), desc=f"Encoding {ds.name}", unit="img", disable=not progress) as bar:
            for images in ds.batches(batch_size):
                first = ds.image_name(index)
                more = len(images) - 1
                what = f"{show_path(src)}/{show_name(first)}" + (f" and the {more} image{'s' if more > 1 else ''} "
                                                                  f"after it" if more else "")
                moments = vae_moments(model, torch.from_numpy(images), f"VAE folder {show_path(vae)}", what).numpy()
                for array in moments:
                    yield latent_entry_name(index), npy_bytes(array)
                    index += 1
                bar.update(len(images))

    write_dataset(dest, files(), len(ds), ds.labels, ds.num_classes, ds.class_names)  # class names kept, as in convert
    return Encoding(dest, len(ds), side, side // DOWNSAMPLING, ds.num_classes if ds.labels is not None else 0)

