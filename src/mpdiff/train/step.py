"""One optimizer step (SPEC §1.2-1.5): the batch for the current image count, the loss accumulated
over micro-batches, the learning rate, the non-finite guard, Adam, and the EMA updates.

Everything random in a step (data order, noise levels, noise, dropout) is drawn from seeds derived
from (run seed, image count), so a resumed run repeats an uninterrupted one bit for bit, and the
micro-batch size changes only memory (and float rounding: the sum over micro-batches is
added in a different order).

Several processes (torchrun, :mod:`mpdiff.distributed`): the step's global batch, its noise levels
and noise are drawn as one process draws them; process r takes the r-th of world_size equal slices
of it. Gradients are summed over the processes by DistributedDataParallel, once per step: the
micro-batches before the last one run under ``no_sync``. The data stream therefore does not depend
on the number of processes, and a checkpoint resumes on any number. (Dropout masks are drawn per
process, so with dropout > 0 the runs agree in distribution, not bit for bit.)

Latent data (SPEC §7.1): the step's encoder (:class:`mpdiff.data.latents.LatentEncoder`) turns each
stored [mean, std] into the sample mean + std * eps that the network trains on; eps of the whole
global batch comes from its own generator seeded by (seed, 'latent', image count), like the noise,
so a resumed run repeats it and every process takes its slice. Pixel data draws nothing there.

Host synchronisation: the loss, the count of non-finite gradient entries and the gradient norm are
accumulated on the device and read once per step, as one small tensor (the non-finite guard decides
before Adam's step), not once per micro-batch or per parameter.
"""

import contextlib
import dataclasses
import math

import torch

from mpdiff.data.pixels import PixelEncoder
from mpdiff.diffusion.loss import edm2_loss, sample_sigma
from mpdiff.errors import DatasetError, NumericalError
from mpdiff.train.data_order import batch_indices, derived_seed
from mpdiff.train.optim import learning_rate, set_learning_rate


@dataclasses.dataclass
class StepResult:
    loss: float                 # mean per-image loss of the batch
    lr: float                   # learning rate used for the step
    bad_grad_values: int        # gradient entries that were NaN/Inf and were zeroed
    grad_norm: float = 0.0      # L2 norm of the whole gradient of the mean loss (loss scaling undone)


def gradient_norm(parameters):
    """L2 norm of all gradients together (ScaleLong's gradient-stability measure, SPEC §10.4)."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def clean_gradients(parameters):
    """Zero NaN/Inf gradient entries in place (SPEC §1.5); returns device scalars (number of bad entries,
    squared L2 norm of the cleaned gradient), without reading them back."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros([]), torch.zeros([])
    bad = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum()
    for g in grads:
        torch.nan_to_num(g, nan=0, posinf=0, neginf=0, out=g)
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]).sum()
    return bad, squares


class TrainStep:
    """Callable that advances a :class:`~mpdiff.train.state.TrainState` by one optimizer step.

    `images`: the dataset's uint8 images, indexable by a tensor of indices (a tensor [N, C, H, W] or
    :class:`mpdiff.train.feed.IndexedImages`); `feed` (:mod:`mpdiff.train.feed`) delivers each step's
    images (default: indexing `images`). `labels` is float one-hot [N, classes] or None.
    `micro_batch` limits how many images go through the network at once; `dist` and `ddp` (the
    DistributedDataParallel wrapper of the state's network) split the batch over processes. `encoder`
    (default :class:`~mpdiff.data.pixels.PixelEncoder`) turns the data into what the network sees and sets
    its channel count (``encoder.channels(data channels)``: 4 for 8-channel latents).
    """

    def __init__(self, images, labels, training, seed, micro_batch=None, max_nonfinite_steps=50, device="cpu",
                 feed=None, dist=None, ddp=None, encoder=None):
        from mpdiff.distributed import Distributed
        from mpdiff.train.feed import MemoryFeed

        self.images = images
        self.labels = labels
        self.training = training
        self.seed = seed
        self.dist = dist or Distributed.single()
        if training.batch % self.dist.world_size:
            from mpdiff.errors import ConfigError
            raise ConfigError(f"{{batch}} {training.batch} cannot be split evenly over {self.dist.world_size} "
                              f"processes", fields=("batch",))
        self.local_batch = training.batch // self.dist.world_size
        self.micro_batch = min(micro_batch or training.batch, self.local_batch)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.device = torch.device(device)
        self.feed = feed or MemoryFeed(images)
        self.ddp = ddp
        self.encoder = encoder or PixelEncoder()
        data_shape = tuple(images.shape[1:])
        self.shape = (self.encoder.channels(data_shape[0]), *data_shape[1:])  # what the network sees and makes
        self.model = None  # what runs forward and backward, when not the network (or its DDP wrapper): compiled

    def local_part(self):
        """This process's slice of a step's global batch."""
        return slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)

    def indices_at(self, nimg):
        """This process's dataset indices of the step that starts at image count `nimg`."""
        return torch.tensor(batch_indices(self.seed, len(self.images), nimg, self.training.batch))[self.local_part()]

    def draw(self, nimg):
        """(dataset indices, sigma, unit noise) of the whole step that starts at image count `nimg`."""
        batch, recipe = self.training.batch, self.training
        step_seed = derived_seed(self.seed, "step", nimg)
        torch.manual_seed(step_seed)  # dropout and anything else drawing from the global generator
        generator = torch.Generator().manual_seed(step_seed)
        indices = torch.tensor(batch_indices(self.seed, len(self.images), nimg, batch))
        sigma = sample_sigma(batch, recipe.P_mean, recipe.P_std, generator=generator)
        noise = torch.randn([batch, *self.shape], generator=generator)
        return indices, sigma, noise

    def encoding_noise(self, nimg):
        """The unit noise eps of the encoder's sample mean + std * eps for the whole step that starts at
        image count `nimg` (from a generator seeded by (seed, 'latent', nimg)), or None when the encoder
        draws nothing (pixels)."""
        if not self.encoder.stochastic:
            return None
        if nimg is None:
            raise ValueError("a latent step needs its image count: its sample noise is drawn from it")
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "latent", nimg))
        return torch.randn([self.training.batch, *self.shape], generator=generator)

    def fetch(self, nimg, indices):
        """This process's images of the step (uint8). A bad file stops every process: each learns of it
        before any collective of the step, so none is left waiting."""
        error = None
        try:
            pixels = self.feed.get(nimg, indices[self.local_part()])
        except DatasetError as e:
            pixels, error = None, e
        if self.dist.active:
            failed = self.dist.all_sum(torch.tensor([0.0 if error is None else 1.0]))
            if float(failed[0]) and error is None:
                error = DatasetError(f"another process met a bad file at {nimg:,} images (its error is above)")
        if error is not None:
            raise error
        return pixels

    def accumulate_gradients(self, net, indices, sigma, noise, nimg=None, pixels=None):
        """Backpropagate sum(loss) * loss_scaling / batch over this process's micro-batches (the global
        batch's slice); returns this process's sum(loss) as a float64 device scalar."""
        batch, scale = self.training.batch, self.training.loss_scaling
        if pixels is None:
            pixels = self.fetch(nimg, indices)
        part = self.local_part()
        indices, sigma, noise = indices[part], sigma[part], noise[part]
        eps = self.encoding_noise(nimg)
        if eps is not None:
            eps = eps[part]
        model = self.model or (self.ddp if self.ddp is not None else net)
        factor = scale / batch * self.dist.world_size  # DDP averages the processes' gradients: undo the 1/world
        total = torch.zeros([], dtype=torch.float64, device=self.device)
        starts = list(range(0, len(indices), self.micro_batch))
        for k, start in enumerate(starts):
            part = slice(start, start + self.micro_batch)
            idx = indices[part]
            images = self.encoder.encode(pixels[part], eps=None if eps is None else eps[part]).to(self.device)
            labels = None if self.labels is None else self.labels[idx].to(self.device)
            sync = self.ddp is None or k == len(starts) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = edm2_loss(model, images, labels, sigma=sigma[part].to(self.device),
                                 noise=noise[part].to(self.device))
                loss_sum = loss.sum()
                (loss_sum * factor).backward()
            total += loss_sum.detach().double()
        return total

    def __call__(self, state):
        recipe, batch = self.training, self.training.batch
        indices, sigma, noise = self.draw(state.nimg)
        pixels = self.fetch(state.nimg, indices)
        state.optimizer.zero_grad(set_to_none=True)
        loss_sum = self.accumulate_gradients(state.net, indices, sigma, noise, nimg=state.nimg, pixels=pixels)
        self.dist.all_sum(loss_sum)
        lr = learning_rate(state.nimg, batch, recipe.lr, recipe.decay, recipe.rampup_img)
        set_learning_rate(state.optimizer, lr)
        bad, squares = clean_gradients(state.net.parameters())
        total_loss, bad_grads, squares = torch.stack([loss_sum, bad.to(loss_sum), squares.to(loss_sum)]).tolist()
        bad_grads = int(bad_grads)
        self._check_health(state, math.isfinite(total_loss), bad_grads)
        grad_norm = math.sqrt(squares) / recipe.loss_scaling
        state.optimizer.step()
        state.advance(batch)
        return StepResult(loss=total_loss / batch, lr=lr, bad_grad_values=bad_grads, grad_norm=grad_norm)
    def _check_health(self, state, loss_finite, bad_grads):
        """Count non-finite steps (SPEC §1.5); stop after too many in a row, before Adam takes the step."""
        counters = state.counters
        if bad_grads:
            counters["nonfinite_grad_steps"] += 1
            counters["nonfinite_grad_values"] += bad_grads
        if not loss_finite:
            counters["nonfinite_loss_steps"] += 1
        if not (bad_grads or not loss_finite):
            counters["consecutive_nonfinite"] = 0
            return
        counters["consecutive_nonfinite"] += 1
        if counters["consecutive_nonfinite"] >= self.max_nonfinite_steps:
            raise NumericalError(f"training produced non-finite losses or gradients for "
                                 f"{counters['consecutive_nonfinite']} consecutive steps (at {state.nimg} images); "
                                 f"stopped")
