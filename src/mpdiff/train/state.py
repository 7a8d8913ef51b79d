"""The training state: everything a run must carry across a restart, apart from any file format.

:class:`TrainState` owns the live network, the optimiser, the EMA trackers, the image and step
counters and the numerical-health counters. Its :meth:`state_dict` is a nested dict of tensors and
plain values; :mod:`mpdiff.train.checkpoint` turns that into a file and back.
"""

import torch

from mpdiff.ema.trackers import PowerFunctionEMA, TraditionalEMA
from mpdiff.nn.build import build_network
from mpdiff.train.data_order import derived_seed
from mpdiff.train.optim import make_optimizer

HEALTH_COUNTERS = ("nonfinite_loss_steps", "nonfinite_grad_steps", "nonfinite_grad_values", "consecutive_nonfinite")


class TrainState:
    """Live network, Adam, EMA trackers and counters of one run."""

    def __init__(self, network_config, training_config, seed, device="cpu"):
        torch.manual_seed(derived_seed(seed, "init"))  # the initial weights depend on the seed only
        self.net = build_network(network_config, device=device).train()
        self.optimizer = make_optimizer(self.net.parameters(), betas=training_config.betas)
        self.ema = PowerFunctionEMA(self.net, training_config.ema_sigma_rels)
        self.traditional_ema = None  # the classic alternative (config A), opt-in
        if training_config.ema_halflife_img:
            self.traditional_ema = TraditionalEMA(self.net, training_config.ema_halflife_img)
        self.nimg = 0                # training images seen
        self.step = 0                # optimizer steps taken
        self.counters = dict.fromkeys(HEALTH_COUNTERS, 0)
        self.counters["elapsed_sec"] = 0.0

    def advance(self, batch):
        """Count one optimizer step of `batch` images and fold the new weights into the EMAs."""
        self.nimg += batch
        self.step += 1
        self.ema.update(self.nimg, batch)
        if self.traditional_ema is not None:
            self.traditional_ema.update(self.nimg, batch)

    def weights_finite(self):
        return all(bool(torch.isfinite(p).all()) for p in self.net.parameters())

    def state_dict(self):
        state = {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                 "nimg": self.nimg, "step": self.step, "counters": dict(self.counters)}
        if self.traditional_ema is not None:
            state["traditional_ema"] = self.traditional_ema.state_dict()
        return state

    def load_state_dict(self, state, source="training state"):
        """Restore from :meth:`state_dict` output; raises CheckpointError (naming `source`) on a mismatch."""
        from mpdiff.errors import CheckpointError, first_line

        try:
            self.net.load_state_dict(state["net"])
        except RuntimeError as e:
            raise CheckpointError(f"{source}: weights do not match the network ({first_line(e)})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"], source=source)
        if self.traditional_ema is not None:
            self.traditional_ema.load_state_dict(state["traditional_ema"], source=source)
        self.nimg, self.step = int(state["nimg"]), int(state["step"])
        self.counters.update(state["counters"])
