"""Measuring distortion curves in ONNX Runtime: the model run with one weight swapped.

The weights being measured become graph inputs, so swapping one is a change of feeds,
never a rebuilt session. So do the other large initializers (an LM head, an embedding:
:func:`shared_constants`), so that the sessions below share one copy of them instead of
each holding its own (at 1B parameters, 16 copies of a 262 MB LM head). Pruning a layer
changes nothing upstream of its first use, so the probe also builds suffix sessions: the
graph from a cut just before a layer's first use to the outputs, fed with the values
that cross the cut, captured once from the dense model. A layer deep in the network then
costs only the part of the model after it (about half the model on average for a
transformer). Models with control-flow subgraphs, or where types of the crossing values
are unknown, use the full session.

>>> probe = DistortionProbe(model, {"w": w}, [feeds])  # doctest: +SKIP
>>> probe.curve("w", np.array([0.0, 0.5]))  # doctest: +SKIP
array([0.   , 0.013])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from rewriter import distributed, io, verify
from rewriter.errors import InputError
from rewriter.passes.pruning import math as pruning

logger = logging.getLogger(__name__)

FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")
# Suffix sessions at most: each costs a session build; beyond this, layers share cuts.
MAX_SUFFIXES = 16
# Suffix sessions are built (suffixes=None) only when one dense run costs at least this
# many multiply-adds (~20-50 ms on one core; building a session costs ~20-100 ms).
# Estimated from the weights and the batch, not timed: suffix sessions change the last
# bits of the curves (ONNX Runtime fuses differently across a cut), so the choice must
# be the same in every run, on a loaded machine or not, and on every Ray worker.
MIN_MACS_FOR_SUFFIXES = 5e8
# Initializers (not measured) from this size on are fed to the sessions, not held by each.
SHARED_BYTES = 1 << 20


class DistortionProbe:
    """Runs the model with any one weight replaced and measures the output distortion.

    ``distortion``: ``mse`` or ``pooled`` (see :func:`rewriter.passes.pruning.math.distortion_features`);
    ``outputs``: the graph outputs measured (default: every float output);
    ``suffixes``: build suffix sessions (default: when a dense run costs at least
    :data:`MIN_MACS_FOR_SUFFIXES` multiply-adds, :func:`wants_suffixes`);
    ``data_dir``: the folder of the model's external data (default for an onnx-ir model:
    its own, :func:`rewriter.io.external_data_dir`; a proto's is given here);
    ``constants``: the large initializers fed as inputs (default for an onnx-ir model:
    :func:`shared_constants`; a proto's, graph inputs already, are given here).
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        weights: Mapping[str, np.ndarray],
        batches: Sequence[dict[str, np.ndarray]],
        *,
        distortion: str = "mse",
        outputs: Sequence[str] = (),
        suffixes: bool | None = None,
        threads: int | None = None,
        data_dir: str | None = None,
        constants: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if not batches:
            raise InputError("prune: no calibration batches to measure the distortion on")
        self.weights = dict(weights)
        self.threads = threads
        # A proto is the probe model already (weights as inputs: with_weights_as_inputs).
        if isinstance(model, onnx.ModelProto):
            proto = model
        else:
            constants = shared_constants(model, self.weights) if constants is None else constants
            proto = with_weights_as_inputs(model, [*self.weights, *constants])
            folder = io.external_data_dir(model)
            data_dir = data_dir or (None if folder is None else str(folder))
        self.data_dir = data_dir
        self.session = self._session(proto)
        float_outputs = [o.name for o in self.session.get_outputs() if o.type in FLOAT_TYPES]
        unknown = sorted(set(outputs) - set(float_outputs))
        if unknown:
            raise InputError(
                f"prune: outputs {unknown} are not float outputs of the model ({float_outputs})"
            )
        self.outputs = list(outputs) or float_outputs
        self.distortion = distortion
        fixed = any(
            isinstance(i.shape[0], int)
            for i in self.session.get_inputs()
            if i.name in batches[0] and i.shape
        )
        self.batches = (
            [dict(batch) for batch in batches]
            if fixed
            else concatenated([dict(b) for b in batches])
        )
        self.masks = [verify.find_attention_mask(batch) for batch in self.batches]
        self.feeds = {**(constants or {}), **self.weights}
        self.reference = [
            pruning.distortion_features(self._run(self.session, batch), mask, distortion)
            for batch, mask in zip(self.batches, self.masks, strict=True)
        ]
        if suffixes is None:
            suffixes = wants_suffixes(self.weights, self.batches[0])
        self.runner: dict[str, tuple[ort.InferenceSession, list[dict[str, np.ndarray]]]] = {}
        if suffixes:
            start = time.perf_counter()
            self._build_suffixes(proto)
            logger.info(
                "prune: %d suffix sessions in %.1f s",
                len({id(s) for s, _ in self.runner.values()}),
                time.perf_counter() - start,
            )

    def _session(self, proto: onnx.ModelProto) -> ort.InferenceSession:
        return verify.session(proto.SerializeToString(), threads=self.threads, data_dir=self.data_dir)

    def _run(
        self,
        session: ort.InferenceSession,
        batch: dict[str, np.ndarray],
        extra: dict[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        available = {**batch, **self.feeds, **(extra or {})}
        feeds = {i.name: available[i.name] for i in session.get_inputs()}
        return verify.run_session(session, self.outputs, feeds)

    def _run_all(
        self, session: ort.InferenceSession, names: list[str], batch: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        available = {**batch, **self.feeds}
        return verify.run_session(session, names, {i.name: available[i.name] for i in session.get_inputs()})

    def distortion_of(self, name: str, weight: np.ndarray) -> float:
        """Output distortion with the weight ``name`` replaced by ``weight``."""
        session, captured = self.runner.get(name, (self.session, [{} for _ in self.batches]))
        self.feeds[name] = weight
        try:
            total = 0.0
            for batch, mask, reference, extra in zip(
                self.batches, self.masks, self.reference, captured, strict=True
            ):
                features = pruning.distortion_features(
                    self._run(session, batch, extra), mask, self.distortion
                )
                total += pruning.relative_error(reference, features)
            return total / len(self.batches)
        finally:
            self.feeds[name] = self.weights[name]

    def curve(self, name: str, amounts: np.ndarray) -> np.ndarray:
        """Distortions of the weight ``name`` pruned by each amount (incrementally, in magnitude order)."""
        weight = self.weights[name]
        order = pruning.magnitude_order(weight)
        pruned = np.array(weight, copy=True)
        flat = pruned.reshape(-1)
        done = 0
        values = np.zeros(len(amounts))
        for j, amount in enumerate(amounts):
            count = pruning.pruned_count(weight.size, float(amount))
            flat[order[done:count]] = 0
            done = max(done, count)
            values[j] = 0.0 if count == 0 else self.distortion_of(name, pruned)
        return values

    def _build_suffixes(self, proto: onnx.ModelProto) -> None:
        nodes = list(proto.graph.node)
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for n in nodes
            for a in n.attribute
        ):
            logger.info("prune: control-flow subgraphs, no suffix sessions")
            return
        produced = {name: index for index, node in enumerate(nodes) for name in node.output}
        first_use = {}
        for name in self.weights:
            uses = [index for index, node in enumerate(nodes) if name in node.input]
            if uses:
                first_use[name] = min(uses)
        earliest_output = min(produced.get(name, 0) for name in self.outputs)
        cuts = sorted({cut for cut in first_use.values() if 0 < cut <= earliest_output})
        if len(cuts) > MAX_SUFFIXES:
            cuts = [
                cuts[round(i * (len(cuts) - 1) / (MAX_SUFFIXES - 1))] for i in range(MAX_SUFFIXES)
            ]
        if not cuts:
            return
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # the checker's own error types; inference is an optimization here
            logger.info("prune: shape inference failed, no suffix sessions")
            return
        types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.output)}
        plans = []
        for cut in cuts:
            used = {name for node in nodes[cut:] for name in node.input if name} | set(self.outputs)
            crossing = sorted(name for name in used if produced.get(name, cut) < cut)
            if all(name in types and types[name].tensor_type.elem_type for name in crossing):
                plans.append((cut, used, crossing))
        if not plans:
            return
        capture = onnx.ModelProto()
        capture.CopyFrom(proto)
        graph_outputs = {o.name for o in proto.graph.output}
        wanted = sorted({name for _, _, crossing in plans for name in crossing} - graph_outputs)
        capture.graph.output.extend(_value_info(name, types[name]) for name in wanted)
        capture_session = self._session(capture)
        names = [o.name for o in capture_session.get_outputs()]
        values = [
            dict(zip(names, self._run_all(capture_session, names, batch), strict=True))
            for batch in self.batches
        ]
        sessions = {}
        for cut, used, crossing in plans:
            graph = onnx.helper.make_graph(
                nodes[cut:],
                f"{proto.graph.name}_from_{cut}",
                [i for i in proto.graph.input if i.name in used]
                + [_value_info(name, types[name]) for name in crossing],
                [o for o in proto.graph.output if o.name in self.outputs],
                [t for t in proto.graph.initializer if t.name in used],
            )
            suffix = onnx.helper.make_model(
                graph, opset_imports=proto.opset_import, ir_version=proto.ir_version
            )
            suffix.functions.extend(proto.functions)
            sessions[cut] = (
                self._session(suffix),
                [{name: captured[name] for name in crossing} for captured in values],
            )
        planned = sorted(sessions)
        for name, use in first_use.items():
            usable = [cut for cut in planned if cut <= use]
            if usable:
                self.runner[name] = sessions[usable[-1]]


def wants_suffixes(weights: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> bool:
    """Whether a dense run costs at least :data:`MIN_MACS_FOR_SUFFIXES` multiply-adds: the
    weights' size times the rows of the batch (token ids, or float rows of features)."""
    rows = max(
        (a.size // a.shape[-1] if a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] else a.size)
        for a in map(np.asarray, batch.values())
    )
    return sum(int(np.size(w)) for w in weights.values()) * rows >= MIN_MACS_FOR_SUFFIXES


class CurveWorker:
    """Measures distortion curves for :func:`rewriter.distributed.map_tasks` (a Ray worker).

    Built once per worker from the probe model (``proto``: serialized, weights as
    inputs) with one-thread sessions; then ``worker(name)`` is the curve of weight
    ``name`` over ``amounts``, as :meth:`DistortionProbe.curve` gives it serially.
    ``data_dir``: the folder of the model's external data, which every worker must see;
    ``constants``: :func:`shared_constants` (graph inputs of ``proto``).
    """

    def __init__(
        self,
        proto: bytes,
        weights: Mapping[str, np.ndarray],
        batches: Sequence[dict[str, np.ndarray]],
        amounts: np.ndarray,
        distortion: str,
        outputs: Sequence[str],
        data_dir: str | None = None,
        constants: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.amounts = amounts
        self.probe = DistortionProbe(
            onnx.ModelProto.FromString(proto),
            weights,
            batches,
            distortion=distortion,
            outputs=outputs,
            threads=distributed.WORKER_THREADS,
            data_dir=data_dir,
            constants=constants or {},
        )

    def __call__(self, name: str) -> np.ndarray:
        return self.probe.curve(name, self.amounts)


def _value_info(name: str, type_proto: onnx.TypeProto) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto()
    info.name = name
    info.type.CopyFrom(type_proto)
    return info


def concatenated(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The batches as one along axis 0 when their shapes allow it (one run per evaluation)."""
    if len(batches) < 2:
        return batches
    first = batches[0]
    if any(
        batch.keys() != first.keys()
        or any(
            np.ndim(batch[k]) == 0 or np.shape(batch[k])[1:] != np.shape(first[k])[1:]
            for k in first
        )
        for batch in batches
    ):
        return batches
    return [{name: np.concatenate([batch[name] for batch in batches]) for name in first}]


def shared_constants(model: ir.Model, measured: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The initializers of at least :data:`SHARED_BYTES` other than the ``measured`` weights,
    as arrays (memory-mapped for external data): the probe feeds them to its sessions."""
    return {
        name: value.const_value.numpy()
        for name, value in model.graph.initializers.items()
        if name not in measured and value.const_value is not None and value.const_value.nbytes >= SHARED_BYTES
    }


def with_weights_as_inputs(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """The model as a proto where the initializers ``names`` are graph inputs instead (one
    that is a graph input already, a weight the user may override, keeps its declaration)."""
    proto = ir.serde.serialize_model(model)
    wanted = set(names)
    declared = {value.name for value in proto.graph.input}
    kept = []
    for tensor in proto.graph.initializer:
        if tensor.name in wanted and tensor.name not in declared:
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
        elif tensor.name not in wanted:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto
