"""The import graph of normopt: no cycles, and components never reach up.

Components (models, optim, data, parallel, diagnostics, checkpoint, metrics) import each
other and a few leaf modules only; the run-level modules (config, trainer, cli, factorial,
report, ...) compose them. A component that imported the top-level config would tie every
component to every other's keys. Inside the report, the stages (cells, stats, render, plots)
import one way as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

COMPONENTS = ("models", "optim", "data", "parallel", "diagnostics", "checkpoint", "metrics")
# top-level modules any component may use: they import nothing of normopt but each other
LEAVES = (
    "normopt.errors",
    "normopt.dtypes",
    "normopt.key_roles",
    "normopt.run_dir",
    "normopt.progress",
    "normopt.registry",
)
# the modules that compose components: they ask the registries and the model protocol
# (models/llama.py), never a component's own module
HUBS = (
    "normopt.trainer",
    "normopt.models.llama",
    "normopt.optim.param_groups",
    "normopt.optim.builder",
    "normopt.diagnostics.collector",
)
# the report's stages and the stages each may import (writer.py, above them, imports all four)
REPORT_STAGES = {
    "cells": set(),
    "stats": {"cells"},
    "render": {"stats", "cells"},
    "plots": {"stats", "cells"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (REPO_ROOT / "normopt").rglob("*.py"):
        name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the normopt modules it imports (at any depth of the file: a function-level
    import is an arrow too)."""
    mods = _modules()

    def resolve(target: str) -> str:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [resolve(f"{node.module}.{a.name}") or node.module for a in node.names]
            for target in targets:
                if target.startswith("normopt") and resolve(target) not in ("", name, "normopt"):
                    graph[name].add(resolve(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_function_level_imports_and_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "normopt.config" in graph["normopt.trainer"]
    assert "normopt.data.synthetic_assoc" in graph["normopt.data.config"]  # imported inside validate()


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _package(module: str) -> str:
    """normopt.models.llama -> models; normopt.trainer -> trainer."""
    return module.split(".")[1] if "." in module else ""


def test_components_import_only_components_and_leaves():
    upward = {}
    for module, targets in import_graph().items():
        if _package(module) in COMPONENTS:
            bad = sorted(t for t in targets if _package(t) not in COMPONENTS and t not in LEAVES)
            if bad:
                upward[module] = bad
    assert not upward, f"components reaching up: {upward}"


def test_leaves_stay_leaves():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] <= set(LEAVES), (leaf, graph[leaf])


def component_modules() -> set[str]:
    """The modules that implement a registered norm, attention, feed-forward or optimizer."""
    from normopt.models.components import ATTENTIONS, FEED_FORWARDS
    from normopt.models.norms import NORMS
    from normopt.optim.registry import OPTIMIZERS

    classes = [*NORMS.values(), *ATTENTIONS.values(), *FEED_FORWARDS.values()]
    modules = {cls.__module__ for cls in classes} | {spec.build.__module__ for spec in OPTIMIZERS.values()}
    return modules | {"normopt.optim.muon"}  # what the Muon family's builder builds


def test_hubs_ask_registries_not_components():
    graph = import_graph()
    internals = component_modules()
    assert {"normopt.models.derf", "normopt.models.moe", "normopt.optim.muon_family"} <= internals
    reaching = {hub: sorted(graph[hub] & internals) for hub in HUBS if graph[hub] & internals}
    assert not reaching, f"hubs importing a component's module: {reaching}"


def _report_stage(module: str) -> str | None:
    """normopt.report.stats.summary -> stats; None outside a stage (writer.py, other packages)."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["normopt", "report"] and len(parts) > 2 and parts[2] in REPORT_STAGES else None


def test_report_stages_import_one_way():
    assert set(REPORT_STAGES) <= {_report_stage(m) for m in import_graph()}, "a report stage is missing"
    backward = {}
    for module, targets in import_graph().items():
        stage = _report_stage(module)
        if stage is None:
            continue
        bad = sorted(
            t
            for t in targets
            if t.startswith("normopt.report") and _report_stage(t) not in {stage, *REPORT_STAGES[stage]}
        )
        if bad:
            backward[module] = bad
    assert not backward, f"report stages importing against the order: {backward}"
