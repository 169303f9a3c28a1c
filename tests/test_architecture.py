"""The house plan (docs/architecture.md), checked on the source: no import cycle inside swinlab/ (imports inside
functions and package ``__init__`` files count), each layer imports only the layers below it, and only ``__init__``,
``__main__`` and ``errors`` sit at the top of the package."""
import ast
import pathlib

import pytest
from helpers import ROOT

PKG = ROOT / "swinlab"

# layer -> the swinlab layers it may import (besides itself and ``errors``); third-party rules below
LAYERS = {
    "models": set(),
    "data": set(),
    "training": {"models"},
    "tasks": {"models", "training"},
    "tools": {"models", "data", "training", "tasks"},
}
NO_LIGHTNING = ("models",)  # pure PyTorch
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(importer: str, is_package: bool, node: ast.AST, known) -> list:
    """The swinlab modules an import statement loads (``from a import b`` is a.b when b is a module, else a)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "swinlab"]
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "swinlab":
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def import_graph():
    known = _modules()
    graph, third_party = {}, {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges, libs = set(), set()
        for node in ast.walk(tree):  # every import, also those inside functions
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_resolve(name, path.name == "__init__.py", node, known))
                if isinstance(node, ast.Import):
                    libs.update(a.name.split(".")[0] for a in node.names)
                elif not node.level and node.module:
                    libs.add(node.module.split(".")[0])
        graph[name] = {e for e in edges if e != name}
        third_party[name] = libs
    return graph, third_party


def cycles(graph) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_swinlab():
    graph, _ = import_graph()
    assert "swinlab.training.cli" in graph and graph["swinlab.__main__"]  # the walk saw the package
    assert cycles(graph) == []


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def test_each_layer_imports_only_the_layers_below_it():
    graph, third_party = import_graph()
    wrong = []
    for module, targets in graph.items():
        layer = _layer(module)
        if not layer:
            continue
        allowed = LAYERS[layer] | {layer}
        for t in targets:
            other = _layer(t)
            if t != "swinlab.errors" and other not in allowed:
                wrong.append(f"{module} imports {t}")
        if layer in NO_LIGHTNING and {"lightning", "pytorch_lightning"} & third_party[module]:
            wrong.append(f"{module} imports Lightning")
    assert wrong == []


def test_only_entry_points_and_errors_at_the_top_of_the_package():
    loose = {p.name for p in PKG.glob("*.py")} - TOP_LEVEL
    assert loose == set()
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


@pytest.mark.parametrize("path", ["swinlab.tasks.ImageClassifier", "swinlab.tasks.MaskedImageModeling",
                                  "swinlab.data.DigitsDataModule", "swinlab.data.ImageFolderDataModule",
                                  "swinlab.data.SyntheticDataModule",
                                  "swinlab.training.sharding.OffloadModelParallelStrategy"])
def test_class_paths_used_in_experiment_files_import(path):
    import importlib
    module, name = path.rsplit(".", 1)
    assert isinstance(getattr(importlib.import_module(module), name), type)
    used = {line.split("class_path:")[1].strip() for f in (ROOT / "experiments").rglob("*.yaml")
            for line in f.read_text().splitlines() if "class_path: swinlab." in line}
    assert used, "no swinlab class paths found in experiments/"
    for p in used:
        mod, cls = p.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), cls), p
