"""Generating images per seed: initial noise and labels drawn from each seed's own generator, so an
image depends only on its seed and class, never on its batch (SPEC §6)."""

import torch
from tqdm.auto import tqdm

from mpdiff.config import SAMPLING
from mpdiff.data.datasets import one_hot
from mpdiff.data.pixels import decode_images
from mpdiff.diffusion.guidance import guided
from mpdiff.diffusion.samplers import sample_heun
from mpdiff.diffusion.schedules import edm_sigmas
from mpdiff.storage.samples import write_samples


def seed_generator(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(int(seed) % (1 << 32))


def seed_inputs(seeds, shape, num_classes=0, class_idx=None, device="cpu"):
    """Initial unit noise and class labels per seed, each from that seed's own generator.

    `class_idx`: None (random per seed), one class for all, or a list with one class per seed.
    Returns (noise [N, *shape], labels one-hot [N, num_classes] or None, class ids list).
    An image therefore depends only on its seed and class, never on its batch.
    """
    per_seed = list(class_idx) if isinstance(class_idx, (list, tuple)) else [class_idx] * len(seeds)
    noise, classes = [], []
    for seed, fixed in zip(seeds, per_seed):
        gen = seed_generator(seed)
        noise.append(torch.randn(shape, generator=gen, dtype=torch.float32))
        if num_classes:
            drawn = int(torch.randint(num_classes, [], generator=gen))  # drawn always: same stream either way
            classes.append(drawn if fixed is None else int(fixed))
    noise = torch.stack(noise).to(device)
    if not num_classes:
        return noise, None, [None] * len(seeds)
    labels = one_hot(classes, num_classes).to(device)
    return noise, labels, classes


@torch.no_grad()
def generate(net, seeds, class_idx=None, batch_size=SAMPLING.batch_size, num_steps=SAMPLING.num_steps,
             sigma_min=SAMPLING.sigma_min, sigma_max=SAMPLING.sigma_max, rho=SAMPLING.rho, guide=None, guidance=1.0, progress=True, device="cpu", **sampler_kwargs):
    """Sample one image per seed. Returns (images float32 [N, C, H, W] in data space, classes).

    Images come back in the network's data space (e.g. [-1, 1]); decode with
    :func:`mpdiff.data.decode_images`.
    """
    net = net.eval()
    seeds = list(seeds)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    denoise = guided(net, guide, guidance)
    outputs, all_classes = [], []
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    per_seed = list(class_idx) if isinstance(class_idx, (list, tuple)) else [class_idx] * len(seeds)
    bar = tqdm(total=len(seeds), disable=not progress, desc="generating", unit="img", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} img [{elapsed}<{remaining}]")
    for start, batch in zip(range(0, len(seeds), batch_size), batches):
        noise, labels, classes = seed_inputs(batch, shape, net.label_dim, per_seed[start:start + len(batch)], device)
        gens = [seed_generator(s + (1 << 31)) for s in batch]  # separate stream for churn noise

        def noise_fn(full_shape, gens=gens):
            return torch.stack([torch.randn(full_shape[1:], generator=g) for g in gens]).to(device)

        def advance(step, x, share=len(batch) / num_steps):  # the bar moves every sampler step, not every batch
            bar.update(share)

        x = sample_heun(denoise, noise.to(torch.float64) * sigmas[0], sigmas, labels, noise_fn=noise_fn,
                        callback=advance, **sampler_kwargs)
        outputs.append(x.to(torch.float32).cpu())
        all_classes += classes
    bar.close()
    return torch.cat(outputs), all_classes


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
    return seeds


def generate_to_folder(net, seeds, out_dir, class_idx=None, grid_path=None, **kwargs):
    images, classes = generate(net, seeds, class_idx=class_idx, **kwargs)
    images = decode_images(images).numpy()
    return write_samples(out_dir, images, list(seeds), classes, num_classes=net.label_dim, grid_path=grid_path)
