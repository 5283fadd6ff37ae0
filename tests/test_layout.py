"""The package's layers: no module imports one of a higher layer, and no two modules import each other.

Bottom to top (a module may import its own layer and those below):

    0  runtime, config, checkpoint, runs, data, hub  plain helpers, the config schema, files on disk
    1  ops                                          attention operators: references and kernels
    2  attention                                    the layer, its feature maps, its cache, conversion
    3  models, hf, bundle, distributed, evaluation.perplexity, evaluation.report
                                                    loading and scoring models, sharding
    4  training                                     the trainer and the two stages
    5  generation, evaluation, plan                 using a model
    6  pipeline, serving                            the recipe; the server
    7  cli                                          the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    "lolcats": 0, "lolcats.runtime": 0, "lolcats.config": 0, "lolcats.checkpoint": 0, "lolcats.runs": 0,
    "lolcats.data": 0, "lolcats.hub": 0,
    "lolcats.ops": 1,
    "lolcats.attention": 2,
    "lolcats.models": 3, "lolcats.hf": 3, "lolcats.bundle": 3, "lolcats.distributed": 3, "lolcats.evaluation.perplexity": 3,
    "lolcats.evaluation.report": 3,
    "lolcats.training": 4,
    "lolcats.generation": 5, "lolcats.evaluation": 5, "lolcats.plan": 5,
    "lolcats.pipeline": 6, "lolcats.serving": 6,
    "lolcats.cli": 7,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer in tests/test_layout.py: add it to LAYERS")


def module_imports() -> dict[str, set[str]]:
    """{module: lolcats modules it imports}, imports inside functions included."""
    out = {}
    for path in sorted((SRC / "lolcats").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lolcats":
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "lolcats"}
        out[name] = deps - {name}
    return out


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = module_imports()
    upward = [f"{m} (layer {layer(m)}) -> {d} (layer {layer(d)})" for m, deps in graph.items() for d in deps
              if layer(d) > layer(m)]
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = module_imports()
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d in graph and not state.get(d):
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_only_the_registry_imports_a_reference():
    """No module imports an ``ops/*/naive.py`` but the ops registry (``lolcats.ops``, which picks every kernel,
    references included) and the references themselves (one reference builds on another)."""
    bad = sorted(f"{m} -> {d}" for m, deps in module_imports().items() for d in deps
                 if d.endswith(".naive") and m != "lolcats.ops" and not m.endswith(".naive"))
    assert not bad, "modules that import a reference:\n" + "\n".join(bad)
