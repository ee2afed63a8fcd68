"""The package's shape: data flows one way, so no module imports (directly or through others) itself."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rerec_mini"


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports, at any depth of the file)."""
    graph = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                deps.update(n for n in names if n != name)
        graph[name] = deps
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = imports()
    assert "rerec_mini.trainer" in graph and "rerec_mini.data" in graph
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_dataset_format_imports_no_builder():
    assert imports()["rerec_mini.data"] == set()
