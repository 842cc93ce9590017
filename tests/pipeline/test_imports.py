"""Which feature folder of pipeline/ may import which: an allow-list without cycles, checked on every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).resolve().parent

# Folder -> the folders its modules may import (its own always). `pipeline/__init__.py` and
# `__main__.py` sit outside the folders; `import pipeline` itself (for its __file__) is no edge.
ALLOWED: dict[str, set[str]] = {
    "runtime": set(),
    "data": {"runtime"},
    "selection": {"runtime"},
    # The score stage selects as it scores: the scorer applies the method per sample and the stage
    # writes keep masks beside the signals (selection's settings, methods, keep tables, shards).
    "scoring": {"runtime", "selection"},
    # The masked loss shares scoring's NLL kernel and device budget, the worker its length batching;
    # the training data joins tokens to selection's keep masks.
    "training": {"runtime", "scoring", "selection"},
    "loop": {"runtime", "data", "scoring", "selection", "training"},
    "eval": {"runtime", "data", "scoring", "selection", "training", "loop"},
    # The report renders an eval folder from its typed eval.json (`eval.records`).
    "views": {"runtime", "selection", "training", "loop", "eval"},
    "validation": {"runtime", "training"},
    "cli": {"runtime", "data", "scoring", "selection", "training", "loop", "eval", "views", "validation"},
}


def _folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" and parts[1] in ALLOWED else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every `pipeline...` module a file imports, at any depth (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("pipeline.")]


def import_violations(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        own = path.relative_to(package).parts[0]
        if own not in ALLOWED:
            continue
        for line, name in imported_modules(path):
            target = _folder_of(name)
            if target is not None and target != own and target not in ALLOWED[own]:
                problems.append(f"{path.relative_to(package)}:{line} ({own}) imports {name} ({target}, not allowed)")
    return problems


def cycle(allowed: dict[str, set[str]]) -> list[str]:
    """A cycle of the allow-list graph as a path (first folder repeated at the end), or [] when it has none."""
    done: set[str] = set()

    def visit(folder: str, path: list[str]) -> list[str]:
        if folder in path:
            return path[path.index(folder):] + [folder]
        if folder in done:
            return []
        for target in sorted(allowed.get(folder, ())):
            found = visit(target, path + [folder])
            if found:
                return found
        done.add(folder)
        return []

    for folder in sorted(allowed):
        found = visit(folder, [])
        if found:
            return found
    return []


def test_every_module_lives_in_a_feature_folder():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside the feature folders {sorted(ALLOWED)}: {loose}"
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders <= set(ALLOWED), f"folders missing from the allow-list: {sorted(folders - set(ALLOWED))}"


def test_every_import_follows_the_allow_list():
    assert import_violations() == []


def test_the_allow_list_has_no_cycle():
    assert cycle(ALLOWED) == []
    assert all(target in ALLOWED for targets in ALLOWED.values() for target in targets)


def test_the_cycle_check_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_import_check_catches_a_forbidden_import(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "bad.py").write_text("def f():\n    from pipeline.data.prepare_stage import run_prepare\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fine.py").write_text("from pipeline.runtime import config\n")
    assert import_violations(tmp_path) == [
        "runtime/bad.py:2 (runtime) imports pipeline.data.prepare_stage.run_prepare (data, not allowed)"
    ]
