"""The layer contract (README "Architecture"), checked on every import line of the package.

Every ``import`` / ``from ... import`` in ``mimc/`` (module level or inside a function: a lazy import
is still a dependency) must point to the same layer or one below it, siblings of one layer never
import each other, no two modules import each other through any chain, and the CLI reaches the
library only through the verbs. import-linter would express the same contract; this test needs no
extra package and also reports the CLI module sizes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mimc"

# Top to bottom; a module imports only from its own package or from layers below its own.
LAYERS: list[tuple[str, ...]] = [
    ("mimc.cli",),
    ("mimc.api",),
    ("mimc.pipeline",),
    ("mimc.quant",),
    ("mimc.compression", "mimc.deploy"),
    ("mimc.train", "mimc.latency", "mimc.evaluation", "mimc.embedding"),
    ("mimc.runtime", "mimc.graph", "mimc.metrics", "mimc.data"),
    ("mimc.models",),
    ("mimc.options", "mimc.artifact", "mimc.yamlfile"),
    ("mimc.atomic",),
    ("mimc.errors", "mimc._version"),
]
CLI_MAX_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import (the contract reads absolute imports)"
                if node.module and node.module.startswith("mimc"):
                    for alias in node.names:  # `from mimc.x import y`: y may be a module
                        sub = f"{node.module}.{alias.name}"
                        found.add(sub if _exists(sub) else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mimc"))
        graph[name] = {m for m in found if m != name}
    return graph


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _layer(module: str) -> tuple[int, str] | None:
    for i, group in enumerate(LAYERS):
        for top in group:
            if module == top or module.startswith(top + "."):
                return i, top
    return None


GRAPH = _imports()


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in GRAPH if m != "mimc" and m != "mimc.__main__" and _layer(m) is None)
    assert not unplaced, f"modules outside every layer: {unplaced} (add them to LAYERS and README)"


def test_no_import_from_a_lower_layer_to_a_higher_one_or_between_siblings():
    bad = []
    for module, targets in GRAPH.items():
        here = _layer(module)
        if here is None:
            continue
        for target in targets:
            there = _layer(target)
            if target == "mimc" or there is None:
                bad.append(f"{module} -> {target} (the package root / an unplaced module)")
            elif there[0] < here[0] or (there[0] == here[0] and there[1] != here[1]):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_between_modules():
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    cycles = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cli_imports_only_the_verbs_and_its_own_helpers():
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith("mimc.cli")
                 for t in targets if not (t == "mimc" or t.startswith("mimc.api") or t.startswith("mimc.cli")))
    assert not bad, "CLI modules reaching past the verbs:\n" + "\n".join(bad)
    helpers = {"mimc.cli.common", "mimc.cli.render", "mimc.cli.app"}
    cross = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith("mimc.cli.") and m not in helpers
                   for t in targets if t.startswith("mimc.cli.") and t not in helpers)
    assert not cross, f"CLI command modules importing each other: {cross}"


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "cli").glob("*.py") if p.stem not in ("common", "render", "__init__")),
                         ids=lambda p: p.stem)
def test_every_cli_command_module_is_short(path):
    assert len(path.read_text().splitlines()) <= CLI_MAX_LINES


def test_the_verbs_are_never_shadowed_by_a_module(tmp_path):
    """``import mimc; mimc.profile(...)`` works whatever was imported before."""
    import importlib
    import pkgutil

    import mimc

    for info in pkgutil.walk_packages(mimc.__path__, "mimc."):
        if not info.name.startswith(("mimc.cli", "mimc.__main__")):
            importlib.import_module(info.name)
    for verb in mimc._VERBS:
        assert callable(getattr(mimc, verb)) and not isinstance(getattr(mimc, verb), type(mimc)), verb
    graph = mimc.export("ref", tmp_path / "a", validate=False).path
    report = mimc.profile(graph, "cpu", iters=2, warmup=1)
    assert report["label"] == "measured" and report["results"][0]["batch"] == 1
