"""engine/ is grouped by role and its imports run one way (issue 16): the web app (webui/) -> flows (jobs/) ->
the public surface -> stages -> models -> hooks -> video -> cache, with `engine.errors` the one leaf every layer uses.
Read from the source with `ast`, so a function-level import counts as much as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower rank = higher layer; a module may import only its own rank or a larger one.
RANKS = {"webui": -2, "engine.jobs": -1, "engine": 0, "engine.stages": 1, "engine.models": 2, "engine.hooks": 3, "engine.video": 4, "engine.errors": 5, "cache": 6}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Every project module `path` imports at run time (TYPE_CHECKING blocks skipped)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from engine.hooks import registry`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m.split(".")[0] in ("webui", "engine", "cache")}


def _graph() -> dict[str, set[str]]:
    files = [p for d in ("webui", "engine", "cache") for p in (ROOT / d).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported not in modules and "." in imported:  # `engine.x.NAME` -> module engine.x
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def _rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


def test_imports_run_one_way():
    wrong = [
        f"{m} -> {t}"
        for m, targets in _graph().items()
        for t in targets
        if t not in ("engine",) and _rank(t) < _rank(m) and not (_rank(m) == 0 and _rank(t) == 0)
    ]
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = walk(start)
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_a_planted_circle(tmp_path, monkeypatch):
    # The circle issue 16 found (video -> proxy -> encode -> video), planted in a copy: the
    # checker must find it, so a green test above means something.
    for rel, text in {
        "engine/__init__.py": "",
        "engine/video/__init__.py": "",
        "engine/video/reader.py": "from engine.models.proxy import HELD_OUT\n",
        "engine/models/__init__.py": "",
        "engine/models/proxy.py": "def f():\n    from engine.stages.encode import encode_frames\n",
        "engine/stages/__init__.py": "",
        "engine/stages/encode.py": "from engine.video.reader import read_frames\n",
        "cache/__init__.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()
    with pytest.raises(AssertionError, match="engine.video.reader -> engine.models.proxy"):
        test_imports_run_one_way()


def test_engine_top_level_is_small_and_every_folder_says_its_role():
    entries = [p.name for p in (ROOT / "engine").iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 12, sorted(entries)
    for folder in (p for p in (ROOT / "engine").iterdir() if p.is_dir() and p.name not in ("assets", "__pycache__")):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc, f"engine/{folder.name}/__init__.py must say what lives there and what it may import"


def test_no_function_is_over_60_lines():
    """The product's code and the test reference: a longer function is several jobs in one."""
    files = [ROOT / "cli.py", *(p for d in ("engine", "cache", "webui", "tests/reference") for p in (ROOT / d).rglob("*.py"))]
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long
