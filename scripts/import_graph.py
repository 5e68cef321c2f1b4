"""The import graph of atlas-rl's own modules, and its circles.

Every import counts, the ones deferred into functions included (a deferred import is a
dependency all the same: it only moves the failure to run time). Importing a submodule
(``from atlas_rl import ranks``, ``from atlas_rl.backends.vllm import hooks``) depends
on that submodule; importing a name from a package (``from atlas_rl import AtlasConfig``)
depends on the package's ``__init__``. Imports under ``if TYPE_CHECKING:`` do not count.

    python scripts/import_graph.py            # circles (strongly connected groups); exit 1 if any
    python scripts/import_graph.py --edges    # every edge, for docs/architecture.md

tests/test_layout.py runs it in CI.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the installed package name of each source folder (pyproject.toml's package-dir)
FOLDERS = {"atlas_rl": "atlas_rl", "kernels": "atlas_rl.kernels",
           "integrations": "atlas_rl.integrations"}


def modules(root: str = ROOT) -> dict[str, str]:
    """Module name -> source file, for every module of the installed package."""
    found = {}
    for folder, package in FOLDERS.items():
        base = os.path.join(root, folder)
        for directory, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(directory, name), base)[:-3]
                parts = [package] + [p for p in rel.split(os.sep) if p != "__init__"]
                found[".".join(parts)] = os.path.join(directory, name)
    return found


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def graph(root: str = ROOT) -> dict[str, set[str]]:
    """Module -> the atlas-rl modules it imports (anywhere in its code)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for target in targets:
                found = resolve(target)
                if found and found != module:
                    edges[module].add(found)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    edges = graph()
    if args.edges:
        for module in sorted(edges):
            for target in sorted(edges[module]):
                print(f"{module} -> {target}")
    found = circles(edges)
    for group in found:
        print(f"circle of {len(group)}:")
        for module in group:
            inside = sorted(t for t in edges[module] if t in group)
            print(f"  {module} -> {', '.join(inside)}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, "
          f"{len(found)} circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
