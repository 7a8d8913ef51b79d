"""Where a training step's images come from: the dataset in memory, or read and decoded per image by
DataLoader worker processes, a few steps ahead (issue 16).

Either way the step asks for the images of a list of dataset indices that the data order
(:mod:`mpdiff.train.data_order`) fixed from (seed, image count): the order never depends on the
feed, on the number of workers or on the number of processes. A streamed feed knows the coming
steps' indices in advance and has them decoded in the background; it hands them over strictly in
order and checks that they are the ones asked for.
"""

import torch

from mpdiff.errors import DatasetError

DEFAULT_WORKERS = 2     # decoding processes of a streamed feed
PREFETCH_STEPS = 2      # batches each worker decodes ahead


class IndexedImages:
    """A dataset's images as a uint8 tensor-like: len, shape and images[indices] (read per image)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.shape = (len(dataset), *dataset.shape)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, indices):
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        return torch.stack([torch.from_numpy(self.dataset.read(i)) for i in indices])


def images_of(dataset):
    """The images of a dataset for indexing: the in-memory tensor, or an :class:`IndexedImages`."""
    if getattr(dataset, "in_memory", True) and hasattr(dataset, "images"):
        return torch.from_numpy(dataset.images)
    return IndexedImages(dataset)


class MemoryFeed:
    """The dataset as one uint8 tensor [N, C, H, W] in memory (the built-in datasets)."""

    def __init__(self, images):
        self.images = images

    def start(self, plan):
        pass

    def get(self, nimg, indices):
        return self.images[indices]

    def close(self):
        pass


class _Items(torch.utils.data.Dataset):
    """Decode one image per item; a bad file comes back as its one-line message, not as a worker
    traceback, so that the training process can stop with that line."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return i, torch.from_numpy(self.dataset.read(i))
        except DatasetError as e:
            return i, str(e)


class _Sampler:
    """The DataLoader's batch sampler: the plan's index lists, generated as the loader asks."""

    def __init__(self, plan):
        self.plan = plan

    def __iter__(self):
        return (torch.as_tensor(indices).reshape(-1).tolist() for _, indices in self.plan)

    def __len__(self):
        return len(self.plan)


class StepPlan:
    """(nimg, this process's dataset indices) of every step from `start` to `stop` images, lazily."""

    def __init__(self, indices_at, start, stop, batch):
        self.indices_at, self.start, self.stop, self.batch = indices_at, start, stop, batch

    def __iter__(self):
        return ((nimg, self.indices_at(nimg)) for nimg in range(self.start, self.stop, self.batch))

    def __len__(self):
        return max(0, -(-(self.stop - self.start) // self.batch))


def _collate(items):
    errors = [image for _, image in items if isinstance(image, str)]
    indices = torch.tensor([i for i, _ in items], dtype=torch.long)
    if errors:
        return indices, errors[0]
    return indices, torch.stack([image for _, image in items])


class StreamFeed:
    """Images read by `workers` DataLoader processes, PREFETCH_STEPS batches ahead each.

    `start(plan)` takes the iterable of (nimg, indices) of the coming steps of this process; `get`
    returns the images of the next one. Memory: the batches in flight, whatever the dataset size.
    """

    def __init__(self, dataset, workers=DEFAULT_WORKERS):
        self.dataset = dataset
        self.workers = max(0, int(workers))
        self.loader = self.iterator = None
        self.expected = None

    def start(self, plan):
        """`plan`: re-iterable (nimg, indices) of the coming steps, e.g. a :class:`StepPlan`."""
        self.expected = iter(plan)
        kwargs = dict(num_workers=self.workers, collate_fn=_collate, batch_sampler=_Sampler(plan))
        if self.workers:
            kwargs.update(prefetch_factor=PREFETCH_STEPS, persistent_workers=False)
        self.loader = torch.utils.data.DataLoader(_Items(self.dataset), **kwargs)
        self.iterator = iter(self.loader)

    def get(self, nimg, indices):
        planned_nimg, planned = next(self.expected)
        got, images = next(self.iterator)
        if planned_nimg != nimg or not torch.equal(got, torch.as_tensor(indices).reshape(-1)):
            raise RuntimeError(f"data feed out of step at {nimg} images (planned {planned_nimg})")
        if isinstance(images, str):
            raise DatasetError(images)
        return images

    def close(self):
        self.iterator = self.loader = None


def make_feed(dataset, workers=DEFAULT_WORKERS):
    if getattr(dataset, "in_memory", True) and hasattr(dataset, "images"):
        return MemoryFeed(torch.from_numpy(dataset.images))
    return StreamFeed(dataset, workers)
