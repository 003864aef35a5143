"""The package layout: one direction of dependency and no import circles (every import, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eoir_cli", "export")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (package ``__init__`` targets excluded:
    they only hold lazy re-export tables)."""
    modules = _modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name and t not in packages}
    return graph


def test_library_never_imports_export_or_the_cli() -> None:
    graph = _imports()
    library = [m for m in graph if m.startswith("eoir_cli") and not m.startswith("eoir_cli.commands")
               and m != "eoir_cli.cli"]
    bad = sorted((m, t) for m in library for t in graph[m]
                 if t.startswith("export") or t.startswith("eoir_cli.commands") or t == "eoir_cli.cli")
    assert bad == []
    assert "eoir_cli.backends" in graph and "eoir_cli.bench" in graph  # the runtime lives in the package


def test_no_import_circles() -> None:
    graph = _imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    circles = sorted(m for m in graph if m in reachable(m))
    assert circles == []


def test_public_names_are_not_submodule_names() -> None:
    # `import eoir_cli.X` binds the submodule to the package attribute X, hiding a lazily exported
    # function X: README's `from eoir_cli import register` once gave a module ("not callable").
    import importlib

    import eoir_cli

    submodules = {m.split(".")[1] for m in _modules() if m.startswith("eoir_cli.")}
    clashes = sorted(set(eoir_cli._LAZY) & submodules)
    assert not clashes, f"public names that are also submodules: {clashes}"
    importlib.import_module("eoir_cli.pipeline")
    from eoir_cli import register

    assert callable(register) and register.__module__ == "eoir_cli.pipeline"
