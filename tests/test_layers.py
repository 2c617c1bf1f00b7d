"""The house plan: layers import only downward, and no two modules import each other in a circle.

formats, bits, machine, launcher, errors (leaves) <- backends <- _ops <- qtensor <- ops <- nn, optim, objectives, attention (side by side)
<- train <- bench, report, env <- cli <- demo. Function-level imports count too: a lazy import may
save start-up time, but it must not hide an upward import or a cycle.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "lowbit"
RANK = {"formats": 0, "bits": 0, "machine": 0, "launcher": 0, "errors": 0, "backends": 1, "_ops": 2, "qtensor": 3, "ops": 4,
        "nn": 5, "optim": 5, "objectives": 5, "attention": 5, "train": 6,
        "bench": 7, "report": 7, "env": 7, "cli": 8, "demo": 9, "__main__": 9}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(lowbit module imported, line) for every import statement, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import name` may import the submodule pkg.name
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names] + [(base, node.lineno)]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m.startswith("lowbit.")]


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m, _ in _imports(path) if m in modules and m != name}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_top_level_module_has_a_layer():
    tops = {_layer(m) for m in _graph() if m != "lowbit"}
    assert tops <= set(RANK), f"give these a layer in RANK: {sorted(tops - set(RANK))}"


def test_imports_go_only_downward():
    upward = []
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        if name == "lowbit":
            continue  # the package face re-exports the public API
        for target, line in _imports(path):
            a, b = _layer(name), _layer(target)
            if a != b and b in RANK and RANK[b] >= RANK[a]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not upward, "\n".join(sorted(set(upward)))


def test_no_import_cycles():
    graph = _graph()
    for start in sorted(graph):  # a package's __init__ importing its own submodules is not a cycle
        graph[start] = {m for m in graph[start] if not m.startswith(start + ".")}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
