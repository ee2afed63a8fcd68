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


def test_readme_layout_lists_every_module():
    """README's Layout block names every module of rerec_mini/ (bench/ as one entry) and nothing that is gone."""
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {ln.split()[0] for ln in block.splitlines() if ln.startswith("  ") and ln.split()}
    modules = {f.name for f in PKG.glob("*.py") if f.name != "__init__.py"} | {"bench/"}
    assert modules - listed == set(), f"modules missing from README's layout: {sorted(modules - listed)}"
    assert listed - modules == set(), f"README's layout lists what is not in rerec_mini/: {sorted(listed - modules)}"
