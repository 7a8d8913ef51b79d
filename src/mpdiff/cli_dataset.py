"""`mpdiff dataset ...`: preparing and checking datasets (parsing only; the work is in :mod:`mpdiff.data.convert`
and :mod:`mpdiff.data.datasets`)."""

import click

from mpdiff.data.convert import TRANSFORMS

_TRANSFORM_HELP = (
    "How each image becomes RxR (needed unless all images already are): "
    "pad = centre it on a black RxR canvas (it must fit; e.g. MNIST 28x28 -> 32); "
    "resize = Lanczos resize to RxR (the aspect ratio is NOT kept); "
    "center-crop = the largest centred square, Lanczos resized to R; "
    "center-crop-dhariwal = the ADM/EDM2 ImageNet recipe (box-halve while the short side >= 2R, "
    "bicubic resize to a short side of R, centre crop).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def dataset():
    """Prepare datasets for training."""


@dataset.command()
@click.argument("src")
@click.argument("dest")
@click.option("--resolution", type=int, default=None, metavar="R",
              help="Output side, a power of two >= 4 [default: the images' size, when they all share one such size].")
@click.option("--transform", type=click.Choice(TRANSFORMS), default=None, help=_TRANSFORM_HELP)
@click.option("--skip-other-images", is_flag=True,
              help="Leave out files named as images of other kinds (GIF, TIFF, HEIC, ...), which are refused "
                   "otherwise; a line on stderr says which were left out.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def convert(src, dest, resolution, transform, skip_other_images, progress):
    """Convert images of any size into an EDM2-style dataset.

    SRC: a folder or ZIP of PNG/JPEG/BMP/WebP images, grayscale or RGB (images with transparent pixels
    are refused: flatten them first), labelled by its dataset.json or by class-per-folder (sorted
    top-level folder names), else unlabelled. DEST: a new folder, or a .zip file, holding
    00000/img00000000.png ... and dataset.json; it is written whole or not at all.

    Nothing is left out without a word: files named as images of other kinds (.gif, .tif, .heic, ...)
    are refused before anything is written, naming them (convert them to PNG, or pass
    --skip-other-images); files that are not images (notes.txt, ...) are not read, and a line on stderr
    lists them.
    """
    from mpdiff.data.convert import convert_dataset
    from mpdiff.storage.files import printable

    result = convert_dataset(src, dest, resolution, transform, progress=progress,
                             skip_other_images=skip_other_images)
    for line in result.notes():
        click.echo(printable(f"{src}: {line}"), err=True)
    click.echo(printable(result.summary()))


@dataset.command()
@click.argument("src")
@click.argument("dest")
@click.option("--vae", required=True, metavar="DIR",
              help="A local folder holding the Stable Diffusion VAE in diffusers format (EDM2: stabilityai/sd-vae-ft-mse, "
                   "fetched with `hf download stabilityai/sd-vae-ft-mse --local-dir DIR`); the hub is never contacted.")
@click.option("--batch", type=int, default=8, show_default=True, help="Images per VAE encoder call.")
@click.option("--device", default="cpu", show_default=True, help="Torch device of the VAE, e.g. cuda.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def encode(src, dest, vae, batch, device, progress):
    """Encode an image dataset into latents of the Stable Diffusion VAE, as EDM2 stores them.

    SRC: a folder or ZIP of images (e.g. written by `mpdiff dataset convert`), side a multiple of 8
    (512 for EDM2's ImageNet-512). DEST: a new .zip file (or folder) holding, per image, a float32
    00000/img-mean-std-00000000.npy of shape [8, R/8, R/8] (the VAE encoder's 4 means, then its 4
    standard deviations; training draws mean + std * eps) and dataset.json with the same labels.
    Every batch is checked before it is written: latents with NaN or infinity (a damaged VAE) are an
    error, and DEST is not made. Needs the optional diffusers package: pip install "mpdiff[latent]".
    """
    from mpdiff.config import check_device
    from mpdiff.data.latents import encode_dataset
    from mpdiff.storage.files import printable

    check_device(device, field=None)
    result = encode_dataset(src, dest, vae, batch_size=batch, device=device, progress=progress)
    click.echo(printable(result.summary()))


@dataset.command()
@click.argument("path")
@click.option("--labels/--no-labels", default=True, show_default=True,
              help="Check the labels too (dataset.json or class folders), as training with labels reads them.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def check(ctx, path, labels, progress):
    """Decode and check every image of a dataset, reporting every bad file in one pass.

    PATH: a folder or ZIP of images, as `mpdiff train --data` takes it. Training opens a dataset as an
    index and decodes each image when it is used, so a damaged file would stop a run when it is met;
    this finds them all first. Prints one line per bad file (damaged, another size or channel count than
    the first image, transparent, too large, ...), then 'PATH: N images, K bad'. Exit status 1 when any
    file is bad; a problem of the whole dataset (dataset.json, no images, an unusable first image) is an
    error as in training, after the summary 'PATH: N images, not checked one by one'.
    """
    from mpdiff.data.datasets import count_images, open_dataset
    from mpdiff.errors import DatasetError
    from mpdiff.storage.files import printable

    try:
        ds = open_dataset(path, use_labels=labels, progress=progress)
    except DatasetError:  # the dataset as a whole: still the summary line, then the error (and its advice)
        found = count_images(path)
        if found is not None:
            click.echo(printable(f"{path}: {found:,} image{'' if found == 1 else 's'}, not checked one by one: the "
                                 f"dataset as a whole is refused (below)"))
        raise
    problems = ds.check(progress)
    for line in problems:
        click.echo(printable(line))
    count = len(ds)
    click.echo(printable(f"{path}: {count:,} image{'' if count == 1 else 's'}, {len(problems):,} bad"))
    if problems:
        ctx.exit(1)
