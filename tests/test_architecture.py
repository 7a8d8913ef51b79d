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


def _package_of(module):
    return module.split(".")[1] if "." in module else module


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


def test_the_network_imports_only_the_bottom_layer_and_itself():
    # nn is built from config and presets; storage loads networks (storage -> nn), never the reverse.
    allowed = {"nn", "config", "presets", "errors", "budgets"}
    upward = [f"{path.relative_to(SRC.parent)}:{line}: {module}" for path in sorted((SRC / "nn").rglob("*.py"))
              for line, module, _ in _imports_from_mpdiff(path) if _package_of(module) not in allowed]
    assert upward == []


def test_the_choice_lists_of_the_configuration_are_the_implemented_ones():
    from mpdiff.config import LADDER_CONFIGS, SAMPLER_NAMES
    from mpdiff.diffusion.samplers import SAMPLERS
    from mpdiff.nn.ladder import LADDER

    assert tuple(SAMPLERS) == SAMPLER_NAMES and tuple(LADDER) == LADDER_CONFIGS


def test_storage_imports_nothing_of_the_layers_that_use_it():
    # storage reads and writes files for data, nn, train and the rest (it loads a network file, so it
    # builds networks: nn is below it); it never imports data, diffusion, ema, metrics, train or the
    # command line. Before, storage.samples wrote dataset.json through data.datasets (a circle:
    # data imports storage).
    allowed = {"storage", "nn", "config", "presets", "errors", "budgets"}
    upward = [f"{path.relative_to(SRC.parent)}:{line}: {module}" for path in sorted((SRC / "storage").rglob("*.py"))
              for line, module, _ in _imports_from_mpdiff(path) if _package_of(module) not in allowed]
    assert upward == []
