"""The same model compiled twice is the same library (:mod:`rewriter.backends.tvm.relax_passes.shape_funcs`,
and the TE functions of :mod:`~rewriter.backends.tvm.relax_passes.reshape_views` and
:mod:`~rewriter.backends.tvm.relax_passes.conv_frames` in their placeholders' variables).

Two sources made builds differ: TVM orders a TE function's free variables from a set
(two of one name, ours and the placeholder's, came out in either order), and
``VMShapeLower`` emits its shape functions' stores in the order of a map whose variables
hash by address. The first is checked where it arises (``test_reshape_views``,
``test_conv_frames``: no PrimFunc with two variables of one name); here the stores, and a
symbolic model with many shape computations exported twice, byte for byte.
"""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from tvm import tirx  # noqa: E402

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm.relax_passes import shape_funcs  # noqa: E402
from tests.backends.tvm.test_conv_frames import _two_convs  # noqa: E402


def _stores(*pairs: tuple[int, object]) -> object:
    return tirx.SeqStmt([tirx.BufferStore(HEAP, value, [tirx.IntImm("int64", slot)]) for slot, value in pairs])


HEAP = tirx.decl_buffer((8,), "int64", "H")


def _slot(index: int) -> object:
    return tirx.BufferLoad(HEAP, [tirx.IntImm("int64", index)])


def test_stores_that_read_only_defined_slots_are_sorted_by_slot():
    body = _stores((5, _slot(0) * 4), (2, _slot(1) + 1), (7, _slot(0) * _slot(1)))
    ordered = shape_funcs.ordered_stores(body)
    assert ordered is not None
    assert [int(store.indices[0]) for store in ordered.seq] == [2, 5, 7]
    assert [str(store.value) for store in ordered.seq] == [str(body.seq[i].value) for i in (1, 0, 2)]


def test_a_store_that_reads_a_written_slot_keeps_the_order():
    # H[2] reads H[5], which the first store writes: sorting would read it before.
    assert shape_funcs.ordered_stores(_stores((5, _slot(0) * 4), (2, _slot(5) + 1))) is None
    # A slot written twice, or anything but a sequence of stores, is left alone too.
    assert shape_funcs.ordered_stores(_stores((3, _slot(0)), (3, _slot(1)))) is None
    assert shape_funcs.ordered_stores(tirx.Evaluate(tirx.IntImm("int64", 0))) is None


def test_a_symbolic_model_compiles_to_the_same_library_twice(tmp_path):
    # Two convolutions over any number of samples: padded copies, slices and a dozen
    # symbolic sizes in the shape functions (the stores came in another order most builds).
    model = _two_convs([0, 5])
    paths = [tmp_path / f"build{n}.so" for n in range(2)]
    for path in paths:
        backend.compile(model, "avx512").export(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
