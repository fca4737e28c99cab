"""The one builder of the model-local ONNX functions our passes emit (``ai.rewriter`` ops).

A body is written in standard ops of the *caller's* opset, so that the rewritten model
runs as it is in ONNX Runtime, ``onnx.reference`` and the checker. The builder keeps the
rules that depend on that opset in one place:

* ``ReduceSum`` takes its axes as an input from opset 13, the other reductions from 18
  (:meth:`FunctionBody.reduce`);
* a float constant is a scalar ``Constant`` of the given type, cast like a value of the
  caller with ``CastLike`` (opset 15) when asked (:meth:`FunctionBody.const`);
* a function attribute is read through a reference (``ref_attr_name``), either as a
  ``Constant`` (:meth:`FunctionBody.attribute`) or as an attribute of a node
  (:meth:`FunctionBody.ref`), so one function serves every attribute value.

Why not onnxscript's ``@script``: a script function is bound to one opset when it is
defined, while a body here follows the opset of each model it is added to (the
reductions change signature at 13 and 18), and attributes a caller leaves unset must stay
unset in the body (``ignore_index`` of the cross-entropy bodies).

>>> body = FunctionBody(18)
>>> y = body.node("Relu", ["X"], "Y")
>>> body.function("Relu2", ["X"], ["Y"]).name
'Relu2'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import onnx
from onnx import AttributeProto, TensorProto, helper

from rewriter.pass_base import DOMAIN


@dataclasses.dataclass(frozen=True)
class Ref:
    """A node attribute that takes the value of the calling node's attribute ``name``.

    ``kind`` is the attribute type's name in ``onnx.AttributeProto`` (``"INT"``,
    ``"FLOAT"``, ``"STRING"``, ...).
    """

    name: str
    kind: str


class FunctionBody:
    """The node list of a model-local function at ``opset``, then the FunctionProto.

    >>> body = FunctionBody(17)
    >>> body.reduce("ReduceSum", "X", [-1], "Y")
    'Y'
    >>> [node.op_type for node in body.nodes]
    ['Constant', 'ReduceSum']
    """

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op: str, inputs: Sequence[str], output: str, **attributes: Any) -> str:
        """Append ``output = op(*inputs)``; an attribute given as :class:`Ref` is a reference."""
        plain = {key: value for key, value in attributes.items() if not isinstance(value, Ref)}
        node = helper.make_node(op, list(inputs), [output], **plain)
        for key, value in attributes.items():
            if isinstance(value, Ref):
                node.attribute.append(self._reference(key, value))
        self.nodes.append(node)
        return output

    def const(
        self,
        name: str,
        value: float | list[int],
        like: str | None = None,
        *,
        dtype: int = TensorProto.FLOAT,
    ) -> str:
        """A scalar of ``dtype`` (cast like ``like`` when given), or an int64 vector.

        With ``like`` the constant itself is named ``NAME_f32`` and the cast ``NAME``.
        """
        if isinstance(value, list):
            tensor = helper.make_tensor(name, TensorProto.INT64, [len(value)], value)
            return self.node("Constant", [], name, value=tensor)
        tensor = helper.make_tensor(name, dtype, [], [value])
        out = self.node("Constant", [], name + "_f32" if like else name, value=tensor)
        return self.node("CastLike", [out, like], name) if like else out

    def attribute(self, name: str, kind: str) -> str:
        """A Constant holding the function's attribute ``name`` (``"float"`` or ``"int"``)."""
        attribute_type = "FLOAT" if kind == "float" else "INT"
        return self.node("Constant", [], f"attr_{name}", **{f"value_{kind}": Ref(name, attribute_type)})

    def reduce(self, op: str, x: str, axes: list[int], output: str) -> str:
        """``op`` (ReduceSum/ReduceMax) over ``axes``, keepdims; axes is an input from 13/18."""
        if (op == "ReduceSum" and self.opset >= 13) or self.opset >= 18:
            return self.node(op, [x, self.const(output + "_axes", axes)], output, keepdims=1)
        return self.node(op, [x], output, axes=axes, keepdims=1)

    def function(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        *,
        attributes: Sequence[str] = (),
        doc: str = "",
    ) -> onnx.FunctionProto:
        """The ``ai.rewriter::<op_type>`` function of the nodes built so far, at ``opset``."""
        return helper.make_function(
            DOMAIN,
            op_type,
            list(inputs),
            list(outputs),
            self.nodes,
            [helper.make_opsetid("", self.opset)],
            attributes=list(attributes),
            doc_string=doc or None,
        )

    @staticmethod
    def _reference(key: str, ref: Ref) -> AttributeProto:
        kind = AttributeProto.AttributeType.Value(ref.kind)
        return helper.make_attribute_ref(key, kind, ref_attr_name=ref.name)
