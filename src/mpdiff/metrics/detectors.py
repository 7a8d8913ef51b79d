"""Feature detectors for Fréchet distances, behind one interface, and streaming feature statistics
(SPEC §7.5).

A :class:`Detector` turns a batch of images, uint8 [N, C, H, W] as a dataset or a sampler produces
them (C = 1 or 3), into features [N, D]. It owns its preprocessing (resizing, value range, channel
replication for grayscale), so callers never prepare images for a particular network.
:class:`FeatureStats` accumulates the mean and covariance of features in float64 as batches arrive,
so that no image and no feature matrix is kept: memory is O(D^2) whatever the number of images.
"""

import numpy as np
import torch

from mpdiff.errors import MpdiffError


class Detector:
    """A feature network with its preprocessing.

    Subclasses set `name` (the metric key prefix, e.g. 'fid' for Inception-v3) and `feature_dim`,
    and implement :meth:`preprocess` and :meth:`embed`.
    """

    name = "detector"
    metric = "fd"          # the name of the Fréchet distance in this detector's features
    feature_dim = 0

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (C = 1 or 3) -> the network's input (float, on self.device)."""
        raise NotImplementedError

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's features [N, feature_dim] of preprocessed inputs."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, feature_dim] (float32, CPU) of uint8 images [N, C, H, W]."""
        images = check_images(images)
        return self.embed(self.preprocess(images)).float().cpu()


def check_images(images) -> torch.Tensor:
    """uint8 [N, C, H, W] with C in (1, 3), as a tensor; MpdiffError otherwise."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise MpdiffError(f"detectors take uint8 images [N, 1 or 3, H, W], got {str(images.dtype).replace('torch.', '')} "
                          f"{list(images.shape)}")
    return images


class FeatureStats:
    """Running mean and covariance of features, accumulated in float64 (SPEC §7.5).

    Holds the count, the sum and the sum of outer products; :meth:`mean_cov` returns the mean and the
    unbiased covariance. The sums are taken about a shift (the first batch's mean), which keeps the
    float64 accumulation accurate even when the features' mean is large against their spread.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.shift = None
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def add(self, features):
        x = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy() if isinstance(features, torch.Tensor)
                       else features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {list(x.shape)}")
        if not len(x):
            return self
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x = x - self.shift
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def all_reduce(self, dist):
        """Combine the statistics of every process of `dist` (:class:`mpdiff.distributed.Distributed`)
        in place: afterwards each holds those of all features. Each process's sums are re-centred on the
        common mean first (Chan's parallel formula), so nothing is lost to a large mean."""
        if not dist.active:
            return self
        own_mean = self.sum / self.count + self.shift if self.count else np.zeros(self.dim)
        totals = dist.all_sum(torch.from_numpy(np.concatenate([[self.count], self.count * own_mean])))
        count = int(round(float(totals[0])))
        mean = (totals[1:] / max(count, 1)).numpy()
        if self.count:
            centred = self.sum / self.count
            scatter = self.outer - self.count * np.outer(centred, centred)  # about this process's own mean
            offset = own_mean - mean
            scatter = scatter + self.count * np.outer(offset, offset)
        else:
            scatter = np.zeros((self.dim, self.dim))
        self.outer = dist.all_sum(torch.from_numpy(np.ascontiguousarray(scatter))).numpy()
        self.count, self.shift, self.sum = count, mean, np.zeros(self.dim)
        return self

    def mean_cov(self):
        """(mean [D], unbiased covariance [D, D]) in float64; needs at least two feature vectors."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors, have {self.count}")
        centred = self.sum / self.count
        mean = self.shift + centred
        cov = (self.outer - self.count * np.outer(centred, centred)) / (self.count - 1)
        return mean, (cov + cov.T) / 2
