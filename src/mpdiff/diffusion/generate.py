"""Generating images per seed (SPEC §6.6). Each seed has its own generator for its initial noise, its
random class and its churn noise, so an image depends only on its seed, its class and the settings,
never on its batch, its position or the number of processes.

* :func:`generate_batches` yields one batch at a time: nothing but the current batch is kept, so any
  number of images can be streamed (to a folder, or through the metrics' detectors).
* :func:`generate` collects the batches: for grids and other small counts.
* :func:`generate_to_folder` writes a sample folder as images are made, resumably, optionally split
  across the processes of a ``torchrun`` launch (:mod:`mpdiff.distributed`).
"""

import contextlib
from typing import List, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from mpdiff.config import SAMPLING
from mpdiff.data.labels import one_hot
from mpdiff.diffusion.guidance import Counted, guided
from mpdiff.diffusion.samplers import SAMPLERS
from mpdiff.diffusion.schedules import edm_sigmas
from mpdiff.nn.fast import accelerate, frozen_weights

CHURN_STREAM = 1 << 31  # the churn noise of seed s comes from the generator of seed s + 2^31


def seed_generator(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(int(seed) % (1 << 32))


def classes_per_seed(class_idx, count):
    """`class_idx` as one entry per seed: a list or tuple as given, else that one value (a class, or None
    for a random class per seed) repeated `count` times."""
    return list(class_idx) if isinstance(class_idx, (list, tuple)) else [class_idx] * count


def seed_inputs(seeds, shape, num_classes=0, class_idx=None, device="cpu"):
    """Initial unit noise and class labels per seed, each from that seed's own generator.

    `class_idx`: None (random per seed), one class for all, or a list with one class per seed.
    Returns (noise [N, *shape], labels one-hot [N, num_classes] or None, class ids list).
    An image therefore depends only on its seed and class, never on its batch.
    """
    per_seed = classes_per_seed(class_idx, len(seeds))
    noise, classes = [], []
    for seed, fixed in zip(seeds, per_seed):
        gen = seed_generator(seed)
        noise.append(torch.randn(shape, generator=gen, dtype=torch.float32))
        if num_classes:
            drawn = int(torch.randint(num_classes, [], generator=gen))  # drawn always: same stream either way
            classes.append(drawn if fixed is None else int(fixed))
    noise = torch.stack(noise).to(device) if noise else torch.zeros(0, *shape, device=device)
    if not num_classes:
        return noise, None, [None] * len(seeds)
    labels = one_hot(classes, num_classes).to(device)
    return noise, labels, classes


class Batch(NamedTuple):
    seeds: List[int]
    images: torch.Tensor          # float32 [B, C, H, W] in the network's data space, on the CPU
    classes: List[Optional[int]]
    evaluations: Optional[dict] = None  # per image, counted: {"nfe": denoiser evaluations, "guide_nfe": of the guide}


def sampling_config(sampling=None, **overrides):
    """`sampling` (default: mpdiff.config.SAMPLING, DPM-Solver++(2M) in 25 steps) with field overrides such
    as num_steps=16, checked. Unknown names raise TypeError, as a misspelt keyword should."""
    sampling = sampling or SAMPLING
    return (sampling.replace(**overrides) if overrides else sampling).check()


def generate_batches(net, seeds, class_idx=None, sampling=None, guide=None, guidance=1.0, device="cpu",
                     progress=False, callback=None, **overrides):
    """Yield a :class:`Batch` per `sampling.batch_size` seeds, in order.

    `guide`/`guidance`: D = w D_net + (1 - w) D_guide (:func:`mpdiff.diffusion.guidance.guided`).
    `progress`: True for a bar of its own, or a tqdm bar to advance (by images, every sampler step).
    `callback(step)` is passed to the sampler (:class:`mpdiff.diffusion.samplers.Step`).
    Keyword overrides are SamplingConfig fields (num_steps=..., batch_size=..., S_churn=...).
    """
    from mpdiff.nn.runtime import compiled, low_noise_float32, precision_of

    sampling = sampling_config(sampling, **overrides)
    net = accelerate(net.eval())  # the fast twin, in place: the same function (mpdiff.nn.fast)
    if guide is not None:
        guide = accelerate(guide.eval())
    with precision_of(sampling.precision, net, guide):  # bf16: float32 at low noise levels
        model = low_noise_float32(compiled(net, sampling.compile, frozen=True), net, device)
        guide_model = low_noise_float32(compiled(guide, sampling.compile, frozen=True), guide, device)
        yield from _batches((net, model), seeds, class_idx, sampling, (guide, guide_model), guidance, device,
                            progress, callback)


def _batches(nets, seeds, class_idx, sampling, guides, guidance, device, progress, callback):
    """generate_batches' loop. `nets` is (net, model): `net` describes the images, `model` makes them (net,
    or net compiled, as a denoiser); `guides` likewise, (None, None) without a guide."""
    (net, model), (guide, guide_model) = nets, guides
    seeds = [int(s) for s in seeds]
    per_seed = classes_per_seed(class_idx, len(seeds))
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    sigmas = edm_sigmas(sampling.num_steps, sampling.sigma_min, sampling.sigma_max, sampling.rho)
    counted_net, counted_guide = Counted(model), None if guide is None else Counted(guide_model)
    denoise = guided(counted_net, counted_guide, guidance, sampling.guidance_interval)
    sampler = SAMPLERS[sampling.sampler]
    own_bar = progress is True
    bar = tqdm(total=len(seeds), desc="generating", unit="img", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} img [{elapsed}<{remaining}]") if own_bar else (progress or None)
    try:
        for start in range(0, len(seeds), sampling.batch_size):
            batch = seeds[start:start + sampling.batch_size]
            wanted = per_seed[start:start + len(batch)]
            # A compiled network compiles again for each new batch shape (tens of seconds on a CPU). A short
            # last batch is therefore filled up with copies of its last seed, whose images are dropped: an
            # image depends only on its seed, so the others are those of an unfilled batch.
            filler = sampling.batch_size - len(batch) if sampling.compile and start > 0 else 0
            drawn = batch + batch[-1:] * filler
            noise, labels, classes = seed_inputs(drawn, shape, net.label_dim, wanted + wanted[-1:] * filler, device)
            gens = [seed_generator(s + CHURN_STREAM) for s in drawn]

            def noise_fn(full_shape, gens=gens):
                return torch.stack([torch.randn(full_shape[1:], generator=g) for g in gens]).to(device)

            checked = []  # per step: its level, and whether the network's output and the state were finite

            def on_step(step, share=len(batch) / sampling.num_steps, checked=checked):  # the bar moves every step
                checked.append((step.sigma, step.sigma_next,
                                torch.stack([step.denoised.isfinite().all(), step.x.isfinite().all()])))
                if bar is not None:
                    bar.update(share)
                if callback is not None:
                    callback(step)

            for counter in (counted_net, counted_guide):  # the evaluations of this batch
                if counter is not None:
                    counter.calls = 0
            with torch.no_grad(), frozen_weights(net, guide):  # per batch: the caller may change them in between
                x = sampler(denoise, noise.to(torch.float64) * sigmas[0], sigmas, labels, noise_fn=noise_fn,
                            callback=on_step, **sampling.sampler_options())
            evaluations = {"nfe": counted_net.calls, "guide_nfe": counted_guide.calls if counted_guide else 0}
            images = x[:len(batch)].to(torch.float32).cpu()
            refuse_non_finite(images, checked, batch, guide is not None)
            yield Batch(batch, images, classes[:len(batch)], evaluations)
    finally:
        if own_bar:
            bar.close()


def refuse_non_finite(images, checked, seeds, guided=False):
    """The check of every generated batch: a step whose network output or state was NaN or infinite (or
    images beyond float32) is an error naming the step where it first happened, never an image.
    `checked`: (sigma, sigma_next, tensor [output finite, state finite]) per step."""
    from mpdiff.errors import MpdiffError

    shown = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    flags = torch.stack([finite for *_, finite in checked]).cpu() if checked else torch.ones(0, 2, dtype=torch.bool)
    bad = (~flags).any(dim=1).nonzero()
    network = "the network or its guide" if guided else "the network"
    if len(bad):
        step = int(bad[0])
        sigma, sigma_next, _ = checked[step]
        if not flags[step, 0]:
            raise MpdiffError(f"{shown}: {network} produced NaN or infinite values at sigma={sigma:.4g} (step "
                              f"{step + 1} of {len(checked)}); check the network file (its weights and settings)")
        raise MpdiffError(f"{shown}: sampling became NaN or infinite in step {step + 1} of {len(checked)} (sigma "
                          f"{sigma:.4g} -> {sigma_next:.4g}); {network} or the sampler options are the likely cause")
    if not images.isfinite().all():
        raise MpdiffError(f"{shown}: the images are beyond the range of float32; check the network file")


def generate(net, seeds, class_idx=None, sampling=None, guide=None, guidance=1.0, progress=True, device="cpu",
             **overrides):
    """Sample one image per seed. Returns (images float32 [N, C, H, W] in data space, classes).

    Keeps every image: for grids and small counts (:func:`generate_batches` streams). Images come back
    in the network's data space (e.g. [-1, 1]); decode with :func:`mpdiff.data.pixels.decode_images`.
    """
    images, classes = [], []
    for batch in generate_batches(net, seeds, class_idx, sampling, guide, guidance, device, progress, **overrides):
        images.append(batch.images)
        classes += batch.classes
    if not images:
        return torch.zeros(0, net.img_channels, net.img_resolution, net.img_resolution), []
    return torch.cat(images), classes


MAX_SEEDS = 10_000_000  # a typo such as 0-99999999999 must not exhaust memory


def parse_seeds(text):
    """'0-999' or '1,5,7-9' -> list of ints (inclusive ranges)."""
    from mpdiff.errors import ConfigError
    seeds = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise ValueError
                if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                    raise ConfigError(f"--seeds: {text!r} gives more than {MAX_SEEDS:,} seeds")
                seeds += range(lo, hi + 1)
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"--seeds: cannot parse {text!r}; expected e.g. '0-99' or '1,5,7-9'") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds: {text!r} gives no non-negative seeds")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {text!r} names a seed twice; each seed is one image file")
    return seeds


def generation_settings(net, seeds, class_idx, sampling, guide=None, guidance=1.0):
    """Everything an image of the folder depends on, as JSON: a resumed generation must match it.
    The batch size is left out: images do not depend on it."""
    from mpdiff.storage.fingerprint import network_fingerprint, seeds_fingerprint

    sampling = sampling.to_dict()
    sampling.pop("batch_size")
    use_guide = guide is not None and guidance != 1
    if sampling["guidance_interval"] is None or not use_guide:  # no interval: the settings they always had
        sampling.pop("guidance_interval")
    return {"network": network_fingerprint(net), "seeds": seeds_fingerprint(seeds),
            "class": list(class_idx) if isinstance(class_idx, (list, tuple)) else class_idx,
            "sampling": sampling, "guidance": float(guidance) if use_guide else 1.0,
            "guide": network_fingerprint(guide) if use_guide else None}


def generate_to_folder(net, seeds, out_dir, class_idx=None, grid_path=None, sampling=None, guide=None,
                       guidance=1.0, device="cpu", progress=True, subdirs=False, dist=None, log=None,
                       encoder=None, **overrides):
    """Write one PNG per seed and dataset.json into `out_dir` as the batches are made (memory: one batch);
    returns the folder path (docs/SAMPLING.md, "Generation: streamed, resumable, several processes").

    Images go into the hidden ``.NAME.generating`` with the settings they depend on; when every seed is
    there, the folder takes NAME's place atomically. A killed generation resumed with the same settings
    keeps the images already written (each read back and checked; a damaged one is made again) and makes
    the missing ones; other settings are refused. Process 0 holds OUT's lock throughout. `dist`: each
    process makes every world_size-th batch and process 0 completes the folder. `encoder` (default pixels)
    turns each batch into uint8 images; a latent network's decoder is one of the settings a resumed folder
    must match.
    """
    from mpdiff.data.pixels import PixelEncoder
    from mpdiff.distributed import Distributed
    from mpdiff.storage.samples import StreamingSampleFolder
    from mpdiff.storage.staging import destination_lock

    dist = dist or Distributed.single()
    sampling = sampling_config(sampling, **overrides)
    seeds = [int(s) for s in seeds]
    per_seed = classes_per_seed(class_idx, len(seeds))
    settings = generation_settings(net, seeds, class_idx, sampling, guide, guidance)
    encoder = encoder or PixelEncoder()
    if encoder.name != PixelEncoder.name:  # pixel folders keep the settings they always had
        settings["decoder"] = encoder.describe(with_vae=True)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    folder = StreamingSampleFolder(out_dir, settings, seeds, grid_path=grid_path, subdirs=subdirs,
                                   num_classes=net.label_dim)
    with destination_lock(folder.out_dir, "generate") if dist.rank == 0 else contextlib.nullcontext():
        if dist.rank == 0:  # one writer: a second generation into OUT is refused until this one ends
            folder.open()
        dist.barrier()
        if dist.rank != 0:
            folder.open(create=False)
        batches = process_batches(list(range(len(seeds))), sampling.batch_size, dist)
        mine = sum(len(b) for b in batches)
        written = _keep_whole_images(folder, [seeds[i] for b in batches for i in b],
                                     tuple(encoder.decode(torch.zeros(0, *shape)).shape[1:]), log)
        todo = [b for b in batches if not all(folder.has(seeds[i]) for i in b)]
        if log is not None and dist.rank == 0 and written:
            log(f"resuming {folder.partial}: {written} of {mine} images of this process already written")
        bar = tqdm(total=mine, initial=mine - sum(len(b) for b in todo), desc="generating", unit="img",
                   dynamic_ncols=True, disable=not progress or dist.rank != 0,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total} img [{elapsed}<{remaining}]")
        try:
            for indices in todo:  # whole batches as one process would make them: the same images, bit for bit
                for batch in generate_batches(net, [seeds[i] for i in indices], [per_seed[i] for i in indices],
                                              sampling, guide, guidance, device, progress=bar):
                    if dist.rank == 0:
                        folder.record_nfe(batch.evaluations)  # before its images: a folder with images has it
                    folder.write_batch(batch.seeds, encoder.decode(batch.images).numpy())
        finally:
            bar.close()
        dist.barrier()
        if dist.rank == 0:
            folder.finish(seeds, _classes_of(seeds, shape, net.label_dim, per_seed))
            if log is not None and folder.nfe is not None:
                log(describe_evaluations(folder.nfe))
        dist.barrier()
    return folder.out_dir


def _keep_whole_images(folder, seeds, shape, log):
    """Read back the images of `seeds` that a killed generation left, with the checks of any user's image:
    one that does not decode, or is not an 8-bit PNG of `shape` [C, H, W] as generation writes, is made
    again (and said so). Returns the number kept."""
    kept = 0
    for seed in seeds:
        if folder.has(seed):
            problem = _image_problem(folder.path_of(seed), shape)
            kept += problem is None
            if problem is not None:
                folder.done.discard(seed)
                if log is not None:
                    log(f"{problem}; making it again")
    return kept


def _image_problem(path, shape):
    """Why the image at `path` is not one generation wrote of `shape` (one line), or None."""
    from mpdiff.data.image_files import decode_image
    from mpdiff.errors import MpdiffError, first_line
    from mpdiff.storage.files import read_bytes, show_path

    try:
        data = read_bytes(path, 2 * shape[0] * shape[1] * shape[2] + 2 ** 20, "sample image")
        image = decode_image(data, show_path(path))
    except MpdiffError as e:
        return first_line(e)
    if image.shape != shape or data[24:26] != bytes([8, 0 if shape[0] == 1 else 2]):  # IHDR: depth, colour type
        return f"{show_path(path)}: not the {shape[2]}x{shape[1]} {'grayscale' if shape[0] == 1 else 'RGB'} PNG " \
               f"generation writes"
    return None


def describe_evaluations(evaluations):
    """'NFE per image: 25 (the guide evaluated in 7 of them: 32 network evaluations)', as counted."""
    guide = evaluations.get("guide_nfe", 0)
    extra = f" (the guide evaluated in {guide} of them: {evaluations['nfe'] + guide} network evaluations)" if guide \
        else ""
    return f"NFE per image: {evaluations['nfe']}{extra}"


def process_batches(items, batch_size, dist):
    """This process's share of `items`: the batches of `batch_size` that one process would make, dealt
    out in turn (batch k to process k mod world_size). Batches are never re-cut, so every image is made
    in the same batch, and hence bit for bit the same, whatever the number of processes."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[dist.rank::dist.world_size]


def _classes_of(seeds, shape, num_classes, per_seed, chunk=1024):
    """The class of every seed, as generation draws it (without the network), a chunk at a time."""
    if not num_classes:
        return [None] * len(seeds)
    classes = []
    for start in range(0, len(seeds), chunk):
        classes += seed_inputs(seeds[start:start + chunk], shape, num_classes, per_seed[start:start + chunk])[2]
    return classes
