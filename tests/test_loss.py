"""Loss, learning-rate schedule and optimizer (SPEC §1.2-1.4, §11 item 9)."""

import math

import pytest
import torch
from conftest import tiny_config

from mpdiff import build_network
from mpdiff.diffusion.loss import edm2_loss, edm_weight
from mpdiff.train.optim import learning_rate, make_optimizer
from mpdiff.train.step import clean_gradients


def test_edm2_loss_matches_formula_with_replayed_draws():
    import copy
    net = build_network(tiny_config()).eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(0.3)
        net.logvar_linear.weight.mul_(3)
    twin = copy.deepcopy(net).train()
    y = torch.randn(4, 3, 16, 16) * 0.5
    labels = torch.eye(10)[:4]
    sigma = torch.tensor([0.01, 0.3, 3.0, 60.0])
    noise = torch.randn_like(y)
    loss = edm2_loss(net, y, labels, sigma=sigma, noise=noise)
    s = sigma.view(-1, 1, 1, 1)
    D, u = net(y + noise * s, sigma, labels, return_logvar=True)
    expected = (s ** 2 + 0.25) / (s * 0.5) ** 2 / u.exp() * (D - y) ** 2 + u
    assert loss.shape == y.shape
    assert torch.allclose(loss, expected, rtol=1e-6)
    # Replaying the same draws gives the same loss bit for bit (also in training mode).
    assert torch.equal(edm2_loss(net, y, labels, sigma=sigma, noise=noise), loss)
    first = edm2_loss(twin, y, labels, sigma=sigma, noise=noise)
    assert torch.equal(edm2_loss(copy.deepcopy(net).train(), y, labels, sigma=sigma, noise=noise), first)


def test_edm_weight_makes_initial_loss_unit():
    # At init D = c_skip * x and u = 0, so lambda(sigma) * E||D - y||^2 = 1 per element (Eq. 15).
    net = build_network(tiny_config(label_dim=0, model_channels=8, attn_resolutions=()))  # any size will do
    with torch.no_grad():
        net.logvar_linear.weight.zero_()
    y = torch.randn(256, 3, 16, 16) * 0.5
    for s in [0.05, 1.0, 20.0]:
        with torch.no_grad():
            loss = edm2_loss(net, y, sigma=torch.full([256], s))
        # A mean over 196,608 elements: its relative standard deviation is ~0.3%, so 2% is over 6 of them.
        assert loss.mean().item() == pytest.approx(1.0, rel=0.02)
    assert edm_weight(torch.tensor(0.5)).item() == pytest.approx(8.0)


def test_learning_rate_schedule():
    kw = dict(lr=0.01, decay=70000, rampup_img=10_000_000)
    assert learning_rate(0, 2048, **kw) == 0.0  # first step has lr 0
    assert learning_rate(5_000_000, 2048, **kw) == pytest.approx(0.005)  # half-way up the ramp
    assert learning_rate(70000 * 2048, 2048, **kw) == pytest.approx(0.01)  # end of ramp, before t_ref
    assert learning_rate(4 * 70000 * 2048, 2048, **kw) == pytest.approx(0.01 / math.sqrt(4))
    assert learning_rate(2 ** 20 * 2048, 2048, **kw) == pytest.approx(0.01 / math.sqrt(2 ** 20 / 70000))
    assert learning_rate(10 ** 12, 2048, lr=2e-4, decay=None, rampup_img=10_000_000) == 2e-4  # constant


def test_optimizer_is_plain_adam_with_paper_betas():
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.Adam
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8 and group["weight_decay"] == 0


def test_clean_gradients_zeroes_nonfinite_entries_and_measures_the_cleaned_norm():
    # SPEC §1.5: NaN/Inf gradient entries become 0; the squared L2 norm is of all gradients together
    # (ScaleLong's gradient-stability measure, SPEC §10.4): 3^2 + 4^2 + 12^2 = 13^2.
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (4, 3, 1))
    a.grad = torch.tensor([3.0, float("nan"), float("inf"), -float("inf")])
    b.grad = torch.tensor([0.0, 4.0, 12.0])  # c has no gradient
    bad, squares = clean_gradients([a, b, c])
    assert int(bad) == 3 and float(squares) == 169.0
    assert a.grad.tolist() == [3.0, 0.0, 0.0, 0.0] and c.grad is None


def test_a_training_step_through_ddp_uses_the_networks_sigma_data(tmp_path):
    """The loss under DDP equals the loss of the network for any sigma_data: the step's objective owns
    the constant (it was read through the wrapper, which hides it, and the default 0.5 won: with
    sigma_data 1.0 the loss through the wrapper was 719.8 against 386.3)."""
    import torch.distributed as dist
    from conftest import randomized_network
    from torch.nn.parallel import DistributedDataParallel

    from mpdiff.config import TrainingConfig
    from mpdiff.diffusion.loss import EDM2Loss
    from mpdiff.train.step import TrainStep

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.eye(10)[torch.tensor([1, 2, 3, 4])]
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for sigma_data in (1.0, 2.0, 0.5):
            net = randomized_network(seed=1, sigma_data=sigma_data).train()
            step = TrainStep(images, labels, TrainingConfig(batch=4, duration=8), seed=5)
            indices, sigma, noise = step.draw(0)
            alone = step.accumulate_gradients(net, indices, sigma, noise, nimg=0)
            step.ddp = DistributedDataParallel(net)
            wrapped = step.accumulate_gradients(net, indices, sigma, noise, nimg=0)
            assert float(wrapped) == pytest.approx(float(alone), rel=1e-6), sigma_data
            net.eval()  # in training each call re-normalises the weights in place (forced WN)
            y = torch.randn(2, 3, 16, 16)
            direct = edm2_loss(net, y, labels[:2], sigma=torch.tensor([0.3, 3.0]), noise=torch.ones_like(y))
            through = EDM2Loss(sigma_data=sigma_data)(step.ddp, y, labels[:2], sigma=torch.tensor([0.3, 3.0]),
                                                       noise=torch.ones_like(y))
            assert torch.equal(through, direct)
            with pytest.raises(TypeError, match="needs the network itself, not a DistributedDataParallel"):
                edm2_loss(step.ddp, y, labels[:2])
    finally:
        dist.destroy_process_group()


def test_each_process_draws_only_its_share_of_the_step_noise_and_every_image_the_same_values():
    """A step's unit noise (and a latent step's eps) is drawn per image from (seed, stream, nimg, j): a
    process of N draws batch/N images' worth, not the global batch's, and image j gets the same values
    for any number of processes (so results are equal for any N, and a resume redraws them exactly)."""
    from mpdiff.config import TrainingConfig
    from mpdiff.distributed import Distributed
    from mpdiff.train.data_order import derived_seed
    from mpdiff.train.step import TrainStep

    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    training = TrainingConfig(batch=8, duration=64)

    def step(rank, world):
        return TrainStep(images, None, training, seed=7, dist=Distributed(rank=rank, world_size=world))

    indices, sigma, alone = step(0, 1).draw(16)
    assert alone.shape == (8, 3, 8, 8)
    for world in (2, 4):
        shares = [step(rank, world).draw(16) for rank in range(world)]
        assert all(s[2].shape == (8 // world, 3, 8, 8) for s in shares)       # only its share is drawn
        assert torch.equal(torch.cat([s[2] for s in shares]), alone)            # the same values
        assert all(torch.equal(s[0], indices) and torch.equal(s[1], sigma) for s in shares)
    # Image 5 of the step at 16 images: its own generator, independent of the batch around it.
    expected = torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(derived_seed(7, "noise", 16, 5)))
    assert torch.equal(alone[5], expected) and torch.equal(step(0, 1).draw(16)[2], alone)
    assert not torch.equal(step(0, 1).draw(24)[2], alone)
