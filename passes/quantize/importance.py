"""Measuring LIM importance in ONNX Runtime: the model run with its layers' ends as outputs.

:func:`fetch` runs the model on each calibration batch with extra graph outputs and
returns their values. :func:`lim_scores` turns one batch's values into each unit's LIM
score (Dumitru et al. 2024: minus the cosine between a unit's input and output hidden
states, :func:`rewriter.passes.quantize.math.lim_importance`); a unit's importance is the
mean of its per-batch scores. Batches are independent, so with a Ray pool
(:mod:`rewriter.distributed`) each worker builds the session once
(:class:`LimWorker`) and scores the batches it is given: the same numbers as in one
process.

>>> values = fetch(model, ["a", "b"], batches)  # doctest: +SKIP
>>> lim_scores(values, {"block0": ("a", "b")}, batches, index=0)  # doctest: +SKIP
{'block0': -0.93}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from rewriter import distributed, io, verify
from rewriter.passes.quantize import math as qm


def fetch_proto(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` as a proto with the values ``names`` added as graph outputs."""
    proto = ir.serde.serialize_model(model)
    inputs = {value.name for value in proto.graph.input}
    present = {value.name for value in proto.graph.output}
    dtypes = {value.name: value.dtype for value in _values(model)}
    for name in names:
        if name not in present and name not in inputs:
            dtype = dtypes.get(name)
            elem = int(dtype) if dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return proto


class Fetcher:
    """An ONNX Runtime session of :func:`fetch_proto`'s proto: ``fetcher(batch)`` gives the
    values of ``names`` on ``batch`` (graph inputs among them come from the batch).
    ``data_dir``: the folder of the proto's external data (:func:`rewriter.io.external_data_dir`)."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        names: Sequence[str],
        *,
        threads: int | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.names = list(names)
        self.inputs = {value.name for value in proto.graph.input}
        self.session = verify.session(proto.SerializeToString(), threads=threads, data_dir=data_dir)
        self.feeds = [value.name for value in self.session.get_inputs()]
        self.outputs = [name for name in self.names if name not in self.inputs]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Nothing to run when every name is a graph input (ORT reads [] as all outputs).
        feeds = {name: batch[name] for name in self.feeds}
        values = verify.run_session(self.session, self.outputs, feeds) if self.outputs else []
        results = dict(zip(self.outputs, values, strict=True))
        return {name: np.asarray(batch[name] if name in self.inputs else results[name]) for name in self.names}


def fetch(
    model: ir.Model, names: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, list[np.ndarray]]:
    """Run the model on each batch with ``names`` as extra outputs; their values per batch."""
    fetcher = Fetcher(fetch_proto(model, names), names, data_dir=data_dir(model))
    fetched: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        for name, value in fetcher(batch).items():
            fetched[name].append(value)
    return fetched


def lim_scores(
    values: Mapping[str, Sequence[np.ndarray]],
    ends: Mapping[str, tuple[str, str]],
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    index: int,
) -> dict[str, float | None]:
    """Each unit's LIM score on batch ``index`` (None where its input and output shapes differ).

    ``ends``: each unit's input and output value names; ``values``: :func:`fetch`'s.
    """
    mask = verify.find_attention_mask(dict(batches[index]))
    scores: dict[str, float | None] = {}
    for unit, (entry, exit_) in ends.items():
        a, b = values[entry][index], values[exit_][index]
        scores[unit] = qm.lim_importance(a, b, mask) if a.shape == b.shape else None
    return scores


class LimWorker:
    """Scores calibration batches for :func:`rewriter.distributed.map_tasks` (a Ray worker).

    Built once per worker from :func:`fetch_proto`'s proto (serialized), with a
    one-thread session; ``worker(batch)`` is :func:`lim_scores` of that batch.
    ``data_dir``: the folder of the model's external data, which every worker must see.
    """

    def __init__(self, proto: bytes, ends: Mapping[str, tuple[str, str]], data_dir: str | None = None) -> None:
        self.ends = dict(ends)
        names = sorted({name for pair in self.ends.values() for name in pair if name})
        self.fetcher = Fetcher(
            onnx.ModelProto.FromString(proto), names, threads=distributed.WORKER_THREADS, data_dir=data_dir
        )

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, float | None]:
        values = {name: [value] for name, value in self.fetcher(batch).items()}
        return lim_scores(values, self.ends, [batch], index=0)


def data_dir(model: ir.Model) -> str | None:
    """The folder of ``model``'s external data as a string (None without), for the sessions."""
    folder = io.external_data_dir(model)
    return None if folder is None else str(folder)


def _values(model: ir.Model) -> list[ir.Value]:
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    values += [output for node in model.graph for output in node.outputs]
    return values
