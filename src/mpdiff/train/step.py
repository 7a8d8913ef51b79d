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

Host synchronisation: nothing in a step reads a value back from the device. The loss, the counts of
non-finite losses and gradient entries and the gradient norm go into a :class:`DeviceTally`, which
also decides the non-finite guard on the device (SPEC §1.5: the image count at which the limit of
consecutive bad steps was reached). The training loop reads the tally, one small tensor, at the
status cadence and before anything is written (snapshots, grids, checkpoints); a tripped guard stops
the run there, naming the exact image count, and nothing computed after that step is ever saved.
"""

import contextlib
import dataclasses

import torch

from mpdiff.config import require
from mpdiff.data.pixels import PixelEncoder
from mpdiff.diffusion.loss import EDM2Loss, sample_sigma
from mpdiff.errors import DatasetError, NumericalError
from mpdiff.train.data_order import batch_indices, derived_seed
from mpdiff.train.optim import learning_rate, set_learning_rate
from mpdiff.train.state import HEALTH_COUNTERS


@dataclasses.dataclass
class TallyReading:
    counters: dict              # the health counters (HEALTH_COUNTERS) up to the newest step
    halted_at: int              # image count of the step on which the guard tripped; -1: it has not
    steps: int                  # steps since the interval began
    loss: float                 # mean over those steps of the batch's mean per-image loss
    grad_norm: float            # mean L2 norm of the whole gradient of the mean loss (loss scaling undone)
    grad_norm_max: float        # largest of those norms


class DeviceTally:
    """What the steps accumulate on the device between two reads by the host (one float64 vector).

    Carried across reads (and, through the state's counters, across checkpoints): the health counters
    of SPEC §1.5 and the image count at which the count of consecutive non-finite steps first reached
    `limit` (-1 while it has not). Per interval (reset by :meth:`new_interval`): the sum of the steps'
    mean losses, the sum and the maximum of their gradient norms. Float64 counts are exact to 2^53.
    """

    LOSS_STEPS, GRAD_STEPS, GRAD_VALUES, CONSECUTIVE, HALTED_AT, LOSS, NORM, NORM_MAX = range(8)

    def __init__(self, counters, limit, device="cpu"):
        self.limit = limit
        health = [float(counters[k]) for k in HEALTH_COUNTERS]  # same order as the indices above
        self.values = torch.tensor(health + [-1.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, nimg, loss_sum, bad_values, squares, batch, loss_scaling):
        """Fold in one step that started at image count `nimg`: `loss_sum` (the batch's summed loss),
        `bad_values` (non-finite gradient entries) and `squares` (squared norm of the cleaned, scaled
        gradient), all device scalars. Nothing is read back."""
        v = self.values
        loss_sum = loss_sum.to(v)
        bad_values = bad_values.to(v)
        loss_bad = ~torch.isfinite(loss_sum)
        grad_bad = bad_values > 0
        consecutive = torch.where(loss_bad | grad_bad, v[self.CONSECUTIVE] + 1, 0.0)
        tripped = (v[self.HALTED_AT] < 0) & (consecutive >= self.limit)
        halted_at = torch.where(tripped, float(nimg), v[self.HALTED_AT])
        norm = squares.to(v).sqrt() / loss_scaling
        self.values = torch.stack([v[self.LOSS_STEPS] + loss_bad, v[self.GRAD_STEPS] + grad_bad,
                                   v[self.GRAD_VALUES] + bad_values, consecutive, halted_at,
                                   v[self.LOSS] + loss_sum / batch, v[self.NORM] + norm,
                                   torch.maximum(v[self.NORM_MAX], norm)])
        self.steps += 1

    def read(self):
        """The tally as host numbers: the one device-to-host transfer."""
        values = self.values.tolist()
        counters = {k: int(values[i]) for i, k in enumerate(HEALTH_COUNTERS)}
        steps = max(self.steps, 1)
        return TallyReading(counters=counters, halted_at=int(values[self.HALTED_AT]), steps=self.steps,
                            loss=values[self.LOSS] / steps, grad_norm=values[self.NORM] / steps,
                            grad_norm_max=values[self.NORM_MAX])

    def new_interval(self):
        """Start the per-interval sums again (after a stats row)."""
        self.values = torch.cat([self.values[:self.LOSS], self.values.new_zeros(3)])
        self.steps = 0


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
        require(training.batch % self.dist.world_size == 0, f"{{batch}} {training.batch} cannot be split evenly over "
                f"{self.dist.world_size} processes", "batch")
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
        self.tally = None  # DeviceTally, started from the state's counters by the first step

    def local_part(self):
        """This process's slice of a step's global batch."""
        return slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)

    def indices_at(self, nimg):
        """This process's dataset indices of the step that starts at image count `nimg`."""
        return torch.tensor(batch_indices(self.seed, len(self.images), nimg, self.training.batch))[self.local_part()]

    def draw(self, nimg):
        """The step that starts at image count `nimg`: dataset indices and sigma of the whole batch (a few
        numbers per image), and the unit noise of this process's share only (see :meth:`share_normal`)."""
        batch, recipe = self.training.batch, self.training
        step_seed = derived_seed(self.seed, "step", nimg)
        torch.manual_seed(step_seed)  # dropout and anything else drawing from the global generator
        generator = torch.Generator().manual_seed(step_seed)
        indices = torch.tensor(batch_indices(self.seed, len(self.images), nimg, batch))
        sigma = sample_sigma(batch, recipe.P_mean, recipe.P_std, generator=generator)
        return indices, sigma, self.share_normal("noise", nimg)

    def share_normal(self, stream, nimg):
        """Unit normal tensors shaped like a network input, one per image of this process's share of the
        step at `nimg`. Image j of the step draws from its own generator, seeded by (seed, stream, nimg, j):
        a process draws only its share (not the global batch), and every image gets the same values for
        any number of processes and after a resume."""
        part = self.local_part()
        return torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(
            derived_seed(self.seed, stream, nimg, j))) for j in range(part.start, part.stop)])

    def encoding_noise(self, nimg):
        """The unit noise eps of the encoder's sample mean + std * eps for this process's share of the
        step at image count `nimg` (stream 'latent' of :meth:`share_normal`), or None when the encoder
        draws nothing (pixels)."""
        if not self.encoder.stochastic:
            return None
        if nimg is None:
            raise ValueError("a latent step needs its image count: its sample noise is drawn from it")
        return self.share_normal("latent", nimg)

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
        batch's slice; `indices` and `sigma` are the whole step's, `noise` this process's share, as
        :meth:`draw` gives them); returns this process's sum(loss) as a float64 device scalar."""
        batch, scale = self.training.batch, self.training.loss_scaling
        if pixels is None:
            pixels = self.fetch(nimg, indices)
        part = self.local_part()
        indices, sigma = indices[part], sigma[part]
        eps = self.encoding_noise(nimg)
        model = self.model if self.model is not None else (self.ddp if self.ddp is not None else net)
        objective = EDM2Loss(net.sigma_data, self.training.P_mean, self.training.P_std)  # not read through `model`
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
                loss = objective(model, images, labels, sigma=sigma[part].to(self.device),
                                 noise=noise[part].to(self.device))
                loss_sum = loss.sum()
                (loss_sum * factor).backward()
            total += loss_sum.detach().double()
        return total

    def __call__(self, state):
        """Take one step; returns its learning rate. Its loss and health go into :attr:`tally`."""
        recipe, batch = self.training, self.training.batch
        if self.tally is None:
            self.tally = DeviceTally(state.counters, self.max_nonfinite_steps, self.device)
        indices, sigma, noise = self.draw(state.nimg)
        pixels = self.fetch(state.nimg, indices)
        state.optimizer.zero_grad(set_to_none=True)
        loss_sum = self.accumulate_gradients(state.net, indices, sigma, noise, nimg=state.nimg, pixels=pixels)
        self.dist.all_sum(loss_sum)
        lr = learning_rate(state.nimg, batch, recipe.lr, recipe.decay, recipe.rampup_img)
        set_learning_rate(state.optimizer, lr)
        bad, squares = clean_gradients(state.net.parameters())  # non-finite entries zeroed (SPEC §1.5)
        self.tally.add(state.nimg, loss_sum, bad, squares, batch, recipe.loss_scaling)
        state.optimizer.step()
        state.advance(batch)
        return lr

    def settle(self, state):
        """Read the tally into the state's counters; raise NumericalError if the non-finite guard tripped
        (the steps after it are discarded: nothing of them may be written). Returns the reading."""
        reading = self.tally.read() if self.tally is not None else None
        if reading is None:
            return None
        state.counters.update(reading.counters)
        if reading.halted_at >= 0:
            raise NumericalError(f"training produced non-finite losses or gradients for {self.max_nonfinite_steps} "
                                 f"consecutive steps (at {reading.halted_at} images); stopped")
        return reading
