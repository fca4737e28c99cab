"""Run a compiled model again and again without copies: :class:`Session`.

A call hands each input to the Relax VM through DLPack, without a copy, when it is
C-contiguous, 64-byte aligned (what TVM's kernels assume) and writable (numpy cannot
export a read-only array through DLPack): numpy arrays and CPU torch tensors alike (torch
allocates with 64-byte alignment; numpy does not, see :func:`aligned_empty`). Any other
input is copied into a staging buffer that the session keeps and reuses, so repeated
calls with the same shapes allocate nothing. The outputs are written by the kernels
through the library's destination-passing function (``main_out``, see
:mod:`rewriter.backends.tvm.relax_passes.outputs_as_params`), without a copy:

* into caller-provided ``out=`` arrays (an unaligned one is filled by a copy);
* or into output buffers the session keeps and hands out as numpy arrays. A buffer is
  used again only once no array handed out on it is alive (its reference count says
  so); while the caller holds one, the next call writes into a new buffer. So the arrays
  belong to the caller, and a loop that drops each call's outputs allocates nothing.
  The first call at new input shapes runs ``main`` (on the VM's own buffers), which
  gives the output shapes.

The session's buffers are numpy's allocations, not TVM's: numpy asks the kernel for
transparent huge pages on large arrays (``madvise``), TVM's allocator does not, and the
two-pass softmax streamed 1x64M into TVM's 4 KiB pages 1.2x slower (TLB misses).

Every call checks the inputs as :meth:`rewriter.backends.tvm.Compiled.run` does: names,
dtypes, ranks, static sizes and the upper bounds of symbolic sizes (``max_dims``: the
memory is planned for those), an :class:`InputError` naming the input otherwise.

A session is not thread-safe (one Relax VM); use one per thread.

>>> session = compiled.session()  # doctest: +SKIP
>>> y = session.run({"x": x})["y"]  # doctest: +SKIP
>>> session.run({"x": x}, out={"y": y})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter.backends.tvm import thread_pool
from rewriter.backends.tvm.relax_passes.outputs_as_params import OUT_FUNCTION
from rewriter.errors import InputError

if TYPE_CHECKING:
    from rewriter.backends.tvm.build import Signature

logger = logging.getLogger(__name__)

ALIGNMENT = 64  # bytes: TVM's kernels assume their buffers start on this boundary
# Output layouts remembered per session (input shapes seen), before starting afresh.
MAX_LAYOUTS = 64
# The upper bound of a dimension that has only a lower one (past any real size).
UNBOUNDED = 1 << 62
# dtypes numpy cannot pass through DLPack, and the same-sized integer they travel as.
_VIEWED = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}
# What tvm_ffi.from_dlpack raises for an array it cannot share.
_NOT_SHAREABLE = (BufferError, ValueError, TypeError, RuntimeError, KeyError)


def aligned_empty(shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """An uninitialised numpy array whose data starts on a 64-byte boundary, so that a
    :class:`Session` takes it without a copy (numpy's own arrays start 16 bytes past one).

    >>> aligned_empty((3, 5)).ctypes.data % 64
    0
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(size * dtype.itemsize + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size * dtype.itemsize].view(dtype).reshape(tuple(shape))


def dtype_name(value: Any) -> str:
    """The dtype of a numpy array or torch tensor as the signature names it (``float32``)."""
    if _is_torch(value):
        return str(value.dtype).removeprefix("torch.")
    return np.asarray(value).dtype.name


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def check_input(
    name: str,
    value: Any,
    shape: Sequence[int | str | None],
    dtype: str,
    max_dims: Mapping[str, int] | None = None,
    min_dims: Mapping[str, int] | None = None,
) -> None:
    """Raise :class:`InputError` unless ``value`` has the input's dtype, rank and static
    sizes, no dimension over its bound in ``max_dims`` and none under its bound in
    ``min_dims`` (by name)."""
    got = dtype_name(value)
    if got != dtype:
        raise InputError(f"input {name!r} has dtype {got}, the compiled model takes {dtype}")
    sizes = [int(size) for size in value.shape]
    expected = "[" + ", ".join(str(dim) if dim is not None else "?" for dim in shape) + "]"
    if len(sizes) != len(shape):
        raise InputError(
            f"input {name!r} has rank {len(sizes)} (shape {sizes}), the compiled model takes {expected}"
        )
    for size, dim in zip(sizes, shape, strict=True):
        if isinstance(dim, int) and dim > 0 and size != dim:
            raise InputError(
                f"input {name!r} has shape {sizes}, the compiled model takes {expected}"
            )
    for axis, (size, dim) in enumerate(zip(sizes, shape, strict=True)):
        bound = (max_dims or {}).get(dim) if isinstance(dim, str) else None
        if bound is not None and size > bound:
            raise InputError(
                f"input {name!r} has shape {sizes}: axis {axis} ({dim}) is {size}, over the "
                f"compiled model's bound {dim} <= {bound} (the length of a table the model reads "
                f"by it, past which ONNX Runtime fails too, or the size --max-dim planned its memory for)"
            )
        low = (min_dims or {}).get(dim) if isinstance(dim, str) else None
        if low is not None and size < low:
            raise InputError(
                f"input {name!r} has shape {sizes}: axis {axis} ({dim}) is {size}, under the "
                f"compiled model's bound {dim} >= {low} (the smallest size its convolution and "
                f"pooling windows take; ONNX Runtime fails below it too)"
            )


def _aligned_torch(value: Any) -> bool:
    return bool(
        value.device.type == "cpu"
        and value.layout is _torch_strided()
        and value.is_contiguous()
        and value.data_ptr() % ALIGNMENT == 0
    )


def _torch_strided() -> Any:
    import torch

    return torch.strided


def to_tvm(array: Any) -> Any:
    """``array`` (numpy, C-contiguous, 64-byte aligned and writable; or a CPU torch tensor,
    contiguous and aligned) as a TVM tensor on the same memory; None when it is not so."""
    import tvm_ffi

    if type(array) is not np.ndarray:
        return tvm_ffi.from_dlpack(array.detach()) if _aligned_torch(array) else None
    flags = array.flags
    # Checked first: the error tvm_ffi raises otherwise costs ~20 us on each call. An
    # empty array's strides may be zeros (np.zeros((0, 4))), which a kernel's argument
    # check refuses: it is not shared (nothing to share).
    if not (flags.c_contiguous and flags.writeable and array.size) or array.ctypes.data % ALIGNMENT:
        return None
    try:
        if array.dtype.kind not in "biufc":  # bfloat16 and float8 (ml_dtypes): as integers
            viewed = _VIEWED[array.dtype.name]
            tensor: Any = tvm_ffi.from_dlpack(
                array.view(viewed), require_alignment=ALIGNMENT, require_contiguous=True
            )
            return tensor._create_view(tuple(array.shape), array.dtype.name)
        return tvm_ffi.from_dlpack(array, require_alignment=ALIGNMENT, require_contiguous=True)
    except _NOT_SHAREABLE:  # misaligned, strided, read-only, a dtype DLPack lacks
        return None


def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy array on the memory of TVM tensor ``tensor`` (no copy)."""
    try:
        return np.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError):  # a dtype numpy's DLPack lacks: bfloat16
        import ml_dtypes

        dtype = str(tensor.dtype)
        raw = np.from_dlpack(tensor._create_view(tuple(tensor.shape), _VIEWED[dtype]))
        return raw.view(getattr(ml_dtypes, dtype))


class _OwnBuffer:
    """An output buffer of the session: 64-byte aligned numpy memory, the TVM tensor on it,
    and whether an array handed out on it is still alive."""

    __slots__ = ("_idle", "array", "owner", "tensor")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.owner = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -self.owner.ctypes.data % ALIGNMENT
        # Every view of it (ours, those handed out, theirs) refers to ``owner`` itself.
        self.array = self.owner[start : start + nbytes].view(dtype).reshape(shape)
        self.tensor = to_tvm(self.array)
        self._idle = sys.getrefcount(self.owner)

    def free(self) -> bool:
        """No array handed out on this buffer is alive."""
        return sys.getrefcount(self.owner) == self._idle

    def hand_out(self) -> np.ndarray:
        return self.array.view()


class Session:
    """A compiled model's Relax VM with its staging buffers, for repeated calls.

    Made by :meth:`rewriter.backends.tvm.Compiled.session`; see the module docstring.

    >>> session = compiled.session()  # doctest: +SKIP
    >>> outputs = session.run({"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    """

    def __init__(
        self, vm: Any, signature: Signature, device: Any = None, *, pooled: bool = False
    ) -> None:
        self._vm = vm
        # A GPU model takes copies to the device and gives copies back (no DLPack sharing).
        self._gpu = device if device is not None and device.dlpack_device_type() != 1 else None
        self.signature = signature
        self._main = vm["main"]
        try:
            self._main_out: Any = vm[OUT_FUNCTION]
        except AttributeError:  # GPU code, or a main returning more than tensors: no main_out
            self._main_out = None
        if pooled:  # the workers of our thread pool spin while a call runs (thread_pool)
            self._main = thread_pool.hot(self._main)
            if self._main_out is not None:
                self._main_out = thread_pool.hot(self._main_out)
        self._names = [name for name, _, _ in signature.inputs]
        self._known = set(self._names)
        # Per input: name, shape, dtype name, numpy dtype (None: no numpy equivalent), the
        # static sizes by axis and the (lower, upper) bounds by axis, for the fast check of
        # numpy arrays (a size over its bound would overflow the statically planned memory
        # or read past a table; one under it is a window with no output).
        self._specs = [
            (
                name,
                shape,
                dtype,
                _numpy_dtype(dtype),
                [(axis, dim) for axis, dim in enumerate(shape) if isinstance(dim, int) and dim > 0],
                [
                    (axis, signature.min_dims.get(dim, 0), signature.max_dims.get(dim, UNBOUNDED))
                    for axis, dim in enumerate(shape)
                    if isinstance(dim, str) and (dim in signature.max_dims or dim in signature.min_dims)
                ],
            )
            for name, shape, dtype in signature.inputs
        ]
        self._staging: dict[str, tuple[Any, np.ndarray, Any]] = {}
        # Output shapes and dtypes by input shapes (None: static inputs), from main.
        self._static = all(len(static) == len(shape) for _, shape, _, _, static, _ in self._specs)
        self._layouts: dict[Any, list[tuple[tuple[int, ...], np.dtype]] | None] = {}
        self._own: tuple[Any, list[_OwnBuffer]] = (None, [])
        # The inputs the last call copied (not contiguous, aligned and writable), by name.
        self.copied: list[str] = []

    @property
    def writes_in_place(self) -> bool:
        """Whether ``out=`` arrays are written by the kernels (else: copied into)."""
        return self._main_out is not None

    def run(
        self, inputs: Mapping[str, Any], *, out: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (numpy arrays or torch tensors, by name); returns the outputs
        by name: numpy arrays on the session's buffers (see the module docstring), or the
        ``out`` arrays given for them.

        ``out`` must give every output a C-contiguous, writable numpy array of the
        output's shape and dtype, sharing no memory with an input. Raises
        :class:`InputError` naming the input or output otherwise.

        >>> session.run({"x": x}, out={"y": y})["y"] is y  # doctest: +SKIP
        True
        """
        if len(inputs) != len(self._names) or not self._known.issuperset(inputs):
            self._refuse_names(inputs)
        self.copied = []
        args = [self._argument(inputs[spec[0]], spec) for spec in self._specs]
        if out is not None:
            return self._run_into(args, inputs, out)
        if self._main_out is None:
            return self._outputs(self._main(*args))
        key = None if self._static else tuple(tuple(arg.shape) for arg in args)
        if key not in self._layouts:  # the first call at these shapes gives the outputs'
            results = self._outputs(self._main(*args))
            if len(self._layouts) >= MAX_LAYOUTS:
                self._layouts.clear()
            self._layouts[key] = [(tuple(a.shape), a.dtype) for a in results.values()]
            return results
        buffers = self._own_buffers(key)
        if buffers is None:
            return self._outputs(self._main(*args))
        self._main_out(*args, *[buffer.tensor for buffer in buffers])
        return {
            name: buffer.hand_out()
            for name, buffer in zip(self.signature.outputs, buffers, strict=True)
        }

    def _own_buffers(self, key: Any) -> list[_OwnBuffer] | None:
        """The session's output buffers for input shapes ``key``: those of the last call
        where no array handed out on them is alive, new ones elsewhere; None where an
        output's dtype cannot travel through DLPack."""
        layout = self._layouts[key]
        if layout is None:
            return None
        last, buffers = self._own
        if last != key or not buffers:
            buffers = [_OwnBuffer(shape, dtype) for shape, dtype in layout]
            if any(buffer.tensor is None for buffer in buffers):
                self._layouts[key] = None
                return None
            self._own = (key, buffers)
            return buffers
        for index, buffer in enumerate(buffers):
            if not buffer.free():  # the caller holds the last call's output
                buffers[index] = _OwnBuffer(*layout[index])
        return buffers

    def _refuse_names(self, inputs: Mapping[str, Any]) -> None:
        missing = [name for name in self._names if name not in inputs]
        unknown = sorted(name for name in inputs if name not in self._known)
        problems = [
            f"{kind} inputs {names}"
            for kind, names in (("missing", missing), ("unknown", unknown))
            if names
        ]
        raise InputError(f"{', '.join(problems)}; the compiled model takes {self._names}")

    def _argument(
        self,
        value: Any,
        spec: tuple[str, Any, str, Any, list[tuple[int, int]], list[tuple[int, int, int]]],
    ) -> Any:
        name, shape, dtype, np_dtype, static, bounded = spec
        if (
            type(value) is not np.ndarray
            or value.dtype != np_dtype
            or value.ndim != len(shape)
            or any(value.shape[axis] != size for axis, size in static)
            or (bounded and any(not low <= value.shape[axis] <= high for axis, low, high in bounded))
        ):  # not a numpy array that passes the checks: the full checks say why
            if not _is_torch(value) and not isinstance(value, np.ndarray):
                value = np.asarray(value)
            check_input(name, value, shape, dtype, self.signature.max_dims, self.signature.min_dims)
        if self._gpu is not None:
            import tvm

            return tvm.runtime.tensor(np.ascontiguousarray(value), self._gpu)
        tensor = to_tvm(value)
        if tensor is not None:
            return tensor
        self.copied.append(name)
        return self._stage(name, value)

    def _stage(self, name: str, value: Any) -> Any:
        """Copy ``value`` into this input's staging buffer (made again only when the shape
        changes) and return the buffer as a TVM tensor."""
        shape = tuple(int(size) for size in value.shape)
        staged = self._staging.get(name)
        if staged is None or tuple(staged[1].shape) != shape:
            view = aligned_empty(shape, _numpy_dtype(dtype_name(value)))  # huge pages, as above
            staged = (to_tvm(view), view, None)
            self._staging[name] = staged
        tensor, view, torch_view = staged
        if tensor is None:  # no memory to share (an empty input: a zero-size axis)
            import tvm

            return tvm.runtime.empty(shape, dtype_name(value), tvm.cpu(0))
        if _is_torch(value):
            if torch_view is None:
                import torch

                torch_view = torch.from_dlpack(tensor)
                self._staging[name] = (tensor, view, torch_view)
            torch_view.copy_(value.detach())
        else:
            np.copyto(view, value, casting="no")
        return tensor

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        values = flatten(result)
        names = self.signature.outputs
        if len(values) != len(names):
            raise RuntimeError(f"model returned {len(values)} outputs, expected {len(names)}")
        # Only a library with main_out guarantees that every output of main is a buffer of
        # its own (not a constant of the model, which a caller could change, or an input).
        share = to_numpy if self._main_out is not None and self._gpu is None else _copy
        return {name: share(value) for name, value in zip(names, values, strict=True)}

    def _run_into(
        self, args: list[Any], inputs: Mapping[str, Any], out: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        names = self.signature.outputs
        missing = [name for name in names if name not in out]
        unknown = sorted(name for name in out if name not in names)
        if missing or unknown:
            problems = [
                f"{kind} outputs {found}"
                for kind, found in (("missing", missing), ("unknown", unknown))
                if found
            ]
            raise InputError(f"out=: {', '.join(problems)}; the compiled model writes {names}")
        for name in names:
            array = out[name]
            if (
                not isinstance(array, np.ndarray)
                or not array.flags.c_contiguous
                or not array.flags.writeable
            ):
                raise InputError(f"out[{name!r}] must be a C-contiguous, writable numpy array")
            for input_name, value in inputs.items():
                if not _is_torch(value) and np.may_share_memory(array, value):
                    raise InputError(f"out[{name!r}] shares memory with input {input_name!r}")
        destinations = [to_tvm(out[name]) for name in names]
        if self._main_out is None or any(tensor is None for tensor in destinations):
            results = self._outputs(self._main(*args))
            for name in names:
                _copy_out(name, results[name], out[name])
            return {name: out[name] for name in names}
        try:
            results = self._outputs(self._main_out(*args, *destinations))
        except (ValueError, TypeError, RuntimeError) as exc:  # the VM's checks of the out arrays
            if any(f"param=out{index}," in str(exc) for index in range(len(names))):
                raise InputError(
                    f"out= arrays do not match the outputs: {_first_line(exc)}"
                ) from exc
            raise
        for name in names:
            # An output main_out could not place in the caller's array (see the module
            # docstring) comes back in a buffer of its own.
            if results[name].ctypes.data != out[name].ctypes.data:
                _copy_out(name, results[name], out[name])
        return {name: out[name] for name in names}


def _numpy_dtype(name: str) -> Any:
    try:
        return np.dtype(name)
    except TypeError:  # e.g. bfloat16 without ml_dtypes imported
        try:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, name))
        except (ImportError, AttributeError):
            return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _copy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.numpy())


def _copy_out(name: str, value: np.ndarray, array: np.ndarray) -> None:
    if value.shape != array.shape or value.dtype != array.dtype:
        raise InputError(
            f"out[{name!r}] has shape {list(array.shape)} and dtype {array.dtype}, "
            f"the output is {list(value.shape)} {value.dtype}"
        )
    np.copyto(array, value)


def flatten(result: Any) -> list[Any]:
    """The tensors of a VM result (a tensor or nested tuples of them), in order."""
    import tvm

    if isinstance(result, tvm.runtime.Tensor):
        return [result]
    values: list[Any] = []
    for item in result:
        values.extend(flatten(item))
    return values
