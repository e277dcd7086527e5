"""The layering README's "Architecture" section promises, checked on the source: the engine (spectral/, models/)
never imports Streamlit, has no import cycles, and imports project modules at the top of files; pages stay short."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ("spectral", "models")
PAGE_LINES = 130  # "about 120 lines or less" (issue 10), with a little room for a docstring


def engine_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the engine packages."""
    out = {}
    for package in ENGINE:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at the top of the file?) for every import statement of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = name
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target or name.split(".")[0] == "streamlit":
                found.append((target or name, node.lineno, id(node) in top))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module -> project modules it imports, streamlit imports, imports hidden inside functions)."""
    modules = engine_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    streamlit, hidden = [], []
    for module, path in modules.items():
        for target, line, at_top in imports_of(path, module, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target.split(".")[0] == "streamlit":
                streamlit.append(where)
            elif target != module:
                graph[module].add(target)
                if not at_top:
                    hidden.append(f"{where} imports {target}")
    return graph, streamlit, hidden


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # importing a submodule imports its package's __init__ first; edges into a package are edges to it
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_engine_never_imports_streamlit():
    _, streamlit, _ = import_graph()
    assert streamlit == []


def test_the_engine_has_no_import_cycles():
    graph, _, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_project_imports_are_at_the_top_of_files():
    _, _, hidden = import_graph()
    assert hidden == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "pages").glob("*.py")))
def test_pages_stay_short(page):
    lines = (ROOT / "pages" / page).read_text().count("\n")
    assert lines <= PAGE_LINES, f"pages/{page} has {lines} lines; move widgets to ui/ and numbers to spectral/"
