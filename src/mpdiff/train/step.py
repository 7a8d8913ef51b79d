"""One optimizer step (SPEC §1.2-1.5): the batch for the current image count, the loss accumulated
over micro-batches, the learning rate, the non-finite guard, Adam, and the EMA updates.

Everything random in a step (data order, noise levels, noise, dropout) is drawn from seeds derived
from (run seed, image count), so a resumed run repeats an uninterrupted one bit for bit, and the
micro-batch size changes only memory (and float rounding: the sum over micro-batches is
added in a different order).
"""

import dataclasses
import math

import torch

from mpdiff.data.pixels import encode_images
from mpdiff.diffusion.loss import edm2_loss, sample_sigma
from mpdiff.errors import NumericalError
from mpdiff.train.data_order import batch_indices, derived_seed
from mpdiff.train.optim import learning_rate, set_learning_rate, zero_nonfinite_grads


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


class TrainStep:
    """Callable that advances a :class:`~mpdiff.train.state.TrainState` by one optimizer step.

    `images` (uint8 [N, C, H, W]) and `labels` (float one-hot [N, classes] or None) are the whole
    dataset; `micro_batch` limits how many images go through the network at once.
    """

    def __init__(self, images, labels, training, seed, micro_batch=None, max_nonfinite_steps=50, device="cpu"):
        self.images = images
        self.labels = labels
        self.training = training
        self.seed = seed
        self.micro_batch = micro_batch or training.batch
        self.max_nonfinite_steps = max_nonfinite_steps
        self.device = torch.device(device)

    def draw(self, nimg):
        """(dataset indices, sigma, unit noise) of the step that starts at image count `nimg`."""
        batch, recipe = self.training.batch, self.training
        step_seed = derived_seed(self.seed, "step", nimg)
        torch.manual_seed(step_seed)  # dropout and anything else drawing from the global generator
        generator = torch.Generator().manual_seed(step_seed)
        indices = torch.tensor(batch_indices(self.seed, len(self.images), nimg, batch))
        sigma = sample_sigma(batch, recipe.P_mean, recipe.P_std, generator=generator)
        noise = torch.randn([batch, *self.images.shape[1:]], generator=generator)
        return indices, sigma, noise

    def accumulate_gradients(self, net, indices, sigma, noise):
        """Backpropagate sum(loss) * loss_scaling / batch over the micro-batches; returns sum(loss)."""
        batch, scale = self.training.batch, self.training.loss_scaling
        total = 0.0
        for start in range(0, batch, self.micro_batch):
            part = slice(start, start + self.micro_batch)
            idx = indices[part]
            images = encode_images(self.images[idx]).to(self.device)
            labels = None if self.labels is None else self.labels[idx].to(self.device)
            loss = edm2_loss(net, images, labels, sigma=sigma[part].to(self.device), noise=noise[part].to(self.device))
            loss_sum = loss.sum()
            (loss_sum * (scale / batch)).backward()
            total += float(loss_sum.detach())
        return total

    def __call__(self, state):
        recipe, batch = self.training, self.training.batch
        indices, sigma, noise = self.draw(state.nimg)
        state.optimizer.zero_grad(set_to_none=True)
        total_loss = self.accumulate_gradients(state.net, indices, sigma, noise)
        lr = learning_rate(state.nimg, batch, recipe.lr, recipe.decay, recipe.rampup_img)
        set_learning_rate(state.optimizer, lr)
        bad_grads = zero_nonfinite_grads(state.net.parameters())
        self._check_health(state, math.isfinite(total_loss), bad_grads)
        grad_norm = gradient_norm(state.net.parameters()) / recipe.loss_scaling
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
