"""The shape of the codebase, checked: module size, private names kept private, no import
cycles, and the layer map of docs/design.md (each package imports only the layers above it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moebal"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import in module ``name``, function-
    local ones included, ``if TYPE_CHECKING:`` blocks excluded."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, [a.name for a in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def resolve(mod: str, names: list[str]) -> list[str]:
    """The moebal modules an import statement loads (a package's names may be submodules)."""
    if not mod.startswith("moebal"):
        return []
    out = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
    if mod in MODULES:
        # ``from pkg import submodule`` depends on the submodule (as ``import pkg.sub``
        # does), ``from pkg import name`` on the package's __init__
        if not names or len(out) < len(names):
            out.append(mod)
    else:  # "moebal.x.y" imported as a module path whose tail is not a file
        parts = mod.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        if parts:
            out.append(".".join(parts))
    return out


def graph() -> dict[str, set[str]]:
    g = {m: set() for m in MODULES}
    for m in MODULES:
        for mod, names, _ in imports(m):
            for target in resolve(mod, names):
                if target != m:
                    g[m].add(target)
    return g


def test_no_module_over_the_size_limit():
    big = {m: n for m, p in MODULES.items()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_private_name_imported_across_modules():
    bad = []
    for m in MODULES:
        for mod, names, line in imports(m):
            if not mod.startswith("moebal"):
                continue
            private_module = any(p.startswith("_") and not p.startswith("__")
                                 for p in mod.split("."))
            private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private_module or private_names:
                bad.append(f"{m}:{line} imports {mod} {private_names or ''}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_private_attribute_read_across_modules():
    """``obj._x`` outside the module that defines ``_x`` (self/cls excepted)."""
    defined: dict[str, set[str]] = {}
    trees = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}
    for m, tree in trees.items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        defined[m] = names
    bad = []
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in defined[m]
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                owners = [o for o, names in defined.items() if node.attr in names]
                if owners:  # a moebal name (not a torch/numpy private we cannot change)
                    bad.append(f"{m}:{node.lineno} reads .{node.attr} (defined in {owners[0]})")
    assert not bad, "private attributes read across modules:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    assert not sccs, "import cycles (function-local imports count):\n" + "\n".join(
        " <-> ".join(c) for c in sccs)


# The layer map of docs/design.md: the moebal packages each package may import. The bottom
# (fileio, trace) imports no other moebal package; the command layer (cli, bench, demo)
# may import anything.
BOTTOM = {"fileio", "trace", "moebal"}
LAYERS = {
    "fileio": set(),
    "trace": {"fileio"},
    "routing": set(),
    "metrics": {"routing"},
    "schedule": {"fileio"},
    "model": {"routing", "metrics"},
    "data": {"fileio"},
    "train": {"routing", "metrics", "schedule", "model", "data"},
    "parallel": {"routing", "metrics", "schedule", "model", "data", "train"},
    "sim": {"schedule", "metrics"},
    "nn": {"routing", "metrics"},
    "integrations": {"routing", "metrics", "schedule", "model", "parallel"},
    "report": {"routing", "metrics", "schedule", "model", "data", "train", "sim"},
}
# Where the map bends, module by module (docs/design.md says why): `moebal train` is one
# command with or without --nproc, so the train CLI hands the parallel flags to moebal.parallel.
BENDS = {"moebal.train.cli": {"parallel"}}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moebal"


def test_each_package_imports_only_the_layers_above_it():
    bad = []
    for m, targets in graph().items():
        own = _package(m)
        if own not in LAYERS:
            continue  # the command layer
        allowed = LAYERS[own] | BOTTOM | BENDS.get(m, set()) | {own}
        for target in sorted(targets):
            if _package(target) not in allowed:
                bad.append(f"{m} imports {target}")
    assert not bad, "imports against the layer map:\n" + "\n".join(bad)


def test_every_package_is_on_the_map():
    packages = {_package(m) for m in MODULES} - {"moebal"}
    commands = {"cli", "bench", "demo", "__main__"}
    assert packages - commands <= set(LAYERS), sorted(packages - commands - set(LAYERS))
