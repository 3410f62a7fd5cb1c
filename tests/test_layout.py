"""The package's shape: data flows one way (no module imports from a layer above its own), no import cycles, no
module over 400 lines, and every registry is filled by defining a class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "neuron_attribution"

# Lower layers first. A module may import from a lower layer or from its own package, never from above.
LAYERS = {
    "errors": 0, "version": 0, "registry": 0,
    "settings": 1, "neurons": 1, "files": 1, "datasets": 1,
    "model": 2, "results": 2,
    "scoring": 3,
    "execution": 4,
    "pipelines": 5,
    "reports": 6,
    "explorer": 7,
    "cli": 8, "__init__": 9, "__main__": 9,
}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE).with_suffix("").parts): path for path in PACKAGE.rglob("*.py")}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its top-level package or module."""
    return module.split(".")[0]


def _imports(module: str, path: Path) -> set[str]:
    """Package-internal modules imported by `module` (relative imports resolved), type-checking blocks excluded."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1]  # "a.b.c" and "a.b.__init__" both live in package a.b
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("neuron_attribution"):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(".".join(target))
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_nothing_imports_from_a_layer_above_it():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        own = _unit(module)
        for imported in _imports(module, path):
            other = _unit(imported)
            assert other in LAYERS, f"{module} imports {imported}, which has no layer here"
            if other == own:
                continue
            if LAYERS[other] >= LAYERS[own]:
                upward.append(f"{module} imports {imported}")
    assert not upward, upward
    assert set(map(_unit, modules)) <= set(LAYERS), "a new top-level module needs a layer here"


def test_no_import_cycles_between_modules():
    modules = _modules()
    names = {m.removesuffix(".__init__") for m in modules}
    graph = {m.removesuffix(".__init__"): {i for i in _imports(m, p) if i in names and i != m.removesuffix(".__init__")}
             for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.startswith(node + "."):
                continue  # a package's __init__ importing its own modules to register them
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_registries_are_filled_by_defining_classes():
    from neuron_attribution.model.adapters import supported_model_types
    from neuron_attribution.pipelines.protocols import PROTOCOLS
    from neuron_attribution.scoring.methods import METHODS, default_methods

    assert list(PROTOCOLS) == ["compare", "value", "query", "heads"]
    assert list(METHODS) == ["log_prob_increase", "log_probability", "prob_increase", "norm", "coefficient", "rank",
                             "coefficient_x_norm", "coefficient_x_rank", "random", "integrated_gradients"]
    assert "integrated_gradients" not in default_methods()
    assert {"gpt2", "llama", "mistral", "qwen2", "qwen3"} <= set(supported_model_types())


@pytest.mark.parametrize("registry_of", [
    lambda: __import__("neuron_attribution.model.adapters", fromlist=["ADAPTERS"]).ADAPTERS,
    lambda: __import__("neuron_attribution.scoring.methods", fromlist=["METHODS"]).METHODS,
    lambda: __import__("neuron_attribution.pipelines.protocols", fromlist=["PROTOCOLS"]).PROTOCOLS,
    lambda: __import__("neuron_attribution.model.sources", fromlist=["_OFFLINE"])._OFFLINE,
], ids=["adapters", "methods", "protocols", "offline models"])
def test_every_registry_refuses_a_second_thing_under_a_taken_name(registry_of):
    registry = registry_of()
    name, held = next(iter(registry.items()))
    registry.register(name, held)  # the same thing again (a module imported twice) is harmless
    with pytest.raises(TypeError, match=f"two {registry.what} are registered as {name!r}"):
        registry.register(name, object())
    assert registry[name] is held


def test_model_sources_claim_names_in_order():
    from neuron_attribution.model.sources import offline_model_names, source_for

    assert offline_model_names() == ["gemma-3-270m"]
    assert source_for(None).description == "the offline default model"
    assert source_for("gemma-3-270m").description == "the second offline model"
    assert "gguf" in source_for("x/model.gguf").description
    assert "pickle" in source_for("weights.bin").description
    assert "directory" in source_for(str(PACKAGE)).description
    assert "hub id" in source_for("org/name").description
