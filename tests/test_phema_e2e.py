"""Post-hoc EMA end to end: train, snapshot two profiles, reconstruct a third, compare with tracking it.

Acceptance: ||w_rec - w_tracked|| / ||w_tracked - w_raw|| <= 0.05 over all parameters, where w_tracked
is sigma_rel = 0.07 tracked directly during training and w_raw the final raw weights.
"""

import os

import pytest
import torch
from conftest import tiny_config

from mpdiff.data.digits import load_builtin_digits
from mpdiff.ema.reconstruct import reconstruct
from mpdiff.ema.snapshots import list_snapshots, save_ema_snapshots
from mpdiff.ema.trackers import PowerFunctionEMA
from mpdiff.nn.build import build_network
from mpdiff.storage.network_files import load_network
from mpdiff.storage.tensors import load_tensors

TARGET = 0.07
pytestmark = pytest.mark.slow  # trains two networks (a few seconds); runs in CI all the same


def _train(net, forward, steps, batch, snapshot_every, run_dir, network_config, lr):
    """Denoising MSE on the built-in digits with Adam; snapshots of (0.05, 0.10), TARGET tracked directly."""
    generator = torch.Generator().manual_seed(0)
    images = torch.from_numpy(load_builtin_digits()["train_images"]).float() / 127.5 - 1
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    ema = PowerFunctionEMA(net, (0.05, 0.10))
    tracked = PowerFunctionEMA(net, (TARGET,))
    nimg = 0
    for step in range(1, steps + 1):
        clean = images[torch.randint(len(images), (batch,), generator=generator)]
        sigma = (torch.randn(batch, generator=generator) * 1.2 - 0.4).exp()
        noisy = clean + torch.randn(clean.shape, generator=generator) * sigma.reshape(-1, 1, 1, 1)
        loss = (forward(noisy, sigma) - clean).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        nimg += batch
        ema.update(nimg, batch)
        tracked.update(nimg, batch)
        if step % snapshot_every == 0:
            save_ema_snapshots(ema, os.path.join(run_dir, "snapshots"), network_config, step=step, batch_size=batch)
    return tracked


def _relative_error(net, reconstructed, tracked):
    names = [name for name, _ in net.named_parameters()]
    flat = lambda state: torch.cat([state[name].detach().double().flatten() for name in names])
    w_rec = flat(reconstructed)
    w_tracked = flat(tracked.averaged_state_dict())
    w_raw = flat(dict(net.named_parameters()))
    return ((w_rec - w_tracked).norm() / (w_tracked - w_raw).norm()).item()


class DenoiserMLP(torch.nn.Module):
    def __init__(self, pixels=64, width=256):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(pixels + 1, width), torch.nn.SiLU(),
                                          torch.nn.Linear(width, width), torch.nn.SiLU(),
                                          torch.nn.Linear(width, pixels))

    def forward(self, noisy, sigma):
        sigma = sigma.reshape(-1, 1)
        x = torch.cat([noisy.flatten(1) / (1 + sigma ** 2).sqrt(), sigma.log() / 4], dim=1)
        return self.layers(x).reshape(noisy.shape)


def test_reconstructed_profile_matches_tracked_profile_mlp(tmp_path):
    torch.manual_seed(0)
    net = DenoiserMLP(width=128)
    tracked = _train(net, net, steps=256, batch=64, snapshot_every=16, run_dir=tmp_path,
                     network_config={"kind": "DenoiserMLP", "width": 128}, lr=3e-3)
    [path] = reconstruct(tmp_path, TARGET, progress=False)
    assert len(list_snapshots(tmp_path)) == 2 * 256 // 16
    error = _relative_error(net, load_tensors(path)[0], tracked)
    print(f"relative error {error:.2e}")
    assert error <= 0.05, error


def test_reconstructed_profile_matches_tracked_profile_precond(tmp_path):
    """Same with a tiny config-G network: the output is a loadable network with the buffers intact."""
    torch.manual_seed(0)
    config = tiny_config(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=(1, 2),
                         num_blocks=1, attn_resolutions=())
    net = build_network(config)
    tracked = _train(net, net, steps=48, batch=32, snapshot_every=4, run_dir=tmp_path, network_config=config,
                     lr=1e-2)
    [path] = reconstruct(tmp_path, TARGET, progress=False)
    loaded, meta = load_network(path)
    assert meta["kind"] == "phema-reconstruction" and meta["nimg"] == 48 * 32
    assert torch.equal(loaded.unet.emb_fourier.freqs, net.unet.emb_fourier.freqs)
    error = _relative_error(net, loaded.state_dict(), tracked)
    print(f"relative error {error:.2e}")
    assert error <= 0.05, error
