"""The package's floors: a module imports only from its own floor or the floors below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).resolve().parent
# Bottom to top. `pipeline/__init__.py` and `__main__.py` sit outside the floors.
FLOORS = ["core", "artifacts", "engine", "stages", "loop", "cli"]


def _floor_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" and parts[1] in FLOORS else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every `pipeline...` module a file imports, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("pipeline.")]


def floor_violations(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        own = path.relative_to(package).parts[0]
        if own not in FLOORS:
            continue
        for line, name in imported_modules(path):
            target = _floor_of(name)
            if target is not None and FLOORS.index(target) > FLOORS.index(own):
                problems.append(f"{path.relative_to(package)}:{line} ({own}) imports {name} ({target}, a floor above)")
    return problems


def test_every_module_lives_on_a_floor():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside the floors {FLOORS}: {loose}"


def test_no_module_imports_from_a_floor_above_its_own():
    assert floor_violations() == []


def test_the_floor_check_catches_an_upward_import(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "bad.py").write_text("def f():\n    from pipeline.stages.prepare import run_prepare\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "fine.py").write_text("from pipeline.core import config\n")
    assert floor_violations(tmp_path) == [
        "core/bad.py:2 (core) imports pipeline.stages.prepare.run_prepare (stages, a floor above)"
    ]
