"""EDM sampling (SPEC §6): noise-level schedule, the 2nd-order Heun sampler, per-seed generation.

Samplers share one signature, ``sampler(denoise, x, sigmas, labels=None, progress=False, ...)``,
where ``denoise(x, sigma, labels)`` is any denoiser (a network, or a guided combination).
"""

import numpy as np
import torch
from tqdm.auto import tqdm


def edm_sigmas(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, device="cpu"):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then t_N = 0."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if num_steps == 1:
        t = torch.full([1], float(sigma_max), dtype=torch.float64, device=device)
    else:
        t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def sample_heun(denoise, x, sigmas, labels=None, progress=False, S_churn=0.0, S_min=0.0,
                S_max=float("inf"), S_noise=1.0, noise_fn=None):
    """EDM Algorithm 1 (deterministic by default), starting from x = noise * sigmas[0].

    NFE = 2N - 1 for N steps (no correction on the last step to sigma = 0). With S_churn > 0,
    noise is added before each step (EDM Algorithm 2); `noise_fn(shape)` supplies it so per-image
    generators stay independent of batching.
    """
    num_steps = len(sigmas) - 1
    x = x.to(torch.float64)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", leave=False):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        t_hat = t_cur
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t_cur * (1 + gamma)
            eps = noise_fn(x.shape) if noise_fn is not None else torch.randn_like(x)
            x = x + (t_hat ** 2 - t_cur ** 2) ** 0.5 * S_noise * eps.to(x)
        d = (x - _call(denoise, x, t_hat, labels)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if i < num_steps - 1:
            d_next = (x_next - _call(denoise, x_next, t_next, labels)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next
    return x


def _call(denoise, x, sigma, labels):
    sigma_t = torch.full([x.shape[0]], sigma, dtype=torch.float32, device=x.device)
    return denoise(x.to(torch.float32), sigma_t, labels).to(torch.float64)


def guided(net, guide=None, guidance=1.0):
    """D = w * D_net + (1 - w) * D_guide (SPEC §6.4): CFG with an unconditional guide, or
    autoguidance with a weaker conditional one. w = 1 (or no guide) skips the guide."""
    if guide is None or guidance == 1:
        return lambda x, sigma, labels: net(x, sigma, labels)
    return lambda x, sigma, labels: guide(x, sigma, labels).lerp(net(x, sigma, labels), guidance)


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
    labels = torch.nn.functional.one_hot(torch.tensor(classes), num_classes).to(torch.float32).to(device)
    return noise, labels, classes


@torch.no_grad()
def generate(net, seeds, class_idx=None, batch_size=256, num_steps=32, sigma_min=0.002, sigma_max=80.0,
             rho=7.0, guide=None, guidance=1.0, progress=True, device="cpu", **sampler_kwargs):
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
    for start, batch in tqdm(list(zip(range(0, len(seeds), batch_size), batches)), disable=not progress,
                             desc="generating", unit="batch"):
        noise, labels, classes = seed_inputs(batch, shape, net.label_dim, per_seed[start:start + len(batch)], device)
        gens = [seed_generator(s + (1 << 31)) for s in batch]  # separate stream for churn noise

        def noise_fn(full_shape, gens=gens):
            return torch.stack([torch.randn(full_shape[1:], generator=g) for g in gens]).to(device)

        x = sample_heun(denoise, noise.to(torch.float64) * sigmas[0], sigmas, labels, noise_fn=noise_fn,
                        **sampler_kwargs)
        outputs.append(x.to(torch.float32).cpu())
        all_classes += classes
    return torch.cat(outputs), all_classes


MAX_SEEDS = 10_000_000  # a typo such as 0-99999999999 must not exhaust memory


def parse_seeds(text):
    """'0-999' or '1,5,7-9' -> list of ints (inclusive ranges)."""
    from .errors import ConfigError
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
