"""The rooms read top-down: no import circle among atlas-rl's modules (every import
counts, the deferred ones inside functions too; scripts/import_graph.py)."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_graph():
    spec = importlib.util.spec_from_file_location(
        "import_graph", os.path.join(ROOT, "scripts", "import_graph.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circle_in_atlas_rl():
    graph = _import_graph()
    edges = graph.graph()
    assert "atlas_rl.backends.vllm.hooks" in edges and "atlas_rl.kernels.rejection" in edges \
        and "atlas_rl.integrations.trl.server" in edges, "the package's folders were not all read"
    assert graph.circles(edges) == [], "an import circle: python scripts/import_graph.py says where"
    # the seams sit below what they serve: the vLLM table imports none of its rooms
    assert not {e for e in edges["atlas_rl.backends.vllm.hooks"] if e.startswith("atlas_rl.backends")}


def test_the_checker_finds_a_circle_deferred_imports_included(tmp_path):
    graph = _import_graph()
    package = tmp_path / "atlas_rl"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from atlas_rl import b\n")
    (package / "b.py").write_text("def f():\n    from atlas_rl.c import g\n")
    (package / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import atlas_rl.b\n"
                                  "def g():\n    from atlas_rl.a import x\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\n"
                                  "if TYPE_CHECKING:\n    from atlas_rl import a\n")
    edges = graph.graph(str(tmp_path))
    assert edges["atlas_rl.d"] == set()  # type-checking imports do not count
    assert graph.circles(edges) == [["atlas_rl.a", "atlas_rl.b", "atlas_rl.c"]]
