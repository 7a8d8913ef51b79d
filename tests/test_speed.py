"""Speed options that must not change the model (issue 18): activation precision (bf16/fp16 with the
float32 islands the paper needs) and torch.compile (no graph breaks; the compiled graph computes the
same function, forced weight normalisation included). Speed itself is measured in benchmarks/."""

import shutil

import pytest
import torch
import torch._dynamo as dynamo
from conftest import randomized_network

from mpdiff.diffusion.generate import generate, generate_to_folder
from mpdiff.diffusion.loss import edm2_loss
from mpdiff.errors import ConfigError
from mpdiff.nn.fast import accelerate, fast_cosine_attention, fast_mp_cat, fast_resample, is_fast, literal, norm_across
from mpdiff.nn.primitives import cosine_attention, mp_cat, resample
from mpdiff.nn.runtime import compiled, precision_of, set_precision
from mpdiff.nn.unet import Block


# Networks smaller than tiny_config's for the compiler tests (compile time grows with the graph). SMALL
# still has every kind of block: an encoder and a decoder level without attention, down- and
# up-sampling, attention (at 8x8), long skips. SMALLEST is one level of one block and no attention, the
# least a U-Net can be: what inductor's cold builds on the CPU run on (each kernel is a C++ compile).
SMALL = dict(channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
SMALLEST = dict(channel_mult=(1,), num_blocks=1, attn_resolutions=(), model_channels=16)


def inputs(n=4, label_dim=10):
    gen = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0])[:n]
    x = torch.randn(n, 3, 16, 16, generator=gen) * sigma.reshape(-1, 1, 1, 1)
    return x, sigma, torch.eye(label_dim)[torch.arange(n) % label_dim]


def block_inputs(net):
    """{block name: (module, its positional inputs)} from one training-mode forward."""
    blocks = {n: m for n, m in net.named_modules() if isinstance(m, Block)}
    seen = {}

    def record(module, args, name):
        seen.setdefault(name, args)  # returns None: the inputs stay as they are

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: record(mod, args, name)) for n, m in blocks.items()]
    net.train()
    net(*inputs())
    for h in hooks:
        h.remove()
    return {n: (blocks[n], seen[n]) for n in seen}


def test_every_kind_of_block_traces_without_graph_breaks():
    # One of each kind: encoder, downsampling, attention, decoder with skip, upsampling; in training
    # (forced weight normalisation writes the weight in place) and in eval (the weight cache is not
    # consulted under compilation).
    net = accelerate(randomized_network(label_dim=10, **SMALL))  # what training and sampling compile
    found = block_inputs(net)
    kinds = {}
    for name, (module, args) in found.items():
        kind = ("attention" if getattr(module, "attn_qkv", None) is not None else "down" if "down" in name
                else "up" if "up" in name else name.split(".")[1])
        kinds.setdefault(kind, (name, module, args))
    assert {"enc", "dec", "down", "up", "attention"} <= set(kinds), sorted(kinds)
    for kind, (name, module, args) in kinds.items():
        for mode in ("train", "eval"):
            getattr(module, mode)()
            with torch.set_grad_enabled(mode == "train"):
                explained = dynamo.explain(module)(*args)
            assert explained.graph_break_count == 0, (name, mode, [str(r.reason) for r in explained.break_reasons])
            dynamo.reset()
    # ... and the whole network is one graph, in training and in sampling (autograd off, where blocks
    # work in place and the long skips are joined; once they wrote into slices, a break per join).
    for mode in ("train", "eval"):
        getattr(net, mode)()
        with torch.set_grad_enabled(mode == "train"):
            explained = dynamo.explain(net)(*inputs())
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (
            mode, [str(r.reason)[:200] for r in explained.break_reasons])
        dynamo.reset()


def test_compiled_network_computes_the_same_function_in_eval_and_training():
    # aot_eager runs the captured forward and backward graphs without generating kernels: any difference
    # would be a tracing error (a missed in-place weight update, a stale cache), not rounding.
    # Both fast twins (compiled() compiles the fast twin): what is compared is tracing, not the rewrites.
    eager, other = accelerate(randomized_network(label_dim=10, **SMALL)), randomized_network(label_dim=10, **SMALL)
    other.load_state_dict(eager.state_dict())
    fast = compiled(other, backend="aot_eager")
    x, sigma, labels = inputs()
    eager.eval(), other.eval()
    with torch.no_grad():
        assert torch.allclose(eager(x, sigma, labels), fast(x, sigma, labels), rtol=1e-6, atol=1e-6)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (eager, other)]
    eager.train(), other.train()
    for step in range(2):
        for model, opt in ((eager, opts[0]), (fast, opts[1])):
            opt.zero_grad()
            edm2_loss(model, x / sigma.reshape(-1, 1, 1, 1) * 0.5, labels,
                      sigma=sigma, noise=torch.ones_like(x)).sum().backward()
            opt.step()
    for (name, a), b in zip(eager.named_parameters(), other.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_precision_default_is_float32_on_cpu_and_bf16_keeps_the_float32_islands():
    net = randomized_network(label_dim=10).eval()
    x, sigma, labels = inputs()
    with torch.no_grad():
        reference = net(x, sigma, labels)
        seen = {}
        blocks = [m for m in net.modules() if isinstance(m, Block)]

        def record(module, args):  # a pre-hook that returns something would replace the inputs
            seen.setdefault("block", (args[0].dtype, args[1].dtype))

        hooks = [b.register_forward_pre_hook(record) for b in blocks[:1]]
        with precision_of("bf16", net):
            out = net(x, sigma, labels)
        for h in hooks:
            h.remove()
        assert net.precision is None and torch.equal(net(x, sigma, labels), reference)  # restored
    # Activations bf16, the embedding float32 (SPEC §1.5), the output float32; weights never change dtype.
    assert seen["block"] == (torch.bfloat16, torch.float32)
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())
    # Measured relative error of D at these noise levels: ~4e-3 (bf16 has an 8-bit mantissa; the
    # skip path c_skip x is exact). The bound leaves room for other weights.
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 2e-2, error
    with pytest.raises(ConfigError):
        set_precision(net, "fp8")


def test_generation_at_another_precision_is_close_restored_and_part_of_the_folder_settings(tmp_path):
    net = randomized_network(label_dim=10).eval()
    full, classes = generate(net, range(6), num_steps=4, progress=False)
    low, low_classes = generate(net, range(6), num_steps=4, progress=False, precision="bf16")
    assert classes == low_classes and net.precision is None
    assert not torch.equal(full, low) and ((low - full).norm() / full.norm()).item() < 5e-2
    generate_to_folder(net, range(4), tmp_path / "a", num_steps=2, progress=False, precision="bf16", batch_size=2)
    # A resumed folder must match: the precision is one of its settings (images depend on it).
    from mpdiff.storage.samples import GENERATING

    partial = tmp_path / f".b{GENERATING}"
    import mpdiff.storage.samples as samples

    real = samples.save_png
    calls = []

    def dies(path, image):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, image)

    samples.save_png = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_to_folder(net, range(4), tmp_path / "b", num_steps=2, progress=False, precision="bf16")
    finally:
        samples.save_png = real
    assert partial.exists()
    with pytest.raises(ConfigError, match="precision: bf16 -> None"):
        generate_to_folder(net, range(4), tmp_path / "b", num_steps=2, progress=False)


def test_training_in_bf16_keeps_float32_weights_and_adam_state(tmp_path):
    from conftest import train_tiny

    trainer = train_tiny(tmp_path / "run", duration=128, precision="bf16", final_grid=False, dynamics=False)
    state = trainer.state
    assert state.nimg == 128 and state.weights_finite()
    assert all(p.dtype == torch.float32 for p in state.net.parameters())
    moments = [t for s in state.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    rows = (tmp_path / "run" / "stats.jsonl").read_text().splitlines()
    assert rows and "nan" not in rows[-1].lower()


# ---- fusions: each equals the literal formula it replaces -----------------------------------------------

def test_box_filter_resampling_equals_the_depthwise_convolution_it_replaces():
    """The [1, 1] filter runs as 2x2 averaging and pixel repetition instead of a depthwise (transposed)
    convolution: up-sampling is bit for bit the same, down-sampling sums the same four values in another
    order (float32 rounding); so are their gradients."""
    import torch.nn.functional as F

    def by_convolution(x, mode):
        kernel = torch.full([x.shape[1], 1, 2, 2], 0.25)
        if mode == "down":
            return F.conv2d(x, kernel, groups=x.shape[1], stride=2)
        return F.conv_transpose2d(x, kernel * 4, groups=x.shape[1], stride=2)

    x = torch.randn(3, 5, 8, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for mode in ("down", "up"):
        ours, literal = fast_resample(x, mode), by_convolution(x, mode)
        assert torch.equal(resample(x, mode), literal)  # the literal network's resampling is the convolution
        assert ours.shape == literal.shape
        if mode == "up":
            assert torch.equal(ours, literal)
        torch.testing.assert_close(ours, literal, rtol=1e-6, atol=1e-7)
        weights = torch.randn_like(ours)
        (g_ours,), (g_literal,) = (torch.autograd.grad((y * weights).sum(), x) for y in (ours, literal))
        torch.testing.assert_close(g_ours, g_literal, rtol=1e-6, atol=1e-6)
    # another filter still takes the general path
    assert torch.equal(fast_resample(x, "down", filter=(1, 3, 3, 1)), resample(x, "down", filter=(1, 3, 3, 1)))
    assert resample(x, "down", filter=(1, 3, 3, 1)).shape == (3, 5, 4, 3)


def test_activation_norms_equal_torch_vector_norm_and_stay_finite_at_zero():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 6, 16, 3, 9, generator=gen).to(dtype)
        for dim in (1, 2):
            expected = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
            got = norm_across(x, dim)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=5e-7, atol=0)
    for layout in (torch.contiguous_format, torch.channels_last):  # the sum of squares; vector_norm itself
        x = torch.zeros(2, 8, 3, 3).contiguous(memory_format=layout).requires_grad_()
        norm_across(x, 1).sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))  # as vector_norm's: 0, not NaN


@pytest.mark.parametrize("train", [False, True])
def test_the_fast_twin_computes_the_literal_network_and_its_gradients(train):
    """accelerate(): config G's 1 / 0.596 of mp_silu and the factors of mp_sum folded into the adjacent
    convolutions' gains, channels-last activations, pooled resampling, pixel-major attention and, without
    autograd, in-place steps. Same network function and gradients as the literal network, to float32
    rounding; the same parameters and state-dict keys; literal() turns it back."""
    def run(fast):
        torch.manual_seed(0)  # the same weights for both
        net = randomized_network(seed=3)
        if fast:
            accelerate(net)
        assert is_fast(net) == fast
        net.train(train)
        x, sigma, labels = inputs()
        with torch.set_grad_enabled(train):
            out = net(x, sigma, labels)
            grads = torch.autograd.grad(out.square().sum(), list(net.parameters()), allow_unused=True) if train else []
        return net, out.detach(), [g for g in grads if g is not None]

    (fast_net, out_fast, grads_fast), (literal_net, out_literal, grads_literal) = run(True), run(False)
    assert not torch.equal(out_fast, out_literal)  # other ops, other rounding
    torch.testing.assert_close(out_fast, out_literal, rtol=2e-6, atol=2e-6)
    assert len(grads_fast) == len(grads_literal)
    for a, b in zip(grads_fast, grads_literal):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    assert list(fast_net.state_dict()) == list(literal_net.state_dict())
    assert [type(m) for m in literal(fast_net).modules()] == [type(m) for m in literal_net.modules()]
    assert all(type(m).__module__ != "mpdiff.nn.fast" for m in fast_net.modules())


# ---- channels-last activations and in-place steps without autograd ------------------------------------

def _layout_probe(net):
    """Hooks that record, for every Block, whether its input arrived channels-last."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
        for m in net.modules() if isinstance(m, Block)]
    return seen, hooks


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_activations_compute_the_same_network(train):
    """On the CPU the U-Net keeps its activations channels-last (pixel by pixel): every block sees that
    layout, and function and gradients equal the channel-by-channel layout's to float32 rounding; the
    output is an ordinary contiguous tensor."""
    def run(pixel_major):
        torch.manual_seed(0)  # the same weights for both
        net = accelerate(randomized_network(seed=4))
        net.unet.pixel_major = pixel_major
        net.train(train)
        seen, hooks = _layout_probe(net)
        x, sigma, labels = inputs()
        with torch.set_grad_enabled(train):
            out = net(x, sigma, labels)
            grads = torch.autograd.grad(out.square().sum(), list(net.parameters()), allow_unused=True) if train else []
        for h in hooks:
            h.remove()
        return out.detach(), [g for g in grads if g is not None], seen

    auto, nchw = run(None), run(False)
    assert auto[2] and all(auto[2])  # None means channels-last on the CPU
    assert not any(nchw[2])
    assert auto[0].is_contiguous()
    torch.testing.assert_close(auto[0], nchw[0], rtol=2e-6, atol=2e-6)
    assert len(auto[1]) == len(nchw[1])
    for a, b in zip(auto[1], nchw[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_on_channels_last_input_equals_the_channel_major_formula(dtype):
    """cosine_attention reads channels-last q/k/v pixel by pixel (the 1 / sqrt(C_head) of the logits rides
    on k's divisor); the result, returned channels-last, and its gradient equal the channel-major path's."""
    gen = torch.Generator().manual_seed(0)
    qkv = (torch.randn(3, 3 * 48, 4, 6, generator=gen) * 2).to(dtype)
    channel_major = cosine_attention(qkv, 3)
    torch.testing.assert_close(fast_cosine_attention(qkv, 3).float(), channel_major.float(),
                               **(dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    pixel_major = fast_cosine_attention(qkv.contiguous(memory_format=torch.channels_last), 3)
    assert pixel_major.is_contiguous(memory_format=torch.channels_last) and not pixel_major.is_contiguous()
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pixel_major.float(), channel_major.float(), **tol)
    leaf = qkv.float().requires_grad_()
    weights = torch.randn(channel_major.shape, generator=gen)
    (g_cm,), (g_pm,) = (torch.autograd.grad((f(q, 3) * weights).sum(), leaf) for f, q in (
        (cosine_attention, leaf), (fast_cosine_attention, leaf.contiguous(memory_format=torch.channels_last))))
    torch.testing.assert_close(g_pm, g_cm, rtol=1e-5, atol=1e-6)


def test_in_place_steps_without_autograd_change_neither_the_output_nor_any_input():
    """With autograd off, blocks scale, activate and join in place, and mp_cat scales into its result. The
    network's output equals its output with autograd on, bit for bit, and no block overwrites the tensor it
    was given (the encoder's outputs wait as long skips)."""
    torch.manual_seed(0)
    net = accelerate(randomized_network(seed=6)).eval()
    x, sigma, labels = inputs()
    given = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: given.append((args[0], args[0].clone())))
             for m in net.modules() if isinstance(m, Block)]
    with torch.no_grad():
        fast = net(x, sigma, labels)
    for h in hooks:
        h.remove()
    assert given and all(torch.equal(tensor, copy) for tensor, copy in given)
    with torch.enable_grad():
        tracked = net(x, sigma, labels).detach()
    torch.testing.assert_close(fast, tracked, rtol=0, atol=0)

    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 6, 5, 5, generator=gen), torch.randn(2, 10, 5, 5, generator=gen)
    with torch.enable_grad():
        expected = mp_cat(a, b, t=0.3)
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.no_grad():
            got = fast_mp_cat(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout), t=0.3)
        assert got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU kernels need a C++ compiler")
def test_a_compiled_training_run_trains_the_network_the_eager_run_trains(tmp_path):
    """`train --compile` end to end: the training loop's steps through CompiledTraining. Eight Adam steps
    from the same seed give the eager run's weights and Adam moments to float32 rounding (measured: 5e-7
    and 4e-6 relative). Before the fix, the loop stopped at its first step (it took the truth value of
    torch.compile's module, which raises), and with that mended the in-graph weight write gave moments
    9% and weights 14% away from eager. Eight steps, because the zero-initialised gains leave most
    gradients zero in the first; the moments carry the gradients' sizes, which Adam's first updates
    (lr * sign) do not."""
    from conftest import train_tiny

    from mpdiff.nn.runtime import CompiledTraining

    runs = {}
    for compile_it in (False, True):
        torch.manual_seed(0)
        runs[compile_it] = train_tiny(tmp_path / f"run-{compile_it}", duration=512, compile=compile_it,
                                      final_grid=False, dynamics=False, checkpoint_nimg=512,
                                      **SMALLEST)  # the smallest U-Net: the shortest cold compile
    assert isinstance(runs[True].step_fn.model, CompiledTraining) and runs[True].state.nimg == 512
    fast_state, slow_state = (runs[k].state for k in (True, False))
    for (name, fast), slow in zip(fast_state.net.named_parameters(), slow_state.net.parameters()):
        assert (fast - slow).norm() <= 1e-3 * slow.norm() + 1e-7, name
        for moment in ("exp_avg", "exp_avg_sq"):
            a, b = fast_state.optimizer.state[fast][moment], slow_state.optimizer.state[slow][moment]
            assert (a - b).norm() <= 1e-3 * b.norm() + 1e-12, (name, moment)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU kernels need a C++ compiler")
def test_frozen_compiled_sampling_equals_eager_and_compiles_again_when_the_weights_change():
    """Sampling's --compile folds the weights into the program (inductor freezing). It computes what the
    eager network computes; it never answers with the weights it was compiled from once they have changed
    in place (torch.compile's guards alone would let it: they check which tensors, not what they hold).
    On the smallest U-Net (two cold inductor builds); tests/test_gpu.py runs it on tiny_config's network
    with attention, and at bf16 (another program on the same weights)."""
    from mpdiff.nn.runtime import FrozenCompiled

    net = randomized_network(seed=3, **SMALLEST).eval()
    other = randomized_network(seed=4, **SMALLEST)
    x, sigma, labels = inputs()
    frozen = compiled(net, frozen=True)
    assert isinstance(frozen, FrozenCompiled)
    with torch.no_grad():
        first = frozen(x, sigma, labels)
        torch.testing.assert_close(first, net(x, sigma, labels), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(frozen(x, sigma * 1.5, labels), net(x, sigma * 1.5, labels), rtol=1e-4, atol=1e-5)
        assert frozen.compiles == 1
        net.load_state_dict(other.state_dict())  # in place: the same tensors, new values
        second = frozen(x, sigma, labels)
        assert frozen.compiles == 2
        torch.testing.assert_close(second, net(x, sigma, labels), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(second, first, rtol=1e-2, atol=1e-3)
    with pytest.raises(RuntimeError, match="no_grad"):
        frozen(x, sigma, labels)  # autograd on: freezing would not apply


def test_compiled_generation_fills_a_short_last_batch_and_keeps_each_seeds_image(monkeypatch):
    """With --compile a short last batch is filled up with copies of its last seed (a new batch shape would
    compile again); the images kept are those each seed gives in any batch. The network runs eagerly here:
    what is tested is the filling, not the compiler."""
    import mpdiff.nn.runtime as runtime

    net = randomized_network(seed=5).eval()
    shapes = []

    def eager_but_recorded(model, enabled=True, backend="inductor", frozen=False):
        if model is None:
            return None

        def run(x, sigma, labels):
            shapes.append(x.shape[0])
            return model(x, sigma, labels)
        return run
    monkeypatch.setattr(runtime, "compiled", eager_but_recorded)
    plain, classes = generate(net, range(7), num_steps=3, batch_size=3, progress=False)
    assert set(shapes) == {3, 1}
    shapes.clear()
    filled, filled_classes = generate(net, range(7), num_steps=3, batch_size=3, progress=False, compile=True)
    assert set(shapes) == {3} and filled_classes == classes and filled.shape == plain.shape
    # Equal up to float rounding: a kernel may round differently at another batch size (measured: 3.8e-5 at
    # most, on images of unit scale, after 3 steps).
    torch.testing.assert_close(filled, plain, rtol=1e-4, atol=2e-4)
    assert torch.equal(filled[:6], plain[:6])  # the full batches ran as they were
