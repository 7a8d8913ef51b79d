"""The CUDA numerics policy of training, stated once (SPEC §1.5).

NVIDIA's training turns TF32 and reduced-precision float16/bfloat16 reductions off, so float32
matrix products are true float32 and float16 sums accumulate in float32; it turns the cuDNN
auto-tuner on. We do the same: the network's numerics then match the reference on any GPU, and
speed comes from float16 activations (``use_fp16``), not from silently truncated float32.
On CPU the settings have no effect; they are applied regardless so that the policy is visible.
"""

import torch

# torch backend flag -> the value training runs with
CUDA_PRECISION_POLICY = {
    "matmul.allow_tf32": False,
    "cudnn.allow_tf32": False,
    "matmul.allow_fp16_reduced_precision_reduction": False,
    "matmul.allow_bf16_reduced_precision_reduction": False,
    "cudnn.benchmark": True,
}

_OWNERS = {"matmul": lambda: torch.backends.cuda.matmul, "cudnn": lambda: torch.backends.cudnn}


def _owner_and_name(key):
    owner, name = key.split(".", 1)
    return _OWNERS[owner](), name


def apply_precision_policy(device=None):
    """Set every flag of :data:`CUDA_PRECISION_POLICY`; returns the previous values."""
    previous = current_precision_flags()
    restore_precision_flags(CUDA_PRECISION_POLICY)
    return previous


def current_precision_flags():
    return {key: getattr(*_owner_and_name(key)) for key in CUDA_PRECISION_POLICY}


def restore_precision_flags(flags):
    for key, value in flags.items():
        setattr(*_owner_and_name(key), value)
