"""Verification: run the original and the rewritten model on the same inputs and compare.

Inputs come from an ``.npz`` file or are generated from the model's input types:

* symbolic dimensions take the value given by ``dims`` (``--dim name=value``), else a
  default by name: :data:`DEFAULT_DIMS` (``batch`` -> 2, ``seq``/``sequence``/``len``
  -> 16), else :data:`DEFAULT_DIM` (8);
* float inputs are standard normal;
* integer inputs that index a table (they reach a ``Gather`` whose data is an
  initializer, e.g. token ids) are uniform in ``[0, rows)``; integer or bool inputs
  whose name contains ``mask`` are all ones/True; other integers are uniform in
  ``[0, DEFAULT_INT_HIGH)``.

Generated inputs are bounded: at most :data:`MAX_GENERATED_ELEMENTS` elements per
input and :data:`MAX_GENERATED_BYTES` in all (a ``--dim`` typo must not try to
allocate terabytes).

Each output is compared with :func:`compare`; :data:`DEFAULT_TOLERANCE` states the
tolerance of exact passes, applied per row along the last axis (:class:`Tolerance`), by
the least precise float type the output is computed in (:func:`output_tolerances`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from rewriter import input_sizes, paths, precision
from rewriter.errors import InputError, first_line, shorten

logger = logging.getLogger(__name__)

DEFAULT_DIMS = {"batch": 2, "seq": 16, "sequence": 16, "len": 16, "length": 16}
DEFAULT_DIM = 8
DEFAULT_INT_HIGH = 2
# Bounds of generated inputs: 2**31 elements is past any real batch of token ids or
# images and still indexable with int32 by every runtime; 4 GiB in all keeps two
# models' activations on top of them within a workstation's memory.
MAX_GENERATED_ELEMENTS = 2**31
MAX_GENERATED_BYTES = 4 << 30
# ONNX Runtime's session option: the folder of external data for a model given as bytes.
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """An output passes when each row along its last axis has
    ``max|candidate - reference| <= atol + rtol * max|reference row|``.

    Relative to the row's scale, not elementwise: elementwise relative errors are
    meaningless next to zeros, and softmax outputs have many near-zero entries. Per
    row, not over the whole output: one huge element (a float16 -65504 mask value in
    a row of log-probabilities) must not widen the tolerance of every other row.
    """

    rtol: float
    atol: float

    def allows(self, max_abs_err: float, scale: float) -> bool:
        return max_abs_err <= self.atol + self.rtol * scale


# Exact rewrites only reorder float operations. In float32 a reordered reduction
# differs by a few ulp (1.2e-7 each) per layer; 1e-5 of the output scale leaves room
# for ~10 layers of that and still catches any real change. float16 has an ulp of
# 9.8e-4 and its models accumulate in float16 between ops, hence 4e-3.
DEFAULT_TOLERANCE = {
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float16": Tolerance(rtol=4e-3, atol=1e-4),
    "bfloat16": Tolerance(rtol=3e-2, atol=1e-3),
}


# A complex output is compared at the tolerance of its components' type.
COMPONENT_TYPES = {"complex64": "float32", "complex128": "float64"}


def default_tolerance(dtype: str) -> Tolerance:
    """The tolerance of exact passes for outputs of ``dtype`` (a complex type: its
    components'; a type the table lacks: float32's).

    >>> default_tolerance("complex64")
    Tolerance(rtol=1e-05, atol=1e-06)
    """
    return DEFAULT_TOLERANCE.get(COMPONENT_TYPES.get(dtype, dtype), DEFAULT_TOLERANCE["float32"])


def is_inexact(dtype: np.dtype) -> bool:
    """Whether outputs of ``dtype`` are compared within a tolerance (float and complex
    types, bfloat16 included) rather than bit for bit."""
    return np.issubdtype(dtype, np.inexact) or dtype.name == "bfloat16"


def output_tolerances(
    model: str | Path | onnx.ModelProto, table: Mapping[str, Tolerance] | None = None
) -> dict[str, Tolerance]:
    """Per float output of ``model``, its tolerance: the loosest in ``table`` (by float
    type name; default :data:`DEFAULT_TOLERANCE`, exact passes') over the float types the
    output is computed in, its own type included (:func:`rewriter.precision.computed_types`).
    An output is as precise as the least precise arithmetic behind it: a float32 softmax
    cast to a float64 output gets float32's tolerance, a float16 softmax inside float32
    graph inputs and outputs float16's.

    >>> output_tolerances("mixed_f16_inside.onnx")  # doctest: +SKIP
    {'y': Tolerance(rtol=0.004, atol=0.0001)}
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    chosen = DEFAULT_TOLERANCE if table is None else table
    tolerances = {}
    for name, types in precision.computed_types(proto).items():
        candidates = [chosen[dtype] for dtype in types if dtype in chosen]
        if candidates:
            tolerances[name] = max(candidates, key=lambda tolerance: (tolerance.rtol, tolerance.atol))
    return tolerances


@dataclasses.dataclass
class OutputComparison:
    """How one output of the rewritten model differs from the original's."""

    name: str
    shape: list[int]
    dtype: str
    max_abs_err: float
    max_rel_err: float
    cosine: float
    argmax_agreement: float | None
    nan_mismatch: int
    # The worst row along the last axis: max over rows of (row max abs err / row max
    # |reference|), the figure the per-row tolerance bounds.
    max_row_rel_err: float = 0.0
    # Over the positions an attention mask keeps (for [batch, seq, ...] outputs of a
    # model that takes one): the error there, and the cosine of the mean-pooled
    # vectors per sequence (mean and min over the batch). Padding carries no meaning.
    masked_max_abs_err: float | None = None
    pooled_cosine_mean: float | None = None
    pooled_cosine_min: float | None = None
    passed: bool | None = None
    # The tolerance it was checked against (check_tolerance), {"rtol": ..., "atol": ...}.
    tolerance: dict[str, float] | None = None
    # An output whose length is data-dependent (detections after NMS) and changed: the
    # rewritten model's shape; the figures above are over the leading rows both have.
    rewritten_shape: list[int] | None = None
    # Set when the original's output is constant on these inputs (all zero, say): then
    # any rewrite that keeps it constant agrees, and the comparison proves nothing.
    warning: str | None = None
    # Per row along the last axis: max abs error (inf where NaN or inf differ) and
    # max |reference| (finite entries); what check_tolerance tests. Not reported.
    row_errors: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    row_scales: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, object]:
        skip = ("row_errors", "row_scales")
        return {
            field.name: _json_float(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in skip
        }


def _json_float(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def compare(
    name: str, reference: np.ndarray, candidate: np.ndarray, *, mask: np.ndarray | None = None
) -> OutputComparison:
    """Compare one output: errors, cosine similarity, argmax agreement on the last axis.

    NaN and infinities count as equal where both outputs have the same value;
    ``max_rel_err`` is ``max_abs_err / max|reference|`` over the finite entries. Complex
    outputs are compared by the modulus of the complex difference (both parts count).
    Where they differ (NaN or inf in one output only) the error is infinite and the
    cosine NaN: the finite entries alone say nothing then.
    With ``mask`` ([batch, seq], nonzero = real token) and an output of shape
    [batch, seq, ...], the masked figures are filled in too. ``warning`` is set when the
    reference is constant (:func:`constant_warning`).

    >>> compare("y", np.array([1.0, 2.0]), np.array([1.0, 2.5])).max_abs_err
    0.5
    """
    if reference.shape != candidate.shape:
        if reference.ndim == 0 or reference.shape[1:] != candidate.shape[1:]:
            raise ValueError(f"output {name}: shape {candidate.shape} != original {reference.shape}")
        # A data-dependent length (the detections of an NMS) changed: compare the leading
        # rows both have, in order, and record the new shape (an exact rewrite fails).
        common = min(len(reference), len(candidate))
        comparison = compare(name, reference[:common], candidate[:common])
        comparison.shape, comparison.rewritten_shape = list(reference.shape), list(candidate.shape)
        return comparison
    wide = np.complex128 if np.iscomplexobj(reference) or np.iscomplexobj(candidate) else np.float64
    ref = np.asarray(reference, dtype=wide)
    cand = np.asarray(candidate, dtype=wide)
    same = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
    finite = np.isfinite(ref) & np.isfinite(cand)
    mismatch = int(np.count_nonzero(~same & ~finite))
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf where both are inf
        delta = np.abs(ref - cand)
    diff = np.where(finite, delta, 0.0)
    max_abs = float(diff.max()) if diff.size else 0.0
    if mismatch:
        max_abs = math.inf
    scale = float(np.abs(np.where(finite, ref, 0.0)).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    a, b = np.where(finite, ref, 0.0).ravel(), np.where(finite, cand, 0.0).ravel()
    largest = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    if largest > 0:  # scaled, so that values near the float64 maximum do not overflow
        a, b = a / largest, b / largest
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(np.vdot(a, b).real / norms) if norms > 0 else (1.0 if not a.any() and not b.any() else 0.0)
    if mismatch:
        cosine = math.nan
    rows = (1, ref.size) if ref.ndim == 0 else (-1, ref.shape[-1])
    row_errors = _row_max(np.where(finite, delta, np.where(same, 0.0, np.inf)), rows)
    row_scales = _row_max(np.abs(np.where(np.isfinite(ref), ref, 0.0)), rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        row_rel = np.where(row_errors == 0, 0.0, row_errors / row_scales)
    argmax = None
    if ref.ndim >= 2 and np.issubdtype(reference.dtype, np.floating) and ref.shape[-1] > 1 and ref.size:
        argmax = float(np.mean(np.argmax(np.nan_to_num(ref), -1) == np.argmax(np.nan_to_num(cand), -1)))
    comparison = OutputComparison(
        name=name,
        shape=list(reference.shape),
        dtype=str(reference.dtype),
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        cosine=cosine,
        argmax_agreement=argmax,
        nan_mismatch=mismatch,
        max_row_rel_err=float(row_rel.max()) if row_rel.size else 0.0,
        row_errors=row_errors,
        row_scales=row_scales,
        warning=constant_warning(name, reference),
    )
    if mask is not None and ref.ndim >= 3 and ref.shape[:2] == mask.shape:
        keep = np.asarray(mask) != 0
        masked = np.where(finite, delta, np.where(same, 0.0, np.inf))[keep]
        comparison.masked_max_abs_err = float(masked.max()) if masked.size else 0.0
        pooled = pooled_cosine(ref, cand, keep)
        comparison.pooled_cosine_mean = float(pooled.mean())
        comparison.pooled_cosine_min = float(pooled.min())
    return comparison


def constant_warning(name: str, reference: np.ndarray) -> str | None:
    """Why comparing output ``name`` proves nothing: every element of the original's
    output is zero, NaN, or one value. None for an output that varies, or of fewer than
    two elements (a scalar, a loss, is one value by nature).

    >>> constant_warning("logits", np.zeros((2, 10)))
    "output 'logits' of the original model is all zero on the verification inputs: the comparison proves nothing"
    """
    values = np.asarray(reference)
    if values.size < 2:
        return None
    flat = values.ravel()
    nan = np.isnan(flat) if values.dtype.kind in "fc" else np.zeros(flat.shape, dtype=bool)
    if nan.all():
        what = "all NaN"
    elif nan.any() or not np.all(flat == flat[0]):
        return None
    elif not np.any(flat):
        what = "all zero"
    else:
        what = f"constant ({flat[0].item()!r} everywhere)"
    return f"output {name!r} of the original model is {what} on the verification inputs: the comparison proves nothing"


def _row_max(values: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
    """Max of each row of ``values`` viewed as ``rows`` (no rows: an empty array)."""
    if values.size == 0:
        return np.zeros(0)
    return values.reshape(rows).max(axis=1)


def pooled_cosine(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per sequence: cosine of the mask-weighted mean over positions of two [batch, seq, ...] outputs.

    >>> pooled_cosine(np.ones((1, 2, 3)), np.ones((1, 2, 3)), np.array([[1, 0]])).tolist()
    [1.0]
    """
    weights = np.asarray(mask, dtype=np.float64).reshape(mask.shape + (1,) * (reference.ndim - 2))
    count = np.maximum(weights.sum(axis=1), 1.0)
    wide = np.complex128 if np.iscomplexobj(reference) else np.float64
    a = (np.asarray(reference, wide) * weights).sum(axis=1) / count
    b = (np.asarray(candidate, wide) * weights).sum(axis=1) / count
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (np.conj(a) * b).sum(axis=1).real
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)


def find_attention_mask(inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, seq] attention mask among a model's inputs, if it takes one."""
    for name, value in inputs.items():
        if "mask" in name.lower() and np.asarray(value).ndim == 2:
            return np.asarray(value)
    return None


def check_tolerance(
    comparison: OutputComparison, reference: np.ndarray, tolerance: Tolerance | None = None
) -> bool:
    """Mark ``comparison.passed`` against ``tolerance`` (default: by dtype,
    :func:`default_tolerance`) and return it.

    Each row along the last axis must pass on its own (see :class:`Tolerance`); a
    comparison made without the rows counts as one row, scaled by ``reference``.

    >>> c = compare("y", np.array([[1.0, 2.0], [9e4, 0.0]]), np.array([[1.0, 4.0], [9e4, 0.0]]))
    >>> check_tolerance(c, np.array([[1.0, 2.0], [9e4, 0.0]]), Tolerance(rtol=4e-3, atol=1e-4))
    False
    """
    tolerance = tolerance or default_tolerance(comparison.dtype)
    if comparison.row_errors is not None and comparison.row_scales is not None:
        allowed = tolerance.atol + tolerance.rtol * comparison.row_scales
        within = bool(np.all(comparison.row_errors <= allowed))
    else:
        magnitude = np.abs(np.asarray(reference, dtype=np.complex128 if np.iscomplexobj(reference) else np.float64))
        finite = magnitude[np.isfinite(magnitude)]
        scale = float(finite.max()) if finite.size else 0.0
        within = tolerance.allows(comparison.max_abs_err, scale)
    comparison.passed = comparison.nan_mismatch == 0 and within
    comparison.tolerance = {"rtol": tolerance.rtol, "atol": tolerance.atol}
    return comparison.passed


def session(
    model: str | Path | bytes,
    *,
    threads: int | None = None,
    data_dir: str | Path | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with warnings silenced (``threads``: its intra-op
    threads; default ONNX Runtime's, one per physical core).

    ``data_dir``: for a serialized ``model`` whose initializers are external-data
    references, the folder their locations are relative to
    (:func:`rewriter.io.external_data_dir`; ONNX Runtime would otherwise look in the
    working directory). A model ONNX Runtime rejects raises :class:`InputError`
    naming the reason. A path that is not UTF-8, which ONNX Runtime cannot take, is
    read here and given as bytes with its folder.

    >>> session(ir.serde.serialize_model(model).SerializeToString(), data_dir="big")  # doctest: +SKIP
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run raises with the message
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    where = "the model" if isinstance(model, bytes) else str(model)
    try:
        if isinstance(source, str) and not paths.is_utf8(source):  # ONNX Runtime takes UTF-8 paths only
            data_dir = Path(source).parent
            source = Path(source).read_bytes()
        with contextlib.ExitStack() as stack:
            if data_dir is not None and isinstance(source, bytes):
                folder = stack.enter_context(paths.utf8_folder(data_dir))
                options.add_session_config_entry(EXTERNAL_DATA_FOLDER, folder)
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot load {where}: {first_line(exc)}") from exc



def run(model: str | Path | bytes, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` in ONNX Runtime and return its outputs by name.

    bfloat16 inputs and outputs (``ml_dtypes.bfloat16`` arrays), which ONNX Runtime's
    numpy conversion lacks, pass as ``OrtValue`` s.
    """
    sess = session(model)
    names = [output.name for output in sess.get_outputs()]
    feeds = {i.name: inputs[i.name] for i in sess.get_inputs()}
    return dict(zip(names, run_session(sess, names, feeds), strict=True))


def run_session(
    sess: ort.InferenceSession, names: Sequence[str], feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """``sess.run(names, feeds)``, with bfloat16 feeds and results (``ml_dtypes``
    arrays), which ONNX Runtime's numpy conversion lacks, passed as ``OrtValue`` s."""
    typed = [np.asarray(value).dtype == ml_dtypes.bfloat16 for value in feeds.values()]
    kinds = {output.name: output.type for output in sess.get_outputs()}
    typed += [kinds.get(name) == "tensor(bfloat16)" for name in names]
    if not any(typed):
        return list(sess.run(list(names), dict(feeds)))
    # Every feed an OrtValue then: ONNX Runtime takes no mix of those and arrays.
    values = sess.run_with_ort_values(
        list(names), {name: _ort_value(np.asarray(value)) for name, value in feeds.items()}
    )
    return [_from_ort_value(value) for value in values]


def _ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype != ml_dtypes.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        np.ascontiguousarray(array), onnx.TensorProto.BFLOAT16
    )


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    """A result as numpy: a bfloat16 one copied out of ONNX Runtime's (CPU) buffer."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    shape = tuple(value.shape())
    count = math.prod(shape)
    if count == 0:
        return np.zeros(shape, ml_dtypes.bfloat16)
    raw = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    return np.array(raw, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(shape)


def run_original(
    model: str | Path, inputs: Mapping[str, np.ndarray], *, generated: bool
) -> dict[str, np.ndarray]:
    """Run the original model on the verification ``inputs``: a failure of ONNX Runtime
    there is an input error (exit 2), with a hint to size the symbolic dimensions with
    ``--dim`` when the inputs were ``generated``, since the model itself is what it is.

    >>> run_original("wav2vec2.onnx", make_inputs("wav2vec2.onnx"), generated=True)  # doctest: +SKIP
    """
    try:
        return run(model, inputs)
    except InputError:
        raise
    except Exception as exc:  # ONNX Runtime raises its own exception types
        shapes = ", ".join(f"{name}{list(np.shape(value))}" for name, value in inputs.items())
        if not generated:
            raise InputError(f"ONNX Runtime cannot run the original model on --inputs ({shapes}): {first_line(exc)}") from exc
        symbolic = sorted({str(dim) for spec in input_specs(model) for dim in spec.dims if isinstance(dim, str) and dim})
        hint = (
            f"give the sizes of its symbolic dimensions ({', '.join(symbolic)}) with --dim NAME=SIZE, or real inputs with --inputs"
            if symbolic
            else "give real inputs with --inputs"
        )
        raise InputError(
            f"ONNX Runtime cannot run the original model on the generated inputs ({shapes}): {first_line(exc)}; {hint}"
        ) from exc


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input (not an initializer): name, numpy dtype, dims (int, name or None)."""

    name: str
    dtype: np.dtype
    dims: list[int | str | None]


def input_specs(model: str | Path | onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs, read from the graph (initializers listed as inputs excluded)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputError(f"input '{value.name}' is not a tensor; pass inputs with --inputs")
        dims: list[int | str | None] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            else:
                dims.append(dim.dim_param or None)
        specs.append(InputSpec(value.name, _numpy_dtype_of(tensor.elem_type, value.name), dims))
    return specs


def make_inputs(
    model: str | Path | onnx.ModelProto,
    *,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    max_dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Generate seeded inputs for ``model`` following the rules of this module; a
    dimension bounded by ``max_dims`` (by name, see :func:`check_max_dims`) that ``dims``
    does not give takes its default size, or its bound where that is smaller.

    >>> inputs = make_inputs("bert.onnx", dims={"batch": 1, "sequence": 128})  # doctest: +SKIP
    """
    dims = dict(dims or {})
    for name, bound in (max_dims or {}).items():
        if name not in dims and _dim_value(name, {}, "", 0) > bound:
            dims[name] = bound
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    table_rows = _index_table_rows(proto)
    specs = input_specs(proto)
    check_dims({spec.name: spec.dims for spec in specs}, dims)
    shapes = {spec.name: [_dim_value(dim, dims, spec.name, axis) for axis, dim in enumerate(spec.dims)] for spec in specs}
    _fit_windows(proto, specs, shapes, dims)
    _check_generated_size(specs, shapes)
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = shapes[spec.name]
        if is_inexact(spec.dtype):
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif "mask" in spec.name.lower():
            inputs[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif spec.dtype == np.bool_:
            inputs[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            high = table_rows.get(spec.name, DEFAULT_INT_HIGH)
            inputs[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
    return inputs


def _fit_windows(
    proto: onnx.ModelProto, specs: Sequence[InputSpec], shapes: dict[str, list[int]], dims: Mapping[str, int]
) -> None:
    """Raise each default-sized symbolic dimension (not given in ``dims``) to what the model's
    convolution and pooling windows accept (:mod:`rewriter.input_sizes`): the default
    counts positions after the windows too (wav2vec2's 8 frames are 2640 samples), or, when
    no size gives that many, at least one."""
    axes: dict[str, list[tuple[str, int, int]]] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.dims):
            key = dim if isinstance(dim, str) and dim else f"{spec.name}.{axis}"
            if not (isinstance(dim, int) and dim >= 0) and key not in dims:
                axes.setdefault(key, []).append((spec.name, axis, len(spec.dims)))
    for key, where in axes.items():
        size = shapes[where[0][0]][where[0][1]]
        smallest = input_sizes.smallest_size(proto, where, start=size, keep=size)
        why = f"for {size} positions after its convolution/pooling windows"
        if smallest is None:
            smallest = input_sizes.smallest_size(proto, where, start=size)
            why = "the shortest its convolution/pooling windows accept"
        if smallest is not None and smallest > size:
            logger.info("dimension %r: %d, %s", key, smallest, why)
            for name, axis, _ in where:
                shapes[name][axis] = smallest


def check_dims(
    shapes: Mapping[str, Sequence[int | str | None]], dims: Mapping[str, int], option: str = "--dim"
) -> None:
    """Refuse a ``dims`` key that names no symbolic input axis of the model (a name, e.g.
    ``batch``, or ``input.axis``, e.g. ``input_ids.1``), listing the axes it has: a
    ``--dim batch=1`` on a model whose axis is ``batch_size`` would otherwise be ignored.

    ``shapes``: each input's dimensions (a size, a name, or None), by input name;
    ``option``: the option the error names (``--dim``, ``--max-dim``).

    >>> check_dims({"input_ids": ["batch_size", "sequence"]}, {"batch": 1})  # doctest: +SKIP
    Traceback (most recent call last):
    InputError: --dim batch: the model has no symbolic input axis of that name; its axes: batch_size (input_ids[0], ...)
    """
    axes: dict[str, list[str]] = {}
    positions = set()
    for name, shape in shapes.items():
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim >= 0:
                continue
            positions.add(f"{name}.{axis}")
            if isinstance(dim, str) and dim:
                axes.setdefault(dim, []).append(f"{name}[{axis}]")
    unknown = [key for key in dims if key not in axes and key not in positions]
    if not unknown:
        return
    listed = "; ".join(f"{name} ({', '.join(where)})" for name, where in axes.items())
    unnamed = sorted(positions - {f"{w.split('[')[0]}.{w.split('[')[1][:-1]}" for where in axes.values() for w in where})
    if unnamed:
        listed += ("; " if listed else "") + "unnamed: " + ", ".join(unnamed)
    raise InputError(
        f"{option} {unknown[0]}: the model has no symbolic input axis of that name; "
        f"its symbolic axes: {listed or 'none (every input shape is fixed)'}"
    )


def dimension_bounds(min_dims: Mapping[str, int], max_dims: Mapping[str, int]) -> str:
    """The bounds of a library's symbolic dimensions, as text: ``samples >= 400, batch <=
    16`` (the lower ones, the smallest sizes the model's windows take; the upper ones,
    ``max_dims``)."""
    lower = [f"{name} >= {bound}" for name, bound in min_dims.items()]
    return ", ".join([*lower, *(f"{name} <= {bound}" for name, bound in max_dims.items())])


def check_max_dims(
    shapes: Mapping[str, Sequence[int | str | None]],
    max_dims: Mapping[str, int],
    dims: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """The upper bounds ``max_dims`` (``--max-dim``) by axis name, checked: each key names a
    symbolic input axis (its name, or ``input.axis``) that has a name (the compiled model's
    memory is planned by name) and that ``dims`` does not fix, and each bound is a positive
    integer; :class:`InputError` otherwise, naming the option.

    >>> check_max_dims({"images": ["batch", 3, 224, 224]}, {"images.0": 16})
    {'batch': 16}
    """
    check_dims(shapes, max_dims, option="--max-dim")
    dims = dims or {}
    bounds: dict[str, int] = {}
    for key, bound in max_dims.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, np.integer)) or bound < 1:
            raise InputError(f"--max-dim {key}={shorten(str(bound))}: expected a positive integer")
        axes = [
            (name, axis, dim)
            for name, shape in shapes.items()
            for axis, dim in enumerate(shape)
            if not (isinstance(dim, int) and dim >= 0) and key in (dim, f"{name}.{axis}")
        ]
        for name, axis, dim in axes:
            if not isinstance(dim, str) or not dim:
                raise InputError(
                    f"--max-dim {key}: axis {axis} of input {name!r} has no name; only named "
                    "symbolic dimensions can be bounded (name it, or fix it with --dim)"
                )
            fixed = [given for given in dims if given == dim or _axis_named(shapes, given, dim)]
            if fixed:
                raise InputError(
                    f"--max-dim {key}: {dim} is also fixed by --dim {fixed[0]}; a fixed "
                    "dimension needs no bound (give one of the two)"
                )
            if bounds.setdefault(dim, int(bound)) != int(bound):
                raise InputError(f"--max-dim {key}: {dim} is bounded twice, by {bounds[dim]} and {bound}")
    return bounds


def _axis_named(shapes: Mapping[str, Sequence[int | str | None]], key: str, dim: str) -> bool:
    """Whether ``key`` (``input.axis``) is an axis whose dimension is named ``dim``."""
    name, _, axis = key.rpartition(".")
    shape = shapes.get(name)
    return shape is not None and axis.isdigit() and int(axis) < len(shape) and shape[int(axis)] == dim


def _check_generated_size(specs: Sequence[InputSpec], shapes: Mapping[str, list[int]]) -> None:
    """Refuse generated inputs over :data:`MAX_GENERATED_ELEMENTS` each or :data:`MAX_GENERATED_BYTES` in all."""
    total = 0
    for spec in specs:
        count = math.prod(shapes[spec.name])
        total += count * spec.dtype.itemsize
        if count > MAX_GENERATED_ELEMENTS or total > MAX_GENERATED_BYTES:
            raise InputError(
                f"generated input '{spec.name}' would have shape {shapes[spec.name]} ({count:.3g} elements); "
                f"generated inputs are limited to 2**31 elements each and 4 GiB in all: "
                "lower --dim or give --inputs"
            )


def load_inputs(path: str | Path, model: str | Path | onnx.ModelProto, *, what: str = "inputs") -> dict[str, np.ndarray]:
    """Read an ``.npz`` of inputs and check names, dtypes and shapes against the model.

    ``what`` names the file in error messages (``inputs``, ``calibration``).
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such {what} file") from exc
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz {what} file ({first_line(exc)})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: a single array, not an .npz archive of {what} keyed by input name (np.savez)")
    inputs = {}
    try:
        with archive:
            assert archive.zip is not None  # None only once closed
            _check_member_sizes(archive.zip, path)
            for name in archive.files:
                try:
                    inputs[name] = archive[name]
                except MemoryError as exc:
                    raise InputError(f"{path}: member '{name}' does not fit in memory ({first_line(exc)})") from exc
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz {what} file ({first_line(exc)})") from exc
    inputs = _typed_raw(inputs, model)
    check_inputs(inputs, model, source=f"{path}")
    return inputs


def _typed_raw(inputs: dict[str, np.ndarray], model: str | Path | onnx.ModelProto) -> dict[str, np.ndarray]:
    """``inputs`` with raw members read as the model's ``ml_dtypes`` types. ``np.savez``
    stores bfloat16 and float8 arrays as raw bytes (``|V2``, ``|V1``): numpy does not know
    those types, so their descriptor is lost. A raw member of the width of the model's
    input type is that type's bits; other mismatches are left for :func:`check_inputs`."""
    expected = {spec.name: spec.dtype for spec in input_specs(model)}
    typed = dict(inputs)
    for name, value in inputs.items():
        dtype = expected.get(name)
        raw = value.dtype.kind == "V" and value.dtype.names is None and value.dtype.subdtype is None
        if dtype is not None and raw and dtype.kind == "V" and value.dtype.itemsize == dtype.itemsize:
            typed[name] = value.view(dtype)
    return typed


def _check_member_sizes(archive: zipfile.ZipFile, path: str | Path) -> None:
    """Refuse an ``.npy`` member whose header declares more data than the member holds,
    before numpy allocates the array: a 200-byte file can declare terabytes. The zip
    entry records the member's uncompressed size, and reading stops there, so the data
    can never be longer than that (compressed or not)."""
    formats = np.lib.format
    for info in archive.infolist():
        with archive.open(info) as member:
            if member.read(len(formats.MAGIC_PREFIX)) != formats.MAGIC_PREFIX:
                continue  # not an array: numpy reads it as bytes, and check_inputs refuses those
            member.seek(0)
            version = formats.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                continue  # too new to read here: numpy reads it (a MemoryError is caught there)
            read_header = formats.read_array_header_1_0 if version == (1, 0) else formats.read_array_header_2_0
            shape, _, dtype = read_header(member)
            declared = math.prod(shape) * dtype.itemsize
            held = info.file_size - member.tell()
            if not dtype.hasobject and declared > held:
                name = info.filename.removesuffix(".npy")
                raise InputError(
                    f"{path}: member '{name}' declares shape {shape} {dtype} ({declared} bytes of data) "
                    f"but holds {held} bytes"
                )


def check_calibration(inputs: Mapping[str, np.ndarray], *, source: str) -> None:
    """Raise :class:`InputError` unless ``inputs`` hold samples to calibrate on: not all
    empty, and no NaN in float inputs (a statistic over NaN is NaN)."""
    values = {name: np.asarray(value) for name, value in inputs.items()}
    if values and all(value.size == 0 for value in values.values()):
        raise InputError(f"{source}: no calibration samples (every input is empty)")
    for name, value in values.items():
        floating = value.dtype.kind == "f" or value.dtype.name in ("bfloat16",)
        if floating and np.isnan(value.astype(np.float32)).any():
            raise InputError(f"{source}: calibration input '{name}' holds NaN values")


def check_inputs(inputs: Mapping[str, np.ndarray], model: str | Path | onnx.ModelProto, *, source: str) -> None:
    """Raise :class:`InputError` unless ``inputs`` match the model's input names, dtypes and shapes."""
    expected = {spec.name: spec for spec in input_specs(model)}
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InputError(
            f"{source}: input names do not match the model (missing: {missing or 'none'}, "
            f"unknown: {extra or 'none'}; the model takes {sorted(expected)})"
        )
    bound: dict[str, int] = {}
    for name, spec in expected.items():
        value = np.asarray(inputs[name])
        if value.dtype != spec.dtype:
            raise InputError(f"{source}: input '{name}' has dtype {value.dtype}, the model takes {spec.dtype}")
        if len(value.shape) != len(spec.dims):
            raise InputError(
                f"{source}: input '{name}' has rank {value.ndim}, the model takes shape {_shape_text(spec.dims)}"
            )
        for size, dim in zip(value.shape, spec.dims, strict=True):
            fixed = isinstance(dim, int)
            if (fixed and size != dim) or (isinstance(dim, str) and bound.setdefault(dim, size) != size):
                raise InputError(
                    f"{source}: input '{name}' has shape {list(value.shape)}, the model takes {_shape_text(spec.dims)}"
                )


def _shape_text(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(dim) if dim is not None else "?" for dim in shape) + "]"


def _dim_value(dim: object, dims: Mapping[str, int], input_name: str, axis: int) -> int:
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str) and dim:
        if dim in dims:
            return dims[dim]
        for word in re.split(r"[^a-z]+", dim.lower()):
            if word in DEFAULT_DIMS:
                return DEFAULT_DIMS[word]
        logger.info("dimension %r of input %r: using default %d", dim, input_name, DEFAULT_DIM)
        return DEFAULT_DIM
    key = f"{input_name}.{axis}"
    return dims.get(key, DEFAULT_DIMS["batch"] if axis == 0 else DEFAULT_DIM)


def _numpy_dtype_of(elem_type: int, name: str) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError) as exc:
        kind = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        raise InputError(f"input '{name}' has element type {kind}, which cannot be fed from numpy") from exc


def _index_table_rows(proto: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs used as Gather indices into an initializer: the table's row count."""
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    rows: dict[str, int] = {}
    graph_inputs = {i.name for i in proto.graph.input}
    for node in proto.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in shapes:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        size = shapes[node.input[0]][axis]
        source = _trace_to_input(node.input[1], producers, graph_inputs)
        if source is not None:
            rows[source] = min(rows.get(source, size), size)
    return rows


def _trace_to_input(name: str, producers: dict[str, onnx.NodeProto], graph_inputs: set[str]) -> str | None:
    """Follow shape-preserving ops (Cast, Reshape, ...) from ``name`` back to a graph input."""
    passthrough = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Expand"}
    for _ in range(8):
        if name in graph_inputs:
            return name
        node = producers.get(name)
        if node is None or node.op_type not in passthrough:
            return None
        name = node.input[0]
    return None
