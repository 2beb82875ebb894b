"""The house's shape, checked from the source: packages follow the pipeline and import only downward,
no two files import each other in a circle, and a function-level import says why it is one.

    paths, atomic -> prompts, kernels -> models -> runtime -> heads -> loading -> decoding
        -> training -> calibration -> export -> bench -> server -> commands -> cli, the package root

Decoding sits below training and calibration because they generate with it (self-distillation, the
model's own answers to calibrate on); nothing in decoding needs them: it reads what they produce
from a head bundle (heads/).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "exitspec"
# Bottom to top; a module may import its own layer's package and anything below it.
LAYERS = [
    {"paths", "atomic"},
    {"prompts", "kernels"},
    {"models"},
    {"runtime"},
    {"heads"},
    {"loading"},
    {"decoding"},
    {"training"},
    {"calibration"},
    {"export"},
    {"bench"},
    {"server"},
    {"commands"},
    {"cli", "__init__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# Reasons a function-level import may give (in a comment on its line or the line above).
LAZY_REASONS = ("optional", "start-up")


def unit(module: str) -> str:
    """exitspec.decoding.api -> "decoding"; exitspec -> "__init__" (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    """(imported exitspec module, line, inside a function?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import name`: the package, and pkg.name in case the name is a module
            names = [node.module] * (node.module != "exitspec") + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in nested


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_package_has_a_place_in_the_pipeline():
    units = {unit(module_name(p)) for p in sources()}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_flow_down_the_pipeline():
    upward = []
    for path in sources():
        src = unit(module_name(path))
        for name, line, _ in imports(path):
            if name.startswith("exitspec.") or name == "exitspec":
                dst = unit(name) if name != "exitspec" else "__init__"
                if dst in RANK and RANK[dst] > RANK[src]:
                    upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {name} ({src} -> {dst})")
    assert not upward, "imports that run back up the pipeline:\n" + "\n".join(upward)


def test_no_circle_of_files():
    modules = {module_name(p): p for p in sources()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for name, _, _ in imports(path):
            # a package's __init__ runs before its modules: an import of the own package is no edge
            if name in modules and name != m and name != m.rsplit(".", 1)[0]:
                graph[m].add(name)
    # Tarjan-free check: depth-first search for a back edge.
    state: dict[str, int] = {}
    circle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circle.extend(stack[stack.index(t):] + [m, t] if t in stack else [m, t])
                return True
            if t not in state and visit(t, stack + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, [m]):
            break
    assert not circle, "files that import each other in a circle: " + " -> ".join(circle)


def test_function_level_imports_say_why():
    unexplained = []
    for path in sources():
        lines = path.read_text().splitlines()
        for name, line, inside in imports(path):
            if not inside:
                continue
            said = lines[line - 1] + " " + (lines[line - 2] if line > 1 else "")
            if not any(reason in said for reason in LAZY_REASONS):
                unexplained.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert not unexplained, (f"a function-level import needs a comment naming why ({' / '.join(LAZY_REASONS)}):\n"
                             + "\n".join(unexplained))


def test_moved_modules_name_their_new_place():
    import importlib

    import pytest

    for old, new in (("exitspec.models.loading", "exitspec.loading"),
                     ("exitspec.heads.evaluate", "exitspec.calibration.evaluate")):
        with pytest.raises(ImportError, match=new.replace(".", r"\.")):
            importlib.import_module(old)
    with pytest.raises(ImportError, match="exitspec.loading"):
        from exitspec.heads.bundle import attach_heads  # noqa: F401
