"""Imports flow downstream only (../shared/DESIGN.md): checked on the source, so a cycle or a reach into
another module's private names fails here before it grows.

Every `import` counts, including the ones inside functions: a lazy import still ties two modules together,
and a cycle hidden behind one (quickstart <-> cli, loaders.auto <-> store) is still a cycle to a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmforge"

# (importer prefix, forbidden imported prefix, why)
RULES = [
    ("lmforge.model", "lmforge.train", "the model never imports the trainer"),
    ("lmforge.model", "lmforge.loaders", "the model never imports loaders"),
    ("lmforge.model", "lmforge.serve", "the model never imports the server"),
    ("lmforge.model", "lmforge.engine", "the model never imports the engine"),
    ("lmforge.data", "lmforge.train", "data never imports train"),
    ("lmforge.checkpoint", "lmforge.loaders", "checkpoint never imports loaders"),
    ("lmforge.engine", "lmforge.serve", "the engine never imports the server"),
    ("lmforge.engine", "lmforge.cli", "the engine never imports the CLI"),
    ("lmforge.engine", "lmforge.train", "the engine never imports the trainer"),
    ("lmforge.serve", "lmforge.cli", "the server never imports the CLI"),
    ("lmforge.serve", "lmforge.train", "the server never imports the trainer"),
    ("lmforge.train", "lmforge.serve", "the trainer never imports the server"),
    ("lmforge.train", "lmforge.cli", "the trainer never imports the CLI"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [a.name for a in node.names]))
    return out


def graph() -> dict[str, set[str]]:
    """lmforge module -> the lmforge modules it imports (a `from pkg import mod` names the submodule)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for me, path in files.items():
        for target, names in imports(path):
            if not target.startswith("lmforge"):
                continue
            for name in names or [None]:
                sub = f"{target}.{name}" if name else None
                dep = sub if sub in files else target
                while dep not in files and "." in dep:
                    dep = dep.rpartition(".")[0]
                # A package's __init__ re-exporting its own modules is not a dependency of theirs on it.
                if dep != me and not (me and dep.startswith(me + ".") and path.name == "__init__.py"):
                    edges[me].add(dep)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_import_cycles():
    assert cycles(graph()) == []


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between the top-level parts (lmforge.engine, lmforge.store, ...): a cycle between two
    packages is a tangle too, even when no two single modules import each other."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for me, deps in edges.items():
        out.setdefault(top(me), set()).update(top(d) for d in deps if top(d) != top(me))
    return out


def test_no_import_cycles_between_packages():
    assert cycles(package_graph(graph())) == []


def test_layers_import_downstream_only():
    broken = [f"{me} imports {dep}: {why}" for me, deps in graph().items() for dep in deps
              for low, high, why in RULES if _within(me, low) and _within(dep, high)]
    assert broken == []


def test_no_module_imports_another_modules_private_names():
    reaches = []
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        for target, names in imports(path):
            if not target.startswith("lmforge") or target == me:
                continue
            reaches += [f"{me} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert reaches == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
