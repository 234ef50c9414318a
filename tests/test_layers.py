"""The layers of the house, by construction: every import statement in the package (module level or
inside a function) is read with ``ast``, and the torch-free side may reach neither torch nor the
training side, directly or through another module.

Layers, bottom to top: ``anomaly.data`` -> core (registry, zoo, scoring, decision, calibration,
metrics, texture statistics) -> ``anomaly.training`` -> ``anomaly.deploy`` -> the top layer
(``anomaly.detector``, ``anomaly.demo``, ``anomaly.cli``). The package's ``__init__`` (the version and
a lazy table of the public names, resolved by ``importlib`` on first use) sits below them all. Nothing
imports upward.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (setup.cfg's package_dir)
FOLDERS = {"anomaly": "anomaly", "data": "anomaly.data", "training": "anomaly.training", "deploy": "anomaly.deploy"}
TOP = {"anomaly.__main__", "anomaly.cli", "anomaly.detector", "anomaly.demo"}
# deploy modules that are torch's side on purpose: export traces the model; bench compares with torch eager
TORCH_DEPLOY = {"anomaly.deploy.export", "anomaly.deploy.bench"}
# the subcommand parsers of export | calibrate | audit | review: `anomaly export`'s handler imports
# export when it runs, never at parse time (test_review.py runs the parsers without torch)
DISPATCH = {"anomaly.deploy.cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "anomaly" and parts and parts[0] in ("data", "training", "deploy"):
                continue  # never there, but a stray copy must not hide the real one
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports: internal ones by full name, external ones by top-level name."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join(anchor + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "anomaly":
                while t not in known and "." in t:
                    t = t.rpartition(".")[0]
            else:
                t = t.split(".")[0]
            found.add(t)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _layer(mod: str) -> int:
    if mod == "anomaly":  # the package itself: __version__ and a lazy name table, no eager imports of ours
        return -1
    if mod in TOP:
        return 4
    for prefix, level in (("anomaly.data", 0), ("anomaly.training", 2), ("anomaly.deploy", 3)):
        if mod == prefix or mod.startswith(prefix + "."):
            return level
    return 1  # core


def test_nothing_imports_upward(graph: dict[str, set[str]]) -> None:
    bad = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                 for m, targets in graph.items() for t in targets if t in graph and _layer(t) > _layer(m))
    assert not bad, "\n".join(bad)


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from ``start`` -> the module that imports it on one path there."""
    seen, todo = {start: ""}, [start]
    while todo:
        m = todo.pop()
        for t in graph.get(m, ()):
            if t not in seen:
                seen[t] = m
                todo.append(t)
    return seen


def _torch_free(graph: dict[str, set[str]]) -> list[str]:
    return sorted(m for m in graph if (_layer(m) == 0 or (_layer(m) == 3 and m not in TORCH_DEPLOY | DISPATCH)
                                       or m == "anomaly.decision"))


def test_torch_free_side_reaches_neither_torch_nor_training(graph: dict[str, set[str]]) -> None:
    free = _torch_free(graph)
    assert {"anomaly.data.io", "anomaly.deploy.runtime", "anomaly.deploy.audit", "anomaly.decision"} <= set(free)
    bad = []
    for m in free:
        via = _reach(graph, m)
        for target in via:
            if target in ("torch", "torchvision") or target.startswith("anomaly.training") or target in TORCH_DEPLOY:
                chain, t = [target], target
                while via[t]:
                    t = via[t]
                    chain.append(t)
                bad.append(" <- ".join(chain))
    assert not bad, "\n".join(bad)


def test_the_graph_sees_function_level_imports(graph: dict[str, set[str]]) -> None:
    # the reader must catch imports hidden inside functions, or the two tests above could not fail
    assert "torch" in graph["anomaly.deploy.export"]
    assert "anomaly.training.run" in graph["anomaly.detector"]
