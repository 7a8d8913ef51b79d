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


def apply_precision_policy(device=None):
    """Set every flag of :data:`CUDA_PRECISION_POLICY`; returns the previous values."""
    previous = current_precision_flags()
    for key, value in CUDA_PRECISION_POLICY.items():
        owner, name = key.split(".", 1)
        setattr(_OWNERS[owner](), name, value)
    return previous


def current_precision_flags():
    out = {}
    for key in CUDA_PRECISION_POLICY:
        owner, name = key.split(".", 1)
        out[key] = getattr(_OWNERS[owner](), name)
    return out


def restore_precision_flags(flags):
    for key, value in flags.items():
        owner, name = key.split(".", 1)
        setattr(_OWNERS[owner](), name, value)
