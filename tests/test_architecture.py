"""The code's shape, checked: the import graph of ``src/qatlm`` has no cycle, the quantization math imports nothing
above it, functions stay short enough to read, the CLI stays a thin adapter, and docs/architecture.md names every
module there is (and nothing that is not)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "qatlm"


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the qatlm modules it imports, at the top or inside a function (both are a dependency)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != m and t.startswith("qatlm"):
                    graph[m].add(t)
    return graph


def _cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["qatlm.cli"]  # the graph was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_quantization_math_imports_nothing_above_it():
    allowed = ("qatlm.quant", "qatlm.errors", "qatlm.fields")
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith("qatlm.quant"):
            assert all(d.startswith(allowed) for d in deps), (m, sorted(deps))


def test_no_function_is_longer_than_80_lines():
    long = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{f.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_cli_is_a_thin_adapter():
    text = (SRC / "cli.py").read_text()
    assert len(text.splitlines()) <= 300
    assert "run_pipeline" in text and "save_quantized" not in text and "run_recipe" not in text


def test_docs_architecture_names_every_module_and_only_those():
    """Every module is named: by its path, or by its file name with its package named too (``block.py`` of
    ``block_ap/``); every file or package named exists."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:[a-z0-9_]+/)*[a-z0-9_]+(?:\.py|/))`", doc))
    files = {str(f.relative_to(SRC)) for f in SRC.rglob("*.py")}
    packages = {str(d.relative_to(SRC)) + "/" for d in SRC.rglob("*") if d.is_dir() and (d / "__init__.py").exists()}
    for f in sorted(files):
        folder, _, base = f.rpartition("/")
        package_named = not folder or any(n.rstrip("/").endswith(folder.rpartition("/")[2]) for n in named if n.endswith("/"))
        assert f in named or (base in named and package_named) or (base == "__init__.py" and folder + "/" in named), \
            f"docs/architecture.md does not name {f}"
    for n in sorted(named - {n for n in named if "/" in n.rstrip("/") and (ROOT / n).exists()}):  # (repo paths: tests/...)
        ok = n in files or n in packages or any(f.endswith("/" + n) for f in files) or any(p.endswith("/" + n) for p in packages)
        assert ok, f"docs/architecture.md names {n}, which is not in src/qatlm"


# the layers of docs/architecture.md, bottom first: a module imports only modules of its own layer or below
LAYERS = [
    ("foundation", ("errors", "fields", "version", "summary", "memory", "io")),
    ("quantization math", ("quant",)),
    ("data", ("data",)),
    ("models", ("model",)),
    ("training loops", ("train",)),
    ("methods", ("methods",)),
    ("recipes", ("recipes",)),
    ("evaluation, export", ("eval", "export")),
    ("the pipeline", ("pipeline",)),
    ("entry points", ("api", "options", "parser", "cli", "demo", "describe", "install", "upload", "")),
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def test_every_module_imports_only_its_layer_or_below():
    graph = import_graph()
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, upward
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name, _ in LAYERS:
        assert f"| {name} |" in doc, name  # the table documents the same layers


def test_the_readmes_layout_names_every_package_and_top_level_module():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout"):].split("```")[1]
    words = set(re.findall(r"[a-z0-9_]+\.py|[a-z0-9_]+/(?=[ \n(]|$)", block))  # file names and folder names (not "tok/s")
    tops = {f.name for f in SRC.glob("*.py") if f.name != "__init__.py"} | {d.name + "/" for d in SRC.iterdir() if (d / "__init__.py").exists()}
    assert tops <= words, sorted(tops - words)
    files = {f.name for f in SRC.rglob("*.py")} | {d.name + "/" for d in SRC.rglob("*") if d.is_dir()}
    bench = {f.name for f in (ROOT / "bench").glob("*.py")} | {"bench/", "src/", "qatlm/"}
    assert words <= files | bench, sorted(words - files - bench)
