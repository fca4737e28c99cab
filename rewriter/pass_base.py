"""The base every rewrite pass shares.

A pass is an onnx-ir in-place pass: ``call(model) -> RewriteResult``, where the
result adds ``stats`` (counts of what the pass did, e.g. ``{"softmax_replaced": 6}``)
and ``notes`` (why candidates were left alone) to onnx-ir's ``PassResult``.
``requires`` and ``ensures`` are run around ``call`` by onnx-ir's ``PassBase``.

Each pass declares whether it is exact (the rewritten model computes the same
function up to rounding: verification enforces a tolerance) or approximate (the
function changes: verification reports fidelity) and its options as a dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from rewriter.errors import InputError

if TYPE_CHECKING:
    from rewriter import distributed

# The ONNX domain of the operators our passes introduce.
DOMAIN = "ai.rewriter"
DOMAIN_VERSION = 1
# Model-local functions exist since IR version 8.
FUNCTIONS_IR_VERSION = 8


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    """A ``PassResult`` with the statistics of what the pass did and why it skipped."""

    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Per-item tables for the report, e.g. {"layers": [{"layer": ..., "bits": 4}, ...]}.
    tables: dict[str, list[dict[str, object]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may need beyond the model, given by the pipeline's caller.

    ``calibration`` holds batches of model inputs (from ``--calibration FILE``);
    passes that measure the model (importance, distortion) use them, or one batch
    generated from the model's input types (``dims``, ``seed``, as verification does)
    when none were given.

    ``workers`` and ``ray_address`` spread the measuring passes' independent
    evaluations (prune's distortion curves, quantize's LIM importance per calibration
    batch) over Ray workers (:mod:`rewriter.distributed`, the ``distributed`` extra):
    ``workers`` actors on a local Ray, or on the cluster at ``ray_address``. The results
    are bit-identical to the serial run, which is what runs when neither is set.

    >>> context = PassContext(workers=2)  # doctest: +SKIP
    >>> run_pipeline(model, parse_pipeline("prune"), context=context)  # doctest: +SKIP
    """

    calibration: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0
    source: Path | None = None
    workers: int | None = None
    ray_address: str | None = None
    _pool: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def pool(self) -> distributed.Pool | None:
        """The Ray pool of this run (started on first use), or None: evaluate serially."""
        if self.workers is None and self.ray_address is None:
            return None
        if self._pool is None:
            from rewriter import distributed

            self._pool = distributed.Pool(self.workers, self.ray_address)
        return self._pool

    def close(self) -> None:
        """Shut down the Ray this context started (:func:`rewriter.manager.run_pipeline` does)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def calibration_inputs(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        """The calibration batches, or one generated batch when none were given."""
        from rewriter import verify

        if self.calibration:
            return self.calibration
        origin = self.source if self.source is not None else ir.serde.serialize_model(model)
        return [verify.make_inputs(origin, dims=self.dims, seed=self.seed)]


@dataclasses.dataclass
class NoOptions:
    """Options of a pass that takes none."""


class RewritePass(ir.passes.InPlacePass):
    """Base class of the tool's passes.

    Subclasses set ``name`` (the registry name), ``exact``, ``description`` (one
    line) and ``Options`` (a dataclass whose fields have defaults), and implement
    ``call``.

    >>> from rewriter.registry import create_pass
    >>> result = create_pass("two-pass-softmax")(model)  # doctest: +SKIP
    >>> result.stats  # doctest: +SKIP
    {'softmax_replaced': 6, 'log_softmax_replaced': 0, 'skipped': 0}
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    description: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # The default-domain opset the pass's function bodies and rules need.
    min_opset: ClassVar[int] = 1

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.context = PassContext()

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> RewritePass:
        """Build the pass from ``key=value`` strings, converting each to its field's type."""
        return cls(parse_options(cls.Options, values, pass_name=cls.name))

    def applies_to(self, model: ir.Model) -> bool:
        """Whether ``model`` has candidates for this pass (``requires`` checks only then)."""
        del model
        return True

    def requires(self, model: ir.Model) -> None:
        """The model's opset must be at least ``min_opset`` when the pass has work in it."""
        opset = model.opset_imports.get("", 1)
        if opset < self.min_opset and self.applies_to(model):
            raise ir.passes.PreconditionError(
                f"{self.name} needs opset >= {self.min_opset}, the model has {opset}: "
                "upgrade it with onnx.version_converter.convert_version"
            )

    def ensures(self, model: ir.Model) -> None:
        """Every operator of our domain left in the model must have its function body."""
        for node in all_nodes(model):
            if node.domain == DOMAIN and node.op_identifier() not in model.functions:
                raise ir.passes.PostconditionError(
                    f"{self.name}: node {node.name!r} ({node.op_type}) has no function body"
                )


def add_function(model: ir.Model, proto: onnx.FunctionProto) -> None:
    """Give ``model`` the function body ``proto`` of one of our ops (once), our domain's
    import, and an IR version that has model-local functions."""
    key = (proto.domain, proto.name, "")
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(proto)
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    model.ir_version = max(model.ir_version or 0, FUNCTIONS_IR_VERSION)


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the model: the main graph, its subgraphs and the model-local functions."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes


def parse_options(options_type: type, values: dict[str, str], *, pass_name: str) -> Any:
    """Convert ``{"key": "text"}`` into an ``options_type`` instance, with typed fields."""
    fields = {field.name: field for field in dataclasses.fields(options_type)}
    hints = typing.get_type_hints(options_type)
    kwargs: dict[str, Any] = {}
    for key, text in values.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise InputError(f"pass '{pass_name}' has no option '{key}' (options: {known})")
        kwargs[key] = _convert(text, hints[key], pass_name=pass_name, key=key)
    return options_type(**kwargs)


def _convert(text: str, hint: Any, *, pass_name: str, key: str) -> Any:
    if not isinstance(text, str):  # already typed (from a TOML pipeline)
        return text
    kind = hint if isinstance(hint, type) else typing.get_origin(hint)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float, str):
            return kind(text)
        if kind in (list, tuple):
            return [item.strip() for item in text.split("|") if item.strip()]
        if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
            args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            if text.strip().lower() == "none":
                return None
            return _convert(text, args[0], pass_name=pass_name, key=key)
    except ValueError:
        pass
    else:
        return text
    raise InputError(f"pass '{pass_name}': option '{key}' expects {getattr(hint, '__name__', hint)}, got {text!r}")
