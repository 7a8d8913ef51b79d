"""NVIDIA's released networks (*.pkl) load directly, and nothing in them ever runs (issue 32).

The pickles here are made in the release's structure without NVIDIA's code: stand-in modules named
``torch_utils.persistence`` and ``dnnlib.util`` (installed in sys.modules only while a pickle is written)
give the globals the release names, each network module is an object pickled as NVIDIA's persistence
pickles it (the reconstruction call with a dict: class name, module source, attributes including the
constructor's arguments), the weights are float16 torch tensors and parameters, ``enc``/``dec`` are real
``torch.nn.ModuleDict`` objects, and the VAE encoder's scale and bias are numpy arrays.
"""

import collections
import json
import os
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import randomized_network, run_cli, tiny_config

import mpdiff
from mpdiff.data.latents import RAW_MEAN, RAW_STD, LatentEncoder
from mpdiff.errors import CheckpointError, ConfigError
from mpdiff.loading import convert_network, network_sources, release_encoder, resolve_network
from mpdiff.nn.compat import load_edm2
from mpdiff.storage.edm2_pickle import read_edm2_pickle
from mpdiff.storage.edm2_source import code_run_on_import
from mpdiff.storage.network_files import load_network, read_network_metadata
from test_latent import vae_dir  # noqa: F401  (the fixture: a tiny Stable-Diffusion-shaped VAE folder)

# ---- writing pickles in the release's structure -------------------------------------------------------

SOURCE = '''"""Stand-in for a module of persistent classes."""
import numpy as np
import torch
from torch_utils import persistence

@persistence.persistent_class
class Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, device=torch.device('cuda'), kwargs=dict(a=1), **unet_kwargs):
        super().__init__()
'''


def _reconstruct_persistent_obj(meta):
    """What NVIDIA's persistence does on load: run the embedded source (used here only as the control that
    shows a payload is real)."""
    module = types.ModuleType("_release_source")
    exec(meta["module_src"], module.__dict__)  # noqa: S102  (the control, never mpdiff)
    return meta


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EasyDict(dict):
    pass


EasyDict.__module__ = "dnnlib.util"


@pytest.fixture(autouse=True)
def release_globals(monkeypatch):
    """The modules a release pickle names, while the test writes pickles (never imported by mpdiff)."""
    modules = {"torch_utils": types.ModuleType("torch_utils"), "dnnlib": types.ModuleType("dnnlib"),
               "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
               "dnnlib.util": types.ModuleType("dnnlib.util")}
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules["torch_utils.persistence"].persistent_class = lambda cls: cls
    modules["torch_utils"].persistence = modules["torch_utils.persistence"]
    modules["dnnlib.util"].EasyDict = EasyDict
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


class Persistent:
    """Pickles as an object of one of NVIDIA's persistent classes."""

    def __init__(self, class_name, state, source=SOURCE):
        self.class_name, self.state, self.source = class_name, state, source

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.source, class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,)


def _module_state(parameters=(), buffers=(), children=(), **attributes):
    hooks = {k: collections.OrderedDict() for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                    "_state_dict_hooks", "_load_state_dict_pre_hooks")}
    return dict(training=False, _parameters=dict(parameters), _buffers=dict(buffers), _modules=dict(children),
                _non_persistent_buffers_set=set(), **hooks, **attributes)


def _module_tree(state_dict, buffer_names, kwargs, args=(), source=SOURCE):
    """The network as NVIDIA's pickle holds it, from an official-layout state_dict (float16 weights)."""
    tree = {}
    for key in state_dict:
        node = tree
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})

    def build(node, prefix, class_name):
        parameters, buffers, children = {}, {}, {}
        for key, value in state_dict.items():
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                name = key[len(prefix):]
                if key in buffer_names:
                    buffers[name] = value.half()
                else:
                    parameters[name] = torch.nn.Parameter(value.half(), requires_grad=False)
        for name, child in node.items():
            path = prefix + name
            if name in ("enc", "dec"):  # torch.nn.ModuleDict, pickled by torch as a plain module
                container = torch.nn.ModuleDict()
                container.__dict__["_modules"] = {n: build(c, f"{path}.{n}.", "Block" if c else "MPConv")
                                                  for n, c in child.items()}
                children[name] = container
            else:
                kind = "UNet" if name == "unet" else "MPFourier" if "fourier" in name else "MPConv"
                children[name] = build(child, path + ".", kind)
        if class_name == "Block" and "attn_qkv" not in children:
            children.update(attn_qkv=None, attn_proj=None)
        attributes = dict(_init_args=args, _init_kwargs=kwargs) if class_name == "Precond" else \
            dict(_init_args=(), _init_kwargs={})
        return Persistent(class_name, _module_state(parameters, buffers, children, **attributes), source)
    return build(tree, "", "Precond")


def _vae_encoder(**kwargs):
    """StabilityVAEEncoder as the release records it: scale and bias as float32 numpy arrays."""
    given = dict(dict(raw_mean=list(RAW_MEAN), raw_std=list(RAW_STD), final_mean=0, final_std=0.5), **kwargs)
    scale = np.float32(given["final_std"]) / np.float32(given["raw_std"])
    bias = np.float32(given["final_mean"]) - np.float32(given["raw_mean"]) * scale
    return Persistent("StabilityVAEEncoder", dict(_init_args=(), _init_kwargs=kwargs,
                                                  vae_name="stabilityai/sd-vae-ft-mse", scale=scale, bias=bias,
                                                  batch_size=8, _vae=None))


def release(net, kwargs, encoder="rgb", args=(), protocol=4, source=SOURCE, **extra):
    """The bytes of a release pickle of `net` (ours), recorded with constructor `kwargs` (and `args`)."""
    sd = net.state_dict()
    buffers = {name for name, _ in net.named_buffers()} & set(sd)
    ema = _module_tree(sd, buffers, kwargs, args, source)
    if encoder == "rgb":
        encoder = Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}))
    data = EasyDict(encoder=encoder, dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                             path="img64.zip", use_labels=True),
                    loss_fn=Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs=dict(P_mean=-0.8, P_std=1.6),
                                                        P_mean=-0.8, P_std=1.6, sigma_data=0.5)))
    data.update(extra)
    data["ema"] = ema
    return pickle.dumps(data, protocol=protocol)


def tiny_kwargs(config):
    return dict(img_resolution=config.img_resolution, img_channels=config.img_channels, label_dim=config.label_dim,
                model_channels=config.model_channels, channel_mult=list(config.channel_mult),
                num_blocks=config.num_blocks, attn_resolutions=list(config.attn_resolutions),
                channels_per_head=config.channels_per_head, dropout=0.1)


def fp16_state_dict(net):
    return {k: v.half() for k, v in net.state_dict().items()}


def _inputs(channels=3, n=5):
    generator = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.05, 0.7, 6.0, 80.0])[:n]
    x = torch.randn(n, channels, 16, 16, generator=generator) * sigma.view(-1, 1, 1, 1)
    return x, sigma, torch.eye(10)[torch.arange(n)]


# ---- what is read ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_release_pickle_gives_the_network_its_state_dict_gives(tmp_path, protocol):
    net = randomized_network(seed=3)
    config = tiny_config()
    path = tmp_path / "edm2-img16-tiny-0000064-0.100.pkl"
    positional = protocol == 2  # Precond(16, 3, 10, model_channels=...) recorded as args and kwargs
    kwargs = tiny_kwargs(config)
    args = tuple(kwargs.pop(k) for k in ("img_resolution", "img_channels", "label_dim")) if positional else ()
    path.write_bytes(release(net, kwargs, args=args, protocol=protocol))
    got = read_edm2_pickle(path)
    same_weights = load_edm2(fp16_state_dict(net), channels_per_head=16, dropout=0.1)
    assert got.stored_dtype == "float16" and got.encoder == {"class_name": "StandardRGBEncoder", "init_kwargs": {}}
    assert got.network_kwargs == tiny_kwargs(config) and got.net.config == same_weights.config
    assert got.loss == {"class_name": "EDM2Loss", "init_kwargs": {"P_mean": -0.8, "P_std": 1.6}}
    assert got.dataset_kwargs["path"] == "img64.zip"
    gains = [p for p in got.net.parameters() if p.ndim == 0]
    assert gains and all(0.19 < g.item() < 0.51 for g in gains)  # nonzero gains, float16-rounded
    assert all(p.dtype == torch.float32 for p in got.net.parameters()) and not got.net.training
    x, sigma, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(got.net(x, sigma, labels), same_weights(x, sigma, labels))
    loaded, meta = mpdiff.load_network(path)  # the library's one loader reads it too
    assert meta["format"] == "edm2-release-pickle" and meta["edm2_network"] == tiny_kwargs(config)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), same_weights(x, sigma, labels))
    assert mpdiff.read_edm2_pickle is read_edm2_pickle


def test_generate_and_metrics_from_a_pickle_equal_the_same_weights_as_a_state_dict(tmp_path, monkeypatch):
    net = randomized_network(seed=5, channels_per_head=64)  # what a bare state_dict is assumed to have
    (tmp_path / "net.pkl").write_bytes(release(net, tiny_kwargs(tiny_config(channels_per_head=64))))
    torch.save(fp16_state_dict(net), tmp_path / "net.pt")
    outputs = {}
    for name in ("net.pkl", "net.pt"):
        result = run_cli("generate", tmp_path / name, "--seeds", "0-3", "--out", tmp_path / f"out-{name}", "--steps",
                         "3", "--no-progress")
        assert result.exit_code == 0, result.output
        outputs[name] = [(tmp_path / f"out-{name}" / f"00000{i}.png").read_bytes() for i in range(4)]
    assert outputs["net.pkl"] == outputs["net.pt"]
    # metrics --net: the same statistics from either file (a stand-in detector keeps it fast)
    from mpdiff.metrics import compute
    from mpdiff.metrics.detectors import Detector, FeatureStats

    class Means(Detector):
        name, metric, feature_dim = "means", "fid", 2

        def preprocess(self, images):
            return images.float()

        def embed(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)), x[:, 0].std(dim=(1, 2))], dim=1)

    monkeypatch.setattr(compute, "make_detector", lambda metric, device="cpu", dinov2=None: Means())
    stats = FeatureStats(2)
    stats.add(np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 5.0]]))
    compute.save_reference(tmp_path / "ref.npz", {"fid": stats})
    scores = []
    for name in ("net.pkl", "net.pt"):
        result = run_cli("metrics", "--net", tmp_path / name, "--ref", tmp_path / "ref.npz", "--num", "4",
                         "--batch", "2", "--steps", "2", "--json", "--no-progress")
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.output[result.output.index("{"):])["fid"])
    assert scores[0] == scores[1]


def test_convert_once_keeps_the_weights_and_the_encoder(tmp_path):
    net = randomized_network(seed=7, img_channels=4)
    kwargs = tiny_kwargs(tiny_config(img_channels=4))
    (tmp_path / "latent.pkl").write_bytes(release(net, kwargs, encoder=_vae_encoder()))
    result = run_cli("convert", tmp_path / "latent.pkl", tmp_path / "latent.safetensors")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {tmp_path / 'latent.safetensors'} (4x16x16, 10 classes, float16; " \
                                    f"encoder: stability-vae)"
    meta = read_network_metadata(tmp_path / "latent.safetensors")
    assert meta["dtype"] == "float16" and meta["converted_from"] == "latent.pkl"
    assert meta["encoder"]["raw_mean"] == list(RAW_MEAN) and meta["encoder"]["raw_std"] == list(RAW_STD)
    assert meta["edm2_encoder"]["class_name"] == "StabilityVAEEncoder" and meta["edm2_network"] == kwargs
    converted, _ = resolve_network(tmp_path / "latent.safetensors")
    direct, _ = resolve_network(tmp_path / "latent.pkl")
    assert converted.encoder_description == direct.encoder_description == meta["encoder"]
    x, sigma, labels = _inputs(channels=4)
    with torch.no_grad():
        assert torch.equal(converted(x, sigma, labels), direct(x, sigma, labels))
    _, written = convert_network(tmp_path / "latent.pkl", tmp_path / "fp32.safetensors", dtype="float32")
    assert written["dtype"] == "float32"
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        convert_network(tmp_path / "latent.pkl", tmp_path / "latent.pkl2")


def test_the_vae_encoder_decodes_with_the_release_constants():
    # The release's own constructor values (here its defaults, SPEC §7.1's): exactly ours.
    described = release_encoder(read_encoder(_vae_encoder()))
    assert described["name"] == "stability-vae"
    assert described["raw_mean"] == list(RAW_MEAN) and described["raw_std"] == list(RAW_STD)
    # Other constants: our LatentEncoder with the implied constants is NVIDIA's z * scale + bias.
    custom = dict(raw_mean=[1.0, -2.0, 0.5, 3.0], raw_std=[2.0, 4.0, 1.5, 3.5], final_mean=0.1, final_std=1.0)
    recorded = read_encoder(_vae_encoder(**custom), protocol=5)  # numpy's protocol-5 arrays too
    for source in (recorded, dict(recorded, init_kwargs={})):  # constructor values recorded, or not
        encoder = LatentEncoder(None, **{k: release_encoder(source)[k] for k in ("raw_mean", "raw_std")})
        z = torch.randn(2, 4, 3, 3)
        scale, bias = (torch.tensor(recorded[k]).view(1, 4, 1, 1) for k in ("scale", "bias"))
        assert torch.allclose(encoder.normalize(z), z * scale + bias, atol=1e-5)
        assert torch.allclose(encoder.denormalize(z), (z - bias) / scale, atol=1e-4)


def read_encoder(encoder, protocol=4):
    """The encoder description read_edm2_pickle gives for `encoder` (a tiny network beside it)."""
    import tempfile

    net = randomized_network(img_channels=4)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vae.pkl")
        with open(path, "wb") as f:
            f.write(release(net, tiny_kwargs(tiny_config(img_channels=4)), encoder=encoder, protocol=protocol))
        return read_edm2_pickle(path).encoder


def test_an_img512_style_pickle_decodes_through_the_vae_with_its_constants(tmp_path, vae_dir):
    vae = vae_dir
    net = randomized_network(seed=9, img_channels=4, channels_per_head=64)
    (tmp_path / "latent.pkl").write_bytes(release(net, tiny_kwargs(tiny_config(img_channels=4, channels_per_head=64)),
                                                  encoder=_vae_encoder()))
    torch.save(fp16_state_dict(net), tmp_path / "latent.pt")
    refused = run_cli("generate", tmp_path / "latent.pkl", "--seeds", "0", "--out", tmp_path / "none")
    assert refused.exit_code == 1 and "to decode them, download stabilityai/sd-vae-ft-mse" in refused.output
    images = {}
    for name in ("latent.pkl", "latent.pt"):
        result = run_cli("generate", tmp_path / name, "--seeds", "0-1", "--steps", "2", "--out", tmp_path / name[7:],
                         "--vae", vae, "--no-progress")
        assert result.exit_code == 0, result.output
        assert f"raw_mean {list(RAW_MEAN)}, raw_std {list(RAW_STD)}" in result.output
        images[name] = (tmp_path / name[7:] / "000001.png").read_bytes()
    assert images["latent.pkl"] == images["latent.pt"]


# ---- guided releases: two files of a folder ---------------------------------------------------------------

def test_release_file_names_of_the_guidance_presets():
    from mpdiff.diffusion.guidance import GUIDANCE_PRESETS

    cfg, autog = GUIDANCE_PRESETS["edm2-img512-xxl-guid-fid"], GUIDANCE_PRESETS["edm2-img512-s-uncond-autog-dino"]
    assert (cfg.net.release_file, cfg.guide.release_file) == ("edm2-img512-xxl-0939524-0.015.pkl",
                                                              "edm2-img512-xs-uncond-2147483-0.015.pkl")
    assert (autog.net.release_file, autog.guide.release_file) == ("edm2-img512-s-uncond-2147483-0.090.pkl",
                                                                  "edm2-img512-xs-uncond-0134217-0.125.pkl")


def test_generate_a_guidance_preset_from_a_folder_of_releases(tmp_path):
    folder = tmp_path / "releases"
    folder.mkdir()
    kwargs = tiny_kwargs(tiny_config())
    main, guide = randomized_network(seed=11), randomized_network(seed=12)
    (folder / "edm2-img64-s-1073741-0.045.pkl").write_bytes(release(main, kwargs))
    missing = run_cli("generate", "--guidance-preset", "edm2-img64-s-autog-fid", "--net-dir", folder, "--seeds", "0",
                      "--out", tmp_path / "x")
    assert missing.exit_code == 1 and missing.output.count("\n") == 1, missing.output
    assert "error: --net-dir " in missing.output and "lacks edm2-img64-xs-0134217-0.110.pkl, the released network " \
        "of edm2-img64-s-autog-fid; download it from https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/" \
        in missing.output
    (folder / "edm2-img64-xs-0134217-0.110.pkl").write_bytes(release(guide, kwargs))
    by_preset = run_cli("generate", "--guidance-preset", "edm2-img64-s-autog-fid", "--net-dir", folder,
                        "--seeds", "0-2", "--steps", "2", "--out", tmp_path / "preset", "--no-progress")
    assert by_preset.exit_code == 0, by_preset.output
    assert f"guide: {folder / 'edm2-img64-xs-0134217-0.110.pkl'} (autoguidance, w 1.7)" in by_preset.output
    by_hand = run_cli("generate", folder / "edm2-img64-s-1073741-0.045.pkl", "--guide",
                      folder / "edm2-img64-xs-0134217-0.110.pkl", "--guidance", "1.7", "--seeds", "0-2", "--steps",
                      "2", "--out", tmp_path / "hand", "--no-progress")
    assert by_hand.exit_code == 0, by_hand.output
    for i in range(3):
        name = f"00000{i}.png"
        assert (tmp_path / "preset" / name).read_bytes() == (tmp_path / "hand" / name).read_bytes()
    for args, expect in [((None, None, folder, None), "{net_dir} needs a {guidance_preset}"),
                         (("net.pkl", None, folder, "edm2-img64-s-autog-fid"), "give no SOURCE with it"),
                         ((None, "g.pkl", folder, "edm2-img64-s-autog-fid"), "give no {guide} with it"),
                         ((None, None, tmp_path / "nothing", "edm2-img64-s-autog-fid"), "no such folder"),
                         ((None, None, None, None), "give SOURCE (a run directory or network file)")]:
        with pytest.raises(ConfigError) as e:
            network_sources(*args)
        assert expect in e.value.template or expect in str(e.value)


# ---- what is refused, and never run ----------------------------------------------------------------------

class SystemCall:
    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _refused(path, *expect):
    with pytest.raises(CheckpointError) as e:
        read_edm2_pickle(path)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{path}: ") and all(part in message for part in expect), message
    return message


@pytest.mark.parametrize("where", ["whole file", "in the dataset options", "as a tensor's storage"])
def test_a_pickle_that_calls_os_system_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pkl"
    net = randomized_network()
    if where == "whole file":
        path.write_bytes(pickle.dumps(SystemCall(marker)))
    elif where == "in the dataset options":
        path.write_bytes(release(net, tiny_kwargs(tiny_config()), dataset_kwargs=EasyDict(path=SystemCall(marker))))
    else:
        path.write_bytes(pickle.dumps(EasyDict(ema=Persistent("Precond", _module_state(
            {"weight": _TensorOver(SystemCall(marker))})))))
    pickle.loads(pickle.dumps(SystemCall(tmp_path / "CONTROL")))  # the payload is real: unpickled, it runs
    assert (tmp_path / "CONTROL").exists()
    _refused(path, f"refused to load: it would import and call {os.name}.system, which no EDM2 release pickle "
                   f"needs", "nothing in it was run")
    assert not marker.exists()
    result = run_cli("generate", path, "--seeds", "0", "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "refused to load" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


class _TensorOver:
    """Pickles as torch's tensor rebuild over the given object instead of a storage."""

    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (1,), (1,), False, collections.OrderedDict())


def test_a_persistence_pickle_whose_source_writes_a_file_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "MARKER"
    evil = f"open({os.fspath(marker)!r}, 'w').close()\n" + SOURCE
    net = randomized_network()
    data = release(net, tiny_kwargs(tiny_config()), source=evil)
    pickle.loads(data)  # the control: NVIDIA's way of loading (run the source) writes the file
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "edm2-img512-xs-2147483-0.135.pkl"
    path.write_bytes(data)
    message = _refused(path, "refused to load: the embedded source of its class ", "would run code when imported "
                       "(line 1: open(", "mpdiff never runs it", "nothing in it was run")
    assert message.count("\n") == 0 and not marker.exists()
    result = run_cli("generate", path, "--seeds", "0", "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1 and "refused to load" in result.output and not marker.exists()


@pytest.mark.parametrize("payload", [
    "import os\nos.system('true')\n",
    "import os\ndef f(a=os.system('true')): pass\n",
    "from os import system as dict\ndef f(a=dict('true')): pass\n",
    "class A:\n    def __init_subclass__(cls): pass\nclass B(A): pass\n",
    "def hook(c): return c\n@hook\nclass Precond: pass\n",
    "class Precond(metaclass=type): pass\n",
    "class Precond:\n    x = print('hi')\n",
    "if True:\n    import os\n",
    "x = [i for i in range(3)]\n",
    "def f(",
])
def test_sources_that_would_run_code_on_import(payload):
    assert code_run_on_import(payload) is not None
    assert code_run_on_import(SOURCE) is None


@pytest.mark.parametrize("case, expect", [
    ("builtins.eval", "it would import and call builtins.eval"),
    ("torch.load", f"it would import and call {torch.load.__module__}.load"),
    ("numpy.load", f"it would import and call {np.load.__module__}.load"),
    ("not a release", "not an EDM2 release pickle (it holds a list without a network under 'ema')"),
    ("EDM's network", "not an EDM2 release pickle (its network is a EDMPrecond, not EDM2's Precond)"),
    ("another encoder", "its encoder is a LatentsOfMyOwn, not one of EDM2's"),
    ("storage overrun", "not a readable EDM2 release pickle (UnpicklingError: a tensor of size [1000] at offset 0 "
                        "overruns its storage)"),
    ("truncated", "not a readable EDM2 release pickle ("),
    ("empty", "empty file"),
    ("over budget", "more than a network file may have"),
    ("weights of another network", "does not match the network built from"),
])
def test_what_is_not_a_release_is_one_line(tmp_path, monkeypatch, case, expect):
    net = randomized_network()
    kwargs = tiny_kwargs(tiny_config())
    path = tmp_path / "net.pkl"
    data = {"builtins.eval": lambda: pickle.dumps(EasyDict(ema=eval)),
            "torch.load": lambda: pickle.dumps(EasyDict(ema=torch.load)),
            "numpy.load": lambda: pickle.dumps(EasyDict(ema=np.load)),
            "not a release": lambda: pickle.dumps([1, 2]),
            "EDM's network": lambda: pickle.dumps(EasyDict(ema=Persistent("EDMPrecond", _module_state()))),
            "another encoder": lambda: release(net, kwargs, encoder=Persistent("LatentsOfMyOwn", {})),
            "storage overrun": lambda: pickle.dumps(EasyDict(ema=Persistent("Precond", _module_state(
                {"weight": _Strided(torch.zeros(3), (1000,))})))),
            "truncated": lambda: release(net, kwargs)[:5000],
            "empty": lambda: b"",
            "over budget": lambda: release(net, kwargs),
            "weights of another network": lambda: release(net, dict(kwargs, model_channels=64))}[case]()
    path.write_bytes(data)
    if case == "over budget":
        monkeypatch.setenv("MPDIFF_MAX_NETWORK_BYTES", "10000")
    message = _refused(path, expect)
    assert "\n" not in message
    result = run_cli("generate", path, "--seeds", "0", "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and expect in result.output


class _Strided:
    def __init__(self, tensor, size):
        self.tensor, self.size = tensor, size

    def __reduce__(self):
        with warnings.catch_warnings():  # TypedStorage is deprecated, but what torch pickles
            warnings.simplefilter("ignore")
            storage = self.tensor.storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.size, (1,), False, collections.OrderedDict())


def test_refused_globals_are_never_imported(tmp_path):
    path = tmp_path / "net.pkl"
    path.write_bytes(b"\x80\x02cnever_imported_xyz\nThing\nq\x00)\x81q\x01.")  # GLOBAL, NEWOBJ
    _refused(path, "it would import and call never_imported_xyz.Thing")
    assert "never_imported_xyz" not in sys.modules


def test_the_release_globals_are_never_imported(tmp_path):
    net = randomized_network()
    path = tmp_path / "net.pkl"
    path.write_bytes(release(net, tiny_kwargs(tiny_config())))
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        sys.modules.pop(name)  # the release's modules do not exist here: reading needs none of them
    assert isinstance(read_edm2_pickle(path).net, torch.nn.Module)
    assert not any(name.split(".")[0] in ("torch_utils", "dnnlib") for name in sys.modules)


def test_load_network_of_a_pickle_in_training_mode(tmp_path):
    net = randomized_network()
    path = tmp_path / "net.pickle"
    path.write_bytes(release(net, tiny_kwargs(tiny_config())))
    trained, meta = load_network(path, eval_mode=False)
    assert trained.training and meta["stored_dtype"] == "float16"
