import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**changes):
    """A small config-G network that exercises every block type (down/up, attention, skips)."""
    from mpdiff.presets import NetworkConfig
    base = NetworkConfig(img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                         channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8, 4),
                         channels_per_head=16, use_fp16=False)
    return base.replace(**changes)
