"""Optional cross-check against NVIDIA's own EDM2 code.

NVIDIA's code is not part of mpdiff (its licence is non-commercial). Point MPDIFF_EDM2_REF at a
checkout of github.com/NVlabs/edm2 to run these; without it tests/conftest.py does not collect this
file. tests/test_ref_edm2.py checks the same on every run, against fixtures made by NVIDIA's code.
"""

import os
import sys

import pytest
import torch

from mpdiff.diffusion.loss import edm2_loss
from mpdiff.nn.compat import load_edm2

REF = os.environ.get("MPDIFF_EDM2_REF")
pytestmark = pytest.mark.skipif(not REF, reason="set MPDIFF_EDM2_REF to a NVlabs/edm2 checkout")


@pytest.fixture(scope="module")
def ref_precond():
    sys.path.insert(0, REF)
    from training.networks_edm2 import Precond
    return Precond


@pytest.mark.parametrize("randomize_gains", [False, True])
def test_matches_nvidia_eval_and_after_training_steps(ref_precond, randomize_gains):
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2, 2],
              num_blocks=2, attn_resolutions=[8, 4], channels_per_head=16)
    ref = ref_precond(**kw)
    if randomize_gains:
        with torch.no_grad():
            for p in ref.parameters():
                if p.ndim == 0:
                    p.copy_(torch.randn([]))
    ours = load_edm2(ref.state_dict(), channels_per_head=16)
    n = 6
    sigma = torch.tensor([0.002, 0.02, 0.3, 2.0, 20.0, 80.0])
    labels = torch.eye(10)[torch.arange(n)]
    x = torch.randn(n, 3, 16, 16) * sigma.view(-1, 1, 1, 1)

    def compare():
        ref.eval(), ours.eval()
        with torch.no_grad():
            a, b = ref(x, sigma, labels), ours(x, sigma, labels)
        assert ((a - b).norm() / a.norm()).item() <= 1e-5

    compare()
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8) for m in (ref, ours)]
    y = torch.randn(n, 3, 16, 16) * 0.5
    for _ in range(3):
        s = (torch.randn(n) * 1.2 - 0.4).exp()
        noise = torch.randn_like(y)
        for m, opt in zip((ref, ours), opts):
            m.train()
            opt.zero_grad()
            edm2_loss(m, y, labels, sigma=s, noise=noise).sum().div(n).backward()
            opt.step()
        compare()
