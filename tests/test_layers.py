"""The package's layer rule: a module imports only from its own stage or the stages to its left.

``errors, _version`` -> ``storage`` -> ``profiles`` -> ``config, runtime`` -> ``sky`` -> ``simulate | ingest`` -> ``models`` ->
``runs`` -> ``evaluate`` -> ``train`` -> ``demo`` -> ``cli`` -> ``__main__``. Every import counts, also those
inside functions (an import hidden in a function is still a dependency). Stages on one level
(``simulate | ingest``) do not import each other, and no modules form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lensray"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "_version"),
    ("storage",),
    ("profiles",),
    ("config", "runtime"),
    ("sky",),
    ("simulate", "ingest"),
    ("models",),
    ("runs",),
    ("evaluate",),  # train imports its metrics for the per-epoch validation
    ("train", "grade"),  # grade reads sky and storage, nothing of train: siblings
    ("demo",),
    ("cli",),
    ("__main__",),
)
FACADE = "__init__"  # the package root: __version__ and the lazy notebook entry points


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at module level or inside a function."""
    package, found = root.name, set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            for alias in node.names:  # `from pkg.stage import module` names a module, else a symbol
                child = f"{node.module}.{alias.name}"
                is_module = (root.parent / Path(*child.split("."))).with_suffix(".py").exists()
                found.add(child if is_module else node.module)
    return found


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def layer_of(stage: str) -> int:
    for rank, stages in enumerate(LAYERS):
        if stage in stages:
            return rank
    raise AssertionError(f"stage {stage!r} is in no layer: add it to LAYERS")


def import_graph(root: Path) -> dict[str, set[str]]:
    return {module_name(path, root): imports_of(path, root) for path in sorted(root.rglob("*.py"))}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        source = stage_of(module)
        for target in sorted(targets):
            destination = stage_of(target)
            if destination == FACADE and source != FACADE:
                problems.append(f"{module} imports the package root {target}")
            elif source == FACADE or destination == source:
                continue
            elif layer_of(destination) > layer_of(source):
                problems.append(f"{module} ({source}) imports {target} ({destination}), a later stage")
            elif layer_of(destination) == layer_of(source):
                problems.append(f"{module} ({source}) imports {target} ({destination}), a sibling stage")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target in graph and state.get(target) is None:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "lensray" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "lensray"


def test_lensray_keeps_its_layers() -> None:
    assert layer_violations(import_graph(PACKAGE)) == []


def test_lensray_has_no_import_cycle() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_every_stage_is_in_a_layer() -> None:
    stages = {stage_of(module) for module in import_graph(PACKAGE)} - {FACADE}
    for stage in stages:
        layer_of(stage)
    assert {"sky", "simulate", "ingest", "models", "runs", "train", "evaluate", "cli"} <= stages


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a function-level upward import: the kind that hid the evaluate <-> score cycle
            {
                "__init__.py": "",
                "sky/__init__.py": "",
                "sky/fits.py": "def f():\n    from lensray.train import loop\n",
                "train/__init__.py": "",
                "train/loop.py": "",
            },
            "lensray.sky.fits (sky) imports lensray.train.loop (train), a later stage",
        ),
        (
            {
                "__init__.py": "",
                "ingest/__init__.py": "",
                "ingest/store.py": "from lensray.simulate.scene import Scene\n",
                "simulate/__init__.py": "",
                "simulate/scene.py": "Scene = 1\n",
            },
            "lensray.ingest.store (ingest) imports lensray.simulate.scene (simulate), a sibling stage",
        ),
        (
            {"__init__.py": "__version__ = '0'\n", "runs.py": "from lensray import __version__\n"},
            "lensray.runs imports the package root lensray",
        ),
    ],
)
def test_a_planted_bad_import_is_caught(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert expected in layer_violations(import_graph(write_package(tmp_path, files)))


def test_a_planted_cycle_is_caught(tmp_path: Path) -> None:
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "evaluate/__init__.py": "",
            "evaluate/evaluate.py": "from lensray.evaluate import score\n",
            "evaluate/score.py": "def f():\n    from lensray.evaluate.evaluate import g\n",
        },
    )
    assert cycles(import_graph(root)) == [
        ["lensray.evaluate.evaluate", "lensray.evaluate.score", "lensray.evaluate.evaluate"]
    ]
