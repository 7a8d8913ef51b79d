"""Post-hoc EMA reconstruction (SPEC §5.5-5.6): combine stored snapshots into networks of new EMA
lengths, streaming every input byte once however many targets, with about one snapshot of memory.

The coefficients come from :func:`mpdiff.ema.profiles.solve_posthoc_coefficients`; the inputs are
listed by :func:`mpdiff.ema.snapshots.list_snapshots`; the outputs are network files named by
:mod:`mpdiff.storage.layout`.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from mpdiff.config import STORAGE_DTYPES, check_named_sigma_rels, require
from mpdiff.ema.profiles import profile_reconstruction_error, solve_posthoc_coefficients
from mpdiff.ema.snapshots import list_snapshots
from mpdiff.errors import CheckpointError, ConfigError, first_line
from mpdiff.storage.files import atomic_write
from mpdiff.storage.layout import RunLayout, check_folder, phema_name, run_dir_of
from mpdiff.storage.network_files import NETWORK_FORMAT, storage_dtype
from mpdiff.storage.tensors import FLOAT_CODES, open_safetensors, safetensors_code, tensor_layout
from mpdiff.threads import torch_threads

RECONSTRUCTION_KIND = "phema-reconstruction"


def target_sigma_rels(sigma_rels):
    values = [sigma_rels] if np.isscalar(sigma_rels) else list(sigma_rels)
    if not values:
        raise ConfigError("no target sigma_rel given")
    values = sorted(set(float(v) for v in values))
    check_named_sigma_rels(values)
    return values


def select_inputs(records, at_nimg=None):
    """(at_nimg, inputs): the reconstruction time and the snapshots with 0 < nimg <= at_nimg.

    The time must be one of the snapshot times (SPEC §5.5): a profile that ends between two snapshots
    would be built from snapshots up to the earlier one only, so a mistyped time is refused, naming
    the nearest snapshot times, rather than quietly reconstructed from older weights.
    """
    times = sorted({r.nimg for r in records})
    if at_nimg is None:
        at_nimg = times[-1]
    if isinstance(at_nimg, bool) or not isinstance(at_nimg, (int, float)) or not float(at_nimg).is_integer() \
            or not 0 < at_nimg <= times[-1]:
        raise ConfigError(f"reconstruction time {at_nimg} images must be an integer in (0, {times[-1]}] "
                          f"(the last snapshot time)")
    at_nimg = int(at_nimg)
    if at_nimg not in times:
        below = [t for t in times if t < at_nimg][-1:]
        above = [t for t in times if t > at_nimg][:1]
        raise ConfigError(f"reconstruction time {at_nimg} images is not a snapshot time; the nearest are "
                          f"{' and '.join(str(t) for t in below + above)}")
    return at_nimg, [r for r in records if 0 < r.nimg <= at_nimg]  # at_nimg itself is one of them


PROFILE_ERROR_WARNING = 0.10   # relative L2 error of a reconstructed profile worth a warning


def poorly_reconstructed(run_dir, sigma_rels, at_nimg=None):
    """[(sigma_rel, relative L2 profile error)] of the targets whose profile the snapshots miss by more
    than PROFILE_ERROR_WARNING (too few or too sparse snapshots for that EMA length)."""
    at_nimg, inputs = select_inputs(list_snapshots(run_dir), at_nimg)
    in_t, in_sigma = [r.nimg for r in inputs], [r.sigma_rel for r in inputs]
    out = []
    for sigma_rel in target_sigma_rels(sigma_rels):
        _, rel_l2 = profile_reconstruction_error(in_t, in_sigma, at_nimg, sigma_rel)
        if not rel_l2 <= PROFILE_ERROR_WARNING:
            out.append((sigma_rel, rel_l2))
    return out


# Streaming: a pass reads every input byte once, one element range of one tensor from all inputs together,
# mixes all its targets from that [inputs x range] block with one matmul (float64 accumulation, so the
# result does not depend on how targets are grouped, and large alternating coefficients lose nothing) and
# appends each target's range to its output file. Every output byte is thus written once and never held
# whole in memory; that is what keeps many targets cheap. A reader thread fetches the next range while the
# current one is mixed; the files are finished (fsync, rename) several at once.

_MAX_OPEN_INPUTS = 256                  # files kept open at once; any further inputs are reopened for each read
_MIN_READ_BYTES = 64 * 2 ** 10          # per input and range: tiny networks would otherwise do tiny reads
_MAX_READ_BYTES = 16 * 2 ** 20          # per input and range
_MIX_BLOCK_BYTES = 2 ** 20              # float64 [inputs x columns] block per matmul: stays in the CPU cache
_FINISHERS = 8                          # output files fsync'ed at once (their fsyncs overlap)


@dataclasses.dataclass(frozen=True)
class _TensorSpan:
    dtype: torch.dtype
    shape: tuple
    begin: int                          # byte offsets relative to the start of the data section
    end: int

    @property
    def numel(self):
        return math.prod(self.shape)


def _float_tensor_spans(path):
    """(data_start, {name: _TensorSpan}) for the floating tensors of a snapshot file, from its header."""
    try:
        data_start, tensors, _ = tensor_layout(path)
        spans = {name: _TensorSpan(FLOAT_CODES[entry["dtype"]], tuple(int(d) for d in entry["shape"]),
                                   *(int(o) for o in entry["data_offsets"]))
                 for name, entry in tensors.items() if entry["dtype"] in FLOAT_CODES}
    except Exception as e:  # the file changed or broke after it was listed
        raise CheckpointError(f"{path}: damaged snapshot ({first_line(e)})") from None
    return data_start, spans


class _InputReader:
    """Reads element ranges of the floating tensors of many snapshot files with pread.

    The first `max_open` files stay open (hundreds of snapshots would exhaust file descriptors); the
    others are reopened for every read. Safe to use from two threads.
    """

    def __init__(self, paths, max_open):  # snapshot files in input order; how many of them stay open
        self.paths = list(paths)
        self.fds = {}
        self.data_starts, self.spans = [], []
        try:
            for index, path in enumerate(self.paths):
                data_start, spans = _float_tensor_spans(path)
                if not self.spans or spans == self.spans[0]:
                    spans = self.spans[0] if self.spans else spans      # the usual case: share one dict
                elif {k: (v.dtype, v.shape) for k, v in spans.items()} != \
                        {k: (v.dtype, v.shape) for k, v in self.spans[0].items()}:
                    raise CheckpointError(f"{path}: floating tensors differ in name, shape or dtype "
                                          f"from {self.paths[0]}")
                self.data_starts.append(data_start)
                self.spans.append(spans)
                if index < max_open:
                    self.fds[index] = self._open(index)
        except BaseException:
            self.close()
            raise

    def _open(self, index):
        try:
            return os.open(self.paths[index], os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.paths[index]}: cannot open snapshot ({e.strerror or e})") from None

    def _offset(self, index, name, first_element):
        span = self.spans[index][name]
        return self.data_starts[index] + span.begin + first_element * span.dtype.itemsize

    def read(self, index, name, first_element, buffer):
        """Fill `buffer` (writable, contiguous) with tensor `name` of input `index` from `first_element` on."""
        fd = self.fds.get(index)
        own = fd is None
        fd = self._open(index) if own else fd
        try:
            view, offset, done = memoryview(buffer), self._offset(index, name, first_element), 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    raise OSError(f"file ends inside tensor {name}")
                done += count
        except OSError as e:  # the file changed or broke after it was listed
            raise CheckpointError(f"{self.paths[index]}: damaged snapshot ({e.strerror or e})") from None
        finally:
            if own:
                os.close(fd)

    def prefetch(self, name, first_element, count):
        """Ask the OS to read the same range of every open input in the background (one deep I/O queue)."""
        if hasattr(os, "posix_fadvise"):
            for index, fd in self.fds.items():
                nbytes = count * self.spans[index][name].dtype.itemsize
                with contextlib.suppress(OSError):  # only a hint; read() reports real problems
                    os.posix_fadvise(fd, self._offset(index, name, first_element), nbytes, os.POSIX_FADV_WILLNEED)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _mix(weights, stack, out):
    """out[T, n] (float32) = weights[T, N] (float64) @ stack[N, n], in cache-sized float64 blocks."""
    block = max(256, _MIX_BLOCK_BYTES // (8 * stack.shape[0]))
    for start in range(0, stack.shape[1], block):
        out[:, start:start + block] = weights @ stack[:, start:start + block].to(torch.float64)


def _all_equal(stack):
    """Whether every row of [N, n] equals the first; trained weights are rejected on their first element."""
    rows = range(1, stack.shape[0])
    return all(torch.equal(stack[0, :1], stack[i, :1]) for i in rows) and \
        all(torch.equal(stack[0], stack[i]) for i in rows)


def _ranges(count, step):
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def _file_order(spans):
    return sorted(spans, key=lambda name: spans[name].begin)


def _stream_pass(reader, weights, range_elements, on_bytes, emit):
    """One pass over all inputs; calls emit(block) with each float32 [T, range] block of the outputs.

    Ranges come tensor by tensor in the inputs' file order (so reads are sequential), each tensor's in
    order. For each: read the range of every input into one [N, range] block, then mix all targets at
    once, or copy it if it is bit-identical in every input (buffers, frozen weights: exact even for
    inf; the float64 mix would give the same finite values). Two input blocks, one being mixed and one
    being filled by a background thread, and one output block. `on_bytes(n)` feeds the progress bar.
    """
    num_inputs = len(reader.paths)
    spans = reader.spans[0]
    plan = [(name, a, b) for name in _file_order(spans) for a, b in _ranges(spans[name].numel, range_elements)]
    itemsize = max((span.dtype.itemsize for span in spans.values()), default=1)
    blocks = [torch.empty(num_inputs, range_elements * itemsize, dtype=torch.uint8) for _ in range(2)]
    mixed = torch.empty(weights.shape[0], range_elements, dtype=torch.float32)

    def gather(name, a, b, block):
        nbytes = (b - a) * spans[name].dtype.itemsize
        reader.prefetch(name, a, b - a)
        rows = block.numpy()
        for index in range(num_inputs):
            reader.read(index, name, a, rows[index, :nbytes])
        return block[:, :nbytes].view(spans[name].dtype)           # [N, b - a]

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        pending = background.submit(gather, *plan[0], blocks[0]) if plan else None
        for step, (name, a, b) in enumerate(plan):
            stack = pending.result()
            if step + 1 < len(plan):
                pending = background.submit(gather, *plan[step + 1], blocks[(step + 1) % 2])
            on_bytes(stack.numel() * stack.element_size())
            out = mixed[:, :b - a]
            if _all_equal(stack):
                out[:] = stack[0]                                   # identical in every input: copied exactly
            else:
                if not bool(torch.isfinite(stack).all()):           # an average with NaN/inf in it is garbage
                    row = int((~torch.isfinite(stack)).any(dim=1).nonzero()[0])
                    raise CheckpointError(f"{reader.paths[row]}: tensor {name} holds non-finite values; "
                                          f"it cannot be averaged into a network")
                _mix(weights, stack, out)
            emit(out)


def _raw_tensors(path, keep):
    """{name: (safetensors dtype, shape, bytes)} of the tensors of a snapshot file for which keep(dtype) holds."""
    try:
        raw = {}
        with open_safetensors(path, what="snapshot") as f:
            for name in f.keys():
                view = f.get_slice(name)
                if keep(view.get_dtype()):
                    tensor = f.get_tensor(name)
                    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    raw[name] = (view.get_dtype(), list(view.get_shape()), data)
    except Exception as e:  # the file changed or broke after it was listed
        raise CheckpointError(f"{path}: damaged snapshot ({first_line(e)})") from None
    return raw


def _network_header(shapes, raw, network, dtype, **metadata):
    """Start (length prefix + JSON header) of the network file :func:`save_network` would write.

    Float tensors `shapes` (name -> shape, stored as `dtype`) come first, in this order, then the `raw`
    tensors (name -> (safetensors dtype, shape, bytes)). Same metadata, JSON-encoded value by value;
    header padded to 8 bytes like safetensors' own. Knowing the whole layout up front lets each output be
    written while it is computed, without holding it in memory or serialising a copy of it.
    """
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * storage_dtype(dtype).itemsize
        header[name] = {"dtype": safetensors_code(storage_dtype(dtype)), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    for name, (code, shape, data) in raw.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    meta = dict(metadata, format=NETWORK_FORMAT, network=dict(network), dtype=dtype)  # as save_network
    encoded = json.dumps({"__metadata__": {k: json.dumps(v) for k, v in meta.items()}, **header},
                         separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _write_pass(reader, weights, paths, headers, raw, range_elements, dtype, on_bytes):
    """One pass: stream the outputs of len(paths) targets into their files, each started with its header and
    ended with the `raw` tensors. Each file is written atomically; an error before the pass is complete
    leaves none of its outputs."""
    target = storage_dtype(dtype)
    outputs = [atomic_write(path) for path in paths]
    with contextlib.ExitStack() as open_files:  # on an error every temporary output is removed
        files = [open_files.enter_context(output) for output in outputs]
        for f, header in zip(files, headers):
            f.write(header)

        def emit(block):
            block = block.to(target)
            for row, f in enumerate(files):
                f.write(block[row].view(torch.uint8).numpy())

        _stream_pass(reader, weights, range_elements, on_bytes, emit)
        for f in files:
            for _, _, data in raw.values():
                f.write(data)
        open_files.pop_all()  # complete: finished below, several at once so that their fsyncs overlap
    with concurrent.futures.ThreadPoolExecutor(max_workers=_FINISHERS) as finishing:
        finished = [finishing.submit(output.__exit__, None, None, None) for output in outputs]
    for future in finished:  # all have run (each removes its own temporary on failure); report the first error
        future.result()


def reconstruct(run_dir, sigma_rels, at_nimg=None, out_dir=None, batch_outputs=64, dtype="float32", progress=True):
    """Post-hoc EMA: write network files for new profiles `sigma_rels` at time `at_nimg`; returns their paths.

    Inputs are the snapshots with 0 < nimg <= at_nimg; `at_nimg` defaults to the last snapshot time and must be
    one of them (:func:`select_inputs`). Targets go in passes of up to `batch_outputs`, each reading every input
    byte once and mixing all its targets with one float64 matmul per range (memory: about one snapshot).
    Floating tensors bit-identical in every input are copied, the others averaged; integer tensors come from
    the latest input. Outputs (``phema-{nimg:012d}-{sigma_rel:.3f}.safetensors``) go to `out_dir` (default
    RUN_DIR/phema) as network files of kind "phema-reconstruction" with the coefficients and the input names
    (docs/POSTHOC_EMA.md).
    """
    targets = target_sigma_rels(sigma_rels)
    require(dtype in STORAGE_DTYPES, f"output dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    require(int(batch_outputs) >= 1, f"batch_outputs must be >= 1, got {batch_outputs}")
    records = list_snapshots(run_dir)
    at_nimg, inputs = select_inputs(records, at_nimg)
    coefficients = solve_posthoc_coefficients([r.nimg for r in inputs], [r.sigma_rel for r in inputs],
                                              at_nimg, targets)
    require(np.all(np.isfinite(coefficients)),
            "post-hoc EMA coefficients are not finite (snapshot profiles too similar to solve)")
    out_dir = RunLayout(run_dir_of(run_dir)).phema_dir if out_dir is None else os.fspath(out_dir)
    check_folder(out_dir)  # a symlink loop or a file in its place: one line, before any input is read
    groups = _ranges(len(targets), int(batch_outputs))

    reader = _InputReader([r.path for r in inputs], max_open=_MAX_OPEN_INPUTS)
    try:
        spans = reader.spans[0]
        latest = _raw_tensors(inputs[-1].path, keep=lambda code: code not in FLOAT_CODES)  # integers: latest input
        shapes = {name: spans[name].shape for name in _file_order(spans)}
        snapshot_bytes = sum(span.end - span.begin for span in spans.values())
        # Elements per range: two input blocks [N, range] and the output block [T, range] hold about one snapshot.
        itemsize = max((span.dtype.itemsize for span in spans.values()), default=1)
        per_element = 2 * len(inputs) * itemsize + 4 * len(groups[0])
        range_elements = max(1, min(max(snapshot_bytes // per_element, _MIN_READ_BYTES // itemsize),
                                    _MAX_READ_BYTES // itemsize))

        paths = []
        with tqdm(total=len(groups) * len(inputs) * snapshot_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="phema", disable=not progress) as bar, torch_threads(1):
            for first, last in groups:
                weights = torch.from_numpy(np.ascontiguousarray(coefficients[:, first:last].T))  # [T, N] float64
                group_paths = [os.path.join(out_dir, phema_name(at_nimg, targets[j])) for j in range(first, last)]
                headers = [_network_header(shapes, latest, inputs[0].network, dtype, nimg=at_nimg,
                                           sigma_rel=targets[j], kind=RECONSTRUCTION_KIND,
                                           coefficients=[float(c) for c in coefficients[:, j]],
                                           inputs=[os.path.basename(r.path) for r in inputs])
                           for j in range(first, last)]
                _write_pass(reader, weights, group_paths, headers, latest, range_elements, dtype, bar.update)
                paths += group_paths
    finally:
        reader.close()
    return paths
