"""The fused CUDA sigmoid-attention kernel and its lowering on GPU targets.

Without a GPU: TVM builds the kernel for the ``cuda`` preset, the CUDA source has the
kernel and no n x m global buffer, ``nvcc -ptx`` compiles it, and the rewritten
attention models compile to a module that contains it. The kernel's CUDA source is also
compiled as C++ for the CPU (one POSIX thread per CUDA thread, ``__syncthreads`` a
barrier) and checked against numpy, so the indexing is tested without a GPU. With a
GPU (``-m cuda``) it runs for real.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx  # noqa: E402
from rewriter.backends.tvm.kernels.sigmoid_attention_cuda import (  # noqa: E402
    ROWS,
    SHARED_BYTES,
    THREADS,
    key_tile,
    sigmoid_attention_cuda,
)
from rewriter.backends.tvm.ops.sigmoid_attention import KERNEL_NAME  # noqa: E402
from rewriter.backends.tvm.targets import resolve  # noqa: E402
from rewriter.registry import create_pass  # noqa: E402
from tests import attention_models  # noqa: E402
from tests.backends.tvm.test_sigmoid_attention import FORM_SCALE, inputs, reference  # noqa: E402

CUDA = resolve("cuda")
TOLERANCE = 1e-5  # of the output's scale, float32 kernel vs float64 numpy
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA")
needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None, reason="needs g++ to emulate the CUDA kernel on the CPU"
)


def layout(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None
) -> list[np.ndarray]:
    """The kernel's buffers (as the lowering lays them out; no key padding on CUDA)."""
    args = [q, np.swapaxes(k, 1, 2), v] + ([] if mask is None else [mask])
    return [np.ascontiguousarray(a, dtype=np.float32) for a in args]


def kernel_for(q: np.ndarray, v: np.ndarray, mask: np.ndarray | None, **attrs: float) -> object:
    bh, n, d = q.shape
    m, dv = v.shape[1:]
    heads, rows = (1, 1) if mask is None else mask.shape[:2]
    return sigmoid_attention_cuda(
        bh,
        n,
        m,
        d,
        target=CUDA,
        has_mask=mask is not None,
        value_dim=dv,
        mask_heads=heads,
        mask_rows=rows,
        **attrs,
    )


def cuda_source(func: object) -> str:
    ex = tvm.compile(func, target=CUDA)
    return str(ex.mod.imports[0].inspect_source("cuda"))


def kernel_signature(source: str) -> tuple[int, str, list[str], int]:
    """Threads per block, name and parameter names of the kernel, and where it starts."""
    match = re.search(
        r"extern \"C\" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\)", source
    )
    assert match is not None
    params = re.findall(r"float\* __restrict__ (\w+)_ptr", match.group(3))
    return int(match.group(1)), match.group(2), params, match.start()


def emulate(
    source: str, args: list[np.ndarray], out_shape: tuple[int, ...], tmp: Path
) -> np.ndarray:
    """Run the one kernel of ``source`` on the CPU: a block at a time, a thread each."""
    threads, name, params, start = kernel_signature(source)
    # Shared memory: function-local statics, shared by the threads of the one block.
    body = re.sub(r"__shared__ (alignas\(\d+\) )?", r"\1static ", source[start:])
    # TVM orders the parameters by name; map them to Q, Kt, V, [Mask], Out.
    names = ["Q", "Kt", "V", "Mask", "Out"] if len(args) == 4 else ["Q", "Kt", "V", "Out"]
    prelude = """
        #include <algorithm>
        #include <cmath>
        #include <pthread.h>
        #include <thread>
        #include <vector>
        struct Dim { unsigned x, y, z; };
        static thread_local Dim threadIdx, blockIdx;
        static pthread_barrier_t barrier;
        using std::max; using std::min;
        #define __global__
        #define __launch_bounds__(n)
        #define __restrict__
        #define __syncthreads() pthread_barrier_wait(&barrier)
    """
    call = ", ".join(f"args[{names.index(p)}]" for p in params)
    launcher = f"""
        extern "C" void launch(int blocks, float** args) {{
            pthread_barrier_init(&barrier, nullptr, {threads});
            for (int b = 0; b < blocks; ++b) {{
                std::vector<std::thread> pool;
                for (int t = 0; t < {threads}; ++t)
                    pool.emplace_back([=] {{
                        blockIdx = {{unsigned(b), 0, 0}};
                        threadIdx = {{unsigned(t), 0, 0}};
                        {name}({call});
                    }});
                for (auto& th : pool) th.join();
            }}
        }}
    """
    cpp = tmp / "kernel.cpp"
    cpp.write_text(prelude + body + launcher)
    lib = tmp / "kernel.so"
    subprocess.run(
        ["g++", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(cpp), "-o", str(lib)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    out = np.full(out_shape, np.nan, np.float32)
    buffers = [*args, out]
    pointers = (ctypes.POINTER(ctypes.c_float) * len(buffers))(
        *[b.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for b in buffers]
    )
    blocks = out_shape[0] * -(-out_shape[1] // ROWS)
    ctypes.CDLL(str(lib)).launch(ctypes.c_int(blocks), pointers)
    return out


@needs_nvcc
@pytest.mark.parametrize("has_mask", [False, True])
def test_cuda_source_has_the_kernel_and_compiles_to_ptx(has_mask: bool, tmp_path: Path) -> None:
    bh, n, m, d = 4, 40, 300, 64
    func = sigmoid_attention_cuda(
        bh, n, m, d, target=CUDA, has_mask=has_mask, mask_heads=bh, mask_rows=n, scale=0.125
    )
    source = cuda_source(func)
    assert "__global__" in source and "__syncthreads" in source and "__shared__" in source
    # No n x m score buffer: the only buffers are the parameters and small shared tiles.
    shared = [int(size) for size in re.findall(r"__shared__[^\[]*\[(\d+)\]", source)]
    assert shared and max(shared) < n * m
    threads, _, params, _ = kernel_signature(source)
    assert threads == THREADS
    assert sorted(params) == sorted(["Q", "Kt", "V", "Out"] + (["Mask"] if has_mask else []))
    cu = tmp_path / "sigmoid_attention.cu"
    cu.write_text(source)
    ptx = tmp_path / "sigmoid_attention.ptx"
    subprocess.run(
        ["nvcc", "-ptx", "-arch=sm_90", str(cu), "-o", str(ptx)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert ".entry" in ptx.read_text()


def test_key_tiles_fit_in_shared_memory() -> None:
    assert key_tile(64, 64) == 32 and key_tile(256, 256) == 16
    for d in (4, 64, 128, 256, 512, 1024):
        assert 4 * key_tile(d, d) * (2 * d + ROWS) <= SHARED_BYTES or key_tile(d, d) == 1


@needs_nvcc
@needs_cxx
@pytest.mark.parametrize(
    ("bh", "n", "m", "d", "dv", "mask_layout"),
    [
        (2, 8, 8, 4, 4, None),
        (3, 13, 53, 16, 24, "per_head_rows"),
        (1, 20, 70, 64, 64, "shared_keys"),
        (2, 17, 45, 256, 256, "per_head_rows"),  # wide heads: key tiles of 16
    ],
)
def test_emulated_kernel_matches_numpy(
    bh: int, n: int, m: int, d: int, dv: int, mask_layout: str | None, tmp_path: Path
) -> None:
    q, k, v = inputs(bh, n, m, d, dv, seed=7)
    mask = None
    if mask_layout is not None:
        rng = np.random.default_rng(8)
        shape = (bh, n, m) if mask_layout == "per_head_rows" else (1, 1, m)
        hidden = rng.random(shape) < 0.3
        hidden[..., 0] = True
        mask = np.where(hidden, -np.inf, rng.standard_normal(shape)).astype(np.float32)
        mask[..., 0] = -1e4  # the threshold is masked
        # Key 0 is hidden in every row: a weight of even 1e-38 on it would show.
        v[:, 0] = 3e38
    scale, bias = 1.0 / math.sqrt(d), -math.log(m)
    func = kernel_for(q, v, mask, scale=scale, bias=bias)
    got = emulate(cuda_source(func), layout(q, k, v, mask), (bh, n, dv), tmp_path)
    if mask is not None:
        v[:, 0] = 0.0
    expected = reference(q, k, v, mask, scale, bias)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


@needs_nvcc
@pytest.mark.parametrize("form", sorted(attention_models.FORMS))
def test_compiled_rewritten_attention_uses_the_cuda_kernel(form: str) -> None:
    model = attention_models.attention_model(form)
    assert create_pass("sigmoid-attention")(model).stats["attention_replaced"] == 1
    proto = ir.serde.serialize_model(model)
    mod = import_onnx.import_onnx(proto, target=CUDA)
    kernels = [gv for gv in mod.get_global_vars() if gv.name_hint.startswith(KERNEL_NAME)]
    assert len(kernels) == 1
    compiled = backend.compile(proto, target="cuda")
    source = compiled.device_source()
    assert source is not None
    assert f"{KERNEL_NAME}_kernel" in source
    # The function body (MatMul, Sigmoid, Where) is not inlined: no sigmoid kernel of TVM.
    assert "sigmoid" not in source.replace(KERNEL_NAME, "")


@pytest.mark.cuda
@pytest.mark.parametrize("form", sorted(attention_models.FORMS))
def test_cuda_run_agrees_with_numpy(form: str) -> None:
    model = attention_models.attention_model(form)
    create_pass("sigmoid-attention")(model)
    feeds = attention_models.feeds(form)
    got = backend.compile(ir.serde.serialize_model(model), target="cuda").run(feeds)["y"]
    oracle = attention_models.sigmoid_reference(feeds, scale=FORM_SCALE, n=attention_models.N)
    assert np.abs(got - oracle).max() <= 1e-4 * np.abs(oracle).max()


@pytest.mark.cuda
def test_cuda_kernel_run_with_mask() -> None:
    bh, n, m, d, dv = 3, 37, 301, 64, 48
    q, k, v = inputs(bh, n, m, d, dv, seed=9)
    rng = np.random.default_rng(10)
    mask = np.where(rng.random((bh, n, m)) < 0.3, -np.inf, 0.0).astype(np.float32)
    scale, bias = 0.125, -math.log(m)
    dev = tvm.cuda(0)
    kernel = tvm.compile(kernel_for(q, v, mask, scale=scale, bias=bias), target=CUDA)
    out = tvm.runtime.tensor(np.full((bh, n, dv), np.nan, np.float32), device=dev)
    kernel(*[tvm.runtime.tensor(a, device=dev) for a in layout(q, k, v, mask)], out)
    expected = reference(q, k, v, mask, scale, bias)
    assert np.abs(out.numpy() - expected).max() <= TOLERANCE * np.abs(expected).max()
