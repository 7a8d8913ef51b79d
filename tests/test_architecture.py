"""How the package is put together (docs/ARCHITECTURE.md): checked on the source, not on behaviour."""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "mpdiff"


def _imports_from_mpdiff(path):
    """(line, module, name) of every import of mpdiff in a file (`from mpdiff.x import name`, or
    `import mpdiff.x` as (line, 'mpdiff.x', '')), function-local ones included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpdiff":
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mpdiff":
                    yield node.lineno, alias.name, ""


def test_no_module_imports_a_private_name_of_another():
    # A name with a leading underscore is its module's own business; what another module needs is public.
    crossings = [f"{path.relative_to(SRC.parent)}:{line}: {name} from {module}"
                 for path in sorted(SRC.rglob("*.py")) for line, module, name in _imports_from_mpdiff(path)
                 if name.startswith("_")]
    assert crossings == []
    assert sum(1 for _ in SRC.rglob("*.py")) > 50  # the walk saw the package


def test_the_bottom_layer_imports_nothing_above_it():
    # errors, budgets and config are the bottom layer (docs/ARCHITECTURE.md): config owns the choice lists
    # and value checks that the layers above import, so it needs none of them (it imported diffusion, nn
    # and ema before); the memory budgets and printable text live here, not in storage.
    for name, allowed in (("errors", set()), ("budgets", {"mpdiff.errors"}), ("config", {"mpdiff.errors"})):
        imported = {module for _, module, _ in _imports_from_mpdiff(SRC / f"{name}.py")}
        assert imported <= allowed, (name, sorted(imported))


def test_the_choice_lists_of_the_configuration_are_the_implemented_ones():
    import inspect

    import pytest
    import torch

    from mpdiff.config import (
        ATTN_IMPLS,
        KAPPA_RULES,
        LADDER_CONFIGS,
        PRECISION_NAMES,
        SAMPLER_NAMES,
        SKIP_MODES,
        network_evaluations,
    )
    from mpdiff.diffusion.samplers import SAMPLERS
    from mpdiff.errors import ConfigError
    from mpdiff.nn.ladder import LADDER
    from mpdiff.nn.precond import PRECISIONS
    from mpdiff.nn.primitives import cosine_attention
    from mpdiff.nn.skips import check_skip_options

    assert tuple(SAMPLERS) == SAMPLER_NAMES and tuple(LADDER) == LADDER_CONFIGS
    assert tuple(PRECISIONS) == PRECISION_NAMES
    for mode in SKIP_MODES:  # every mode and rule is accepted where it applies; others are refused
        for rule in KAPPA_RULES:
            check_skip_options(mode, 0.5, rule, num_skips=4, mp_concat=True, backbone="U-Net")
    for mode, rule in (("other", KAPPA_RULES[0]), (SKIP_MODES[0], "other")):
        with pytest.raises(ConfigError):
            check_skip_options(mode, 0.5, rule, num_skips=4, mp_concat=True, backbone="U-Net")
    # The attention kernels: cosine_attention's default and the names it tells apart (`impl == "..."`),
    # which compute the same attention.
    source = (SRC / "nn" / "primitives.py").read_text(encoding="utf-8")
    function = next(node for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.FunctionDef) and node.name == "cosine_attention")
    compared = {node.comparators[0].value for node in ast.walk(function) if isinstance(node, ast.Compare)
                and isinstance(node.left, ast.Name) and node.left.id == "impl"
                and isinstance(node.comparators[0], ast.Constant)}
    default = inspect.signature(cosine_attention).parameters["impl"].default
    assert compared | {default} == set(ATTN_IMPLS) and default == ATTN_IMPLS[0]
    qkv = torch.randn(2, 3 * 8, 3, 3, generator=torch.Generator().manual_seed(0))
    mixed = [cosine_attention(qkv, 2, impl=impl) for impl in ATTN_IMPLS]
    assert all(torch.allclose(m, mixed[0], atol=1e-5) for m in mixed)
    # The evaluations a sampler makes are the ones the configuration counts.
    for name, sampler in SAMPLERS.items():
        for steps in (1, 2, 5):
            calls = []
            denoise = lambda x, sigma, labels: calls.append(1) or x * 0  # noqa: E731
            sampler(denoise, torch.ones(1, 1), torch.linspace(2, 0, steps + 1))
            assert len(calls) == network_evaluations(name, steps), (name, steps)


def test_the_command_line_takes_its_choices_from_the_configuration():
    # cli and cli_options list no choices of their own (click.Choice of a literal) and know the samplers
    # only by the configuration's names.
    for name in ("cli.py", "cli_options.py", "cli_dataset.py"):
        tree = ast.parse((SRC / name).read_text(encoding="utf-8"))
        literal = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "attr", None) == "Choice"
                   and any(isinstance(part, ast.Constant) for arg in node.args for part in ast.walk(arg))]
        assert literal == [], (name, literal)
        imported = {module for _, module, _ in _imports_from_mpdiff(SRC / name)}
        assert "mpdiff.diffusion.samplers" not in imported, name


# The layer order of docs/ARCHITECTURE.md, bottom first: a module imports its own layer and those below.
LAYERS = (
    ("errors", "budgets", "threads", "distributed", "config"),
    ("presets",),
    ("nn",),
    ("storage",),
    ("data",),
    ("diffusion", "ema"),
    ("metrics", "train", "loading", "describe"),
    ("cli", "cli_options", "cli_dataset", "__main__", "__init__"),
)
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def _module_name(path):
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path):
    """The mpdiff modules a file imports, function-local imports included; `from mpdiff.x import y`
    counts as importing mpdiff.x.y when y is a module of its own."""
    for line, module, name in _imports_from_mpdiff(path):
        candidate = f"{module}.{name}" if name else module
        relative = candidate.split(".")[1:]
        is_module = relative and ((SRC.joinpath(*relative).with_suffix(".py")).exists() or SRC.joinpath(*relative).is_dir())
        yield line, candidate if name and is_module else module


def _layer(module):
    parts = module.split(".")
    return LAYER_OF["__init__" if len(parts) == 1 else parts[1]]


def test_every_import_points_down_the_layers_of_the_architecture():
    every = {path.parent.name if path.parent != SRC else path.stem for path in SRC.rglob("*.py")}
    assert every - {"mpdiff"} <= set(LAYER_OF), sorted(every - set(LAYER_OF))  # each module has a layer
    upward = [f"{path.relative_to(SRC.parent)}:{line}: imports {module}"
              for path in sorted(SRC.rglob("*.py")) for line, module in _imported_modules(path)
              if _layer(module) > _layer(_module_name(path))]
    assert upward == []


def test_no_two_modules_import_each_other_even_through_others():
    graph = {_module_name(path): {m for _, m in _imported_modules(path)} for path in SRC.rglob("*.py")}
    state, circles = {}, []

    def visit(node, trail):  # depth-first; a module met again on the current trail closes a circle
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or node.startswith(nxt + "."):  # a module and its own package's __init__
                continue
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail
                               else f"{node} -> {nxt}")
            elif state.get(nxt) is None:
                visit(nxt, trail + [node])
        state[node] = "done"

    for start in sorted(graph):
        if state.get(start) is None:
            visit(start, [])
    assert circles == []
    assert len(graph) > 60


def test_no_source_file_is_longer_than_500_lines():
    long = {str(path.relative_to(SRC.parent)): n for path in SRC.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}
