"""The import graph of ``rewriter``: no cycles, and dependencies pointing one way.

Built with grimp, which reads every import statement of every module, those inside
functions included (a lazy import is still an edge); imports under ``TYPE_CHECKING`` are
left out (they never run). ``importlib.import_module("name")`` is not an edge: the
registries find the built-in passes that way, by name, so that the passes can import
the registries (see ARCHITECTURE.md).

The layers: the core (``rewriter.*`` outside ``rewriter.passes`` and
``rewriter.backends``) imports neither a pass nor a backend, except ``rewriter.job``,
which compiles with ``--target`` through a lazy import of the backend; the passes import
the core only.
"""

from __future__ import annotations

import grimp
import networkx as nx
import pytest

PASSES = "rewriter.passes"
BACKENDS = "rewriter.backends"
# Core modules allowed to import outside the core, and why.
CORE_EXCEPTIONS = {
    # --target: compiles the rewritten model (a lazy import of the TVM backend).
    "rewriter.job": (BACKENDS,),
}


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    imports = grimp.build_graph(
        "rewriter", include_external_packages=False, exclude_type_checking_imports=True
    )
    edges = nx.DiGraph()
    for module in imports.modules:
        edges.add_node(module)
        for imported in imports.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    return edges


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _cycles(graph: nx.DiGraph) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module."""
    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            found.append(nx.find_cycle(graph.subgraph(component)))
    return [[edge[0] for edge in cycle] for cycle in found]


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join([*cycle, cycle[0]]) for cycle in cycles)


def test_the_graph_sees_every_package(graph: nx.DiGraph) -> None:
    # The symlinks rewriter/passes and rewriter/backends are followed.
    assert {"rewriter.registry", "rewriter.fx.registry", f"{PASSES}.two_pass_softmax.onnx"} <= set(graph)
    assert any(_inside(module, BACKENDS) for module in graph)


def test_no_import_cycles_outside_the_backends(graph: nx.DiGraph) -> None:
    cycles = [c for c in _cycles(graph) if not any(_inside(m, BACKENDS) for m in c)]
    assert not cycles, "import cycles:\n" + _describe(cycles)


def test_no_import_cycles_at_all(graph: nx.DiGraph) -> None:
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + _describe(cycles)


def test_the_core_imports_no_pass_and_no_backend(graph: nx.DiGraph) -> None:
    wrong = []
    for module, imported in graph.edges:
        if _inside(module, PASSES) or _inside(module, BACKENDS):
            continue
        allowed = CORE_EXCEPTIONS.get(module, ())
        for outside in (PASSES, BACKENDS):
            if _inside(imported, outside) and outside not in allowed:
                wrong.append(f"{module} -> {imported}")
    assert not wrong, "the core imports a pass or a backend:\n" + "\n".join(sorted(wrong))


def test_the_passes_import_no_backend(graph: nx.DiGraph) -> None:
    wrong = [
        f"{module} -> {imported}"
        for module, imported in graph.edges
        if _inside(module, PASSES) and _inside(imported, BACKENDS)
    ]
    assert not wrong, "a pass imports a backend:\n" + "\n".join(sorted(wrong))


def test_no_pass_module_imports_an_fx_twin(graph: nx.DiGraph) -> None:
    """An fx module (``rewriter.passes.<name>.fx``) is imported by nothing in the passes.

    ``import rewriter.fx`` loads every fx module (so that ``torch.ops.rewriter.*`` exist),
    and an fx module importing ``rewriter.fx`` first may start that loading: an fx module
    that another fx module imports could then be read half-initialized. What fx modules
    share lives in modules that do not import the fx front (``attention.fx_match``,
    ``pruning.prune_torch``, ...).
    """
    wrong = [
        f"{module} -> {imported}"
        for module, imported in graph.edges
        if _inside(module, PASSES) and imported.startswith(PASSES + ".") and imported.endswith(".fx")
    ]
    assert not wrong, "\n".join(sorted(wrong))
