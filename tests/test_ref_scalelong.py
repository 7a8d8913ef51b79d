"""Our UViT and its long-skip scaling against ScaleLong's own UViT (sail-sg/ScaleLong ``libs/uvit.py``).

The fixture ``fixtures/scalelong_uvit.safetensors`` holds one small class-conditional UViT's weights under
the reference's key names (16x16x3, patch 2, width 32, 2 heads, MLP ratio 2, 4 long skips, nonzero
everywhere), fixed inputs, and the reference's outputs for every one of its scaling modes; it was made
by ``fixtures/ref_scalelong.py`` (the commit is in its metadata). Here the same weights go into
:class:`mpdiff.nn.uvit.UViT` and the outputs are compared.

Comparable by design, and how it is made so (docs/SCALELONG.md, the uvit.py docstring):

* The noise-level token: ours is random-Fourier features of c_noise, the reference's a sinusoidal
  embedding of an integer timestep. Our ``noise_features`` is replaced by a module that returns the
  reference's token (``input.time_token``); everything after it is the same network.
* The extra tokens come in another order: ours [noise, class, patches], the reference's
  [class, time, patches]. Attention, the MLPs and the skip fusion act per token, so this is a
  relabelling: the position embedding's rows and the LS gates' token axes are permuted to match.
* The class token: ours multiplies one-hot labels by an N(0, 1) table, the reference looks the row up;
  one-hot labels make them the same rows.

Everything else (patch embedding, blocks, the LIFO pairing of long skips, CS's kappa^(i-1) with the
outermost skip unscaled, the LS gate, the output layers and the final 3x3 convolution) is compared as is.
"""

import functools
import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from mpdiff.nn.uvit import UViT

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "scalelong_uvit.safetensors"
# float32 forward passes of the same operations in a different order (SDPA, concatenation, the gate's
# mean, tokens in another order): the measured difference is at most 3.2e-6 on outputs of magnitude
# about 3.7, i.e. 1e-6 relative, a few float32 roundings.
ATOL = 2e-5
NUM_SKIPS = 4
LABELS = 10
EXTRA_TOKENS = 2
# Our mode, kappa and kappa rule for each of the reference's scalelong switches (kappa None: the fixture's).
MODES = {
    "none": ("none", None, "skip"),
    "sqrt2": ("cs", 2 ** -0.5, "all"),   # scalelong 1: every skip times 1/sqrt(2)
    "cs": ("cs", None, "skip"),          # scalelong 2: kappa^(i-1), outermost unscaled
    "ls": ("ls", None, "skip"),          # scalelong 3: one gate shared by all skips
    "ls_nonshared": ("ls-nonshared", None, "skip"),  # scalelong 4: one gate per skip
}


@functools.lru_cache(maxsize=None)
def _fixture():
    with safe_open(str(FIXTURE), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(str(FIXTURE)), metadata


def _token_order(num_tokens: int) -> torch.Tensor:
    """Our token t is the reference's token order[t]: ours [noise, class, ...], theirs [class, time, ...]."""
    return torch.tensor([1, 0] + list(range(EXTRA_TOKENS, num_tokens)))


def _our_key(ref_key: str) -> str:
    """Our state_dict key of a reference key (gates excepted: see :func:`_gate_state`)."""
    rules = [
        (r"^patch_embed\.proj\.", "patch_embed."),
        (r"^label_emb\.weight$", "label_embed"),
        (r"^in_blocks\.(\d+)\.", r"enc.block\1."),
        (r"^mid_block\.", "dec.mid."),
        (r"^out_blocks\.(\d+)\.", r"dec.block\1."),
        (r"^norm\.", "out_norm."),
        (r"^decoder_pred\.", "out_linear."),
        (r"^final_layer\.", "out_conv."),
    ]
    key = ref_key
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")


def _gate_state(ref: dict, ref_prefix: str, our_prefix: str, order: torch.Tensor) -> dict:
    """One LS gate: the reference's layer1 / layer2 as our first / second, token axis permuted."""
    return {
        f"{our_prefix}first.weight": ref[f"{ref_prefix}layer1.weight"][:, order],
        f"{our_prefix}first.bias": ref[f"{ref_prefix}layer1.bias"],
        f"{our_prefix}second.weight": ref[f"{ref_prefix}layer2.weight"][order],
        f"{our_prefix}second.bias": ref[f"{ref_prefix}layer2.bias"][order],
    }


def _our_state(ref: dict, mode: str, num_tokens: int) -> dict:
    order = _token_order(num_tokens)
    state = {}
    for ref_key, value in ref.items():
        if ref_key.startswith("se."):
            continue
        state[_our_key(ref_key)] = value[:, order] if ref_key == "pos_embed" else value
    if mode == "ls":
        state.update(_gate_state(ref, "se.", "skip_scaling.gates.all.", order))
    if mode == "ls-nonshared":
        # The reference's out-block k (k = 0 right after the middle block, the innermost skip) uses
        # se[k]; our skip index counts from the outermost, so that skip is NUM_SKIPS - 1 - k.
        for k in range(NUM_SKIPS):
            state.update(_gate_state(ref, f"se.{k}.", f"skip_scaling.gates.skip{NUM_SKIPS - 1 - k}.", order))
    return state


class _GivenToken(nn.Module):
    """Stands in for our noise-level embedding: returns the reference's time token whatever it is given."""

    def __init__(self, token: torch.Tensor):
        super().__init__()
        self.token = token

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        assert noise_labels.shape == (self.token.shape[0],)
        return self.token


def _our_network(mode_name: str):
    tensors, metadata = _fixture()
    mode, kappa, rule = MODES[mode_name]
    kappa = float(metadata["kappa"]) if kappa is None else kappa
    net = UViT(img_resolution=16, img_channels=3, label_dim=LABELS, model_channels=32, depth=2 * NUM_SKIPS,
               patch_size=2, channels_per_head=16, mlp_ratio=2.0, skip_scaling=mode, kappa=kappa, kappa_rule=rule)
    ref = {key[len("ref."):]: value for key, value in tensors.items() if key.startswith("ref.")}
    state = _our_state(ref, mode, net.pos_embed.shape[1])
    ours = net.state_dict()
    own = {key for key in ours if key.startswith("noise_features.")}
    assert set(state) == set(ours) - own, (sorted(set(ours) - own - set(state)), sorted(set(state) - set(ours)))
    for key, value in state.items():
        assert ours[key].shape == value.shape, key
    net.load_state_dict({**state, **{key: ours[key] for key in own}}, strict=True)
    net.noise_features = _GivenToken(tensors["input.time_token"])
    return net.eval()


def _run(net: UViT) -> torch.Tensor:
    tensors, _ = _fixture()
    x = tensors["input.x"]
    labels = F.one_hot(tensors["input.y"], LABELS).to(torch.float32)
    with torch.no_grad():
        return net(x, torch.zeros(x.shape[0]), labels)


def _difference(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    diff = (ours - theirs).abs().max().item()
    return f"max |ours - reference| = {diff:.3g} (reference max {theirs.abs().max().item():.3g})"


@pytest.mark.parametrize("mode_name", list(MODES))
def test_uvit_equals_scalelong_reference(mode_name):
    """Same weights, inputs and noise-level token: our UViT's output is the reference's for every scaling
    mode. none checks the blocks and the LIFO pairing of skips to decoder blocks; cs checks which skip
    gets which power of kappa (and with the pairing, that the innermost skip gets kappa^(N-1)); sqrt2 the
    'all' rule; ls the shared gate's computation; ls_nonshared which gate belongs to which skip."""
    tensors, _ = _fixture()
    expected = tensors[f"out.{mode_name}"]
    ours = _run(_our_network(mode_name))
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, rtol=0, atol=ATOL), _difference(ours, expected)


def test_ls_gate_coefficients_equal_the_reference():
    """The shared gate's per-sample, per-token coefficients for each skip, in the order the decoder
    uses the skips (innermost first), equal the reference's: squeeze over features, Linear, ReLU,
    Linear, sigmoid. Checked at the gate, before the rest of the network mixes them in."""
    tensors, _ = _fixture()
    net = _our_network("ls")
    gate = net.skip_scaling.gate(0)
    seen = []
    gate.register_forward_hook(lambda module, inputs, output: seen.append(module.coefficients(inputs[0])))
    _run(net)
    ours = torch.stack(seen)[..., 0]  # [skips, batch, tokens]
    expected = tensors["gate.ls"][..., _token_order(ours.shape[-1])]
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, rtol=0, atol=1e-6), _difference(ours, expected)


def test_fixture_tells_the_modes_and_the_skip_order_apart():
    """The fixture is sensitive enough for the comparisons above to catch a wrong formula: the modes'
    outputs differ from each other by far more than ATOL, and so does CS with its powers reversed
    (kappa^(N-i), the innermost skip unscaled) computed from the reference's own weights through our
    network, i.e. a wrong skip order or a shifted power cannot hide inside the tolerance."""
    tensors, metadata = _fixture()
    outputs = {name: tensors[f"out.{name}"] for name in MODES}
    names = list(outputs)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            gap = (outputs[names[a]] - outputs[names[b]]).abs().max().item()
            assert gap > 1000 * ATOL, (names[a], names[b], gap)
    # The LS gates are neither saturated nor constant: they weigh tokens differently, inside (0, 1).
    gates = tensors["gate.ls"]
    assert 0.01 < gates.mean() < 0.99 and gates.std(dim=-1).min() > 0.1
    kappa = float(metadata["kappa"])
    assert math.isclose(kappa, 0.7)
    net = _our_network("cs")
    for wrong in ([kappa ** (NUM_SKIPS - 1 - i) for i in range(NUM_SKIPS)],  # reversed order
                  [kappa ** (i + 1) for i in range(NUM_SKIPS)],  # kappa^i for the i-th skip
                  [1.0, 1.0, 1.0, kappa ** 3]):  # only the innermost scaled
        net.skip_scaling.coefficients = tuple(wrong)
        assert (_run(net) - outputs["cs"]).abs().max() > 100 * ATOL, wrong
