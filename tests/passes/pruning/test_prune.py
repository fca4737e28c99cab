"""Tests of ``prune``: the exact DP, the allocations, and the pass on small and real models."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, run, to_proto
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import InputError
from rewriter.pass_base import PassContext
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning import probe as prune_probe
from rewriter.passes.pruning import prune

SIZES = (8, 32, 32, 16)


def mlp_model(
    sizes: tuple[int, ...] = SIZES, *, seed: int = 0, lm_head: int = 0, batch: int | str = 4
) -> ir.Model:
    """x [4, sizes[0]] -> (MatMul, Tanh)* -> y; with ``lm_head`` a last widening MatMul to ``logits``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        # Layers of different scales, so the allocations differ.
        weight = (rng.standard_normal((fan_in, fan_out)) * (0.5 + index) / np.sqrt(fan_in)).astype(
            np.float32
        )
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(
            helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"], name=f"layer{index}")
        )
        nodes.append(helper.make_node("Tanh", [f"m{index}"], [f"h{index}"]))
        current = f"h{index}"
    outputs = [helper.make_tensor_value_info(current, TensorProto.FLOAT, [batch, sizes[-1]])]
    if lm_head:
        head = rng.standard_normal((sizes[-1], lm_head)).astype(np.float32)
        inits.append(numpy_helper.from_array(head, "head"))
        nodes.append(helper.make_node("MatMul", [current, "head"], ["logits"], name="lm_head"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, lm_head]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        outputs,
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def feeds(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((4, SIZES[0])).astype(np.float32)}


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def run_pass(model: ir.Model, **options: object) -> prune.RewriteResult:
    rewrite = prune.PrunePass(prune.PruneOptions(**options))
    rewrite.context = PassContext(calibration=[feeds()])
    return rewrite(model)


# --- the dynamic program ----------------------------------------------------------------


def brute_force(
    curves: np.ndarray, params: list[int], amounts: np.ndarray, sparsity: float
) -> float:
    budget = sum(params) - round(sparsity * sum(params))
    best = np.inf
    for choice in itertools.product(range(len(amounts)), repeat=len(params)):
        kept = sum(
            n - pruning.pruned_count(n, amounts[j]) for n, j in zip(params, choice, strict=True)
        )
        if kept <= budget:
            best = min(best, sum(curves[layer, j] for layer, j in enumerate(choice)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_dp_is_exact_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    amounts = pruning.amount_grid(0.75, 4)  # 0, .25, .5, .75
    params = [int(n) for n in rng.integers(2, 40, size=4) * 4]
    # Arbitrary (not monotone) curves: the DP must be exact for any costs.
    curves = rng.random((4, len(amounts)))
    for sparsity in (0.1, 0.3, 0.5, 0.7):
        allocation = pruning.allocate_rd(curves, params, amounts, sparsity)
        kept = sum(n - c for n, c in zip(params, allocation.counts, strict=True))
        assert kept <= sum(params) - round(sparsity * sum(params))
        assert sum(allocation.distortion) == pytest.approx(
            brute_force(curves, params, amounts, sparsity), abs=1e-12
        )


@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.5, 0.77, 0.9])
def test_dp_reaches_the_target_within_one_grid_step(sparsity: float) -> None:
    rng = np.random.default_rng(3)
    amounts = pruning.amount_grid(0.95, 32)
    params = [int(n) for n in rng.integers(100, 5000, size=12)]
    curves = pruning.monotone(rng.random((12, len(amounts))) * np.linspace(0, 1, len(amounts)) ** 2)
    allocation = pruning.allocate_rd(curves, params, amounts, sparsity)
    reached = sum(allocation.counts) / sum(params)
    assert sparsity <= reached + 1e-12
    assert reached - sparsity <= 1 / 32


def test_dp_with_many_bins_rounds_costs_up_and_keeps_the_budget() -> None:
    rng = np.random.default_rng(4)
    amounts = pruning.amount_grid(0.95, 32)
    params = [int(n) for n in rng.integers(10_000, 100_000, size=6) + 1]  # no common divisor
    curves = pruning.monotone(rng.random((6, len(amounts))))
    allocation = pruning.allocate_rd(curves, params, amounts, 0.5, max_bins=1000)
    reached = sum(allocation.counts) / sum(params)
    assert reached + 1e-12 >= 0.5 and reached - 0.5 <= 1 / 32


def test_unreachable_sparsity_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not reachable"):
        pruning.allocate_rd(np.zeros((2, 3)), [8, 8], pruning.amount_grid(0.5, 4), 0.9)


def test_baselines_count_exactly() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n) for n in (100, 300)]
    assert pruning.allocate_uniform([100, 300], 0.5).counts == [50, 150]
    counts = pruning.allocate_global_magnitude(arrays, 0.5).counts
    assert sum(counts) == 200
    threshold = np.sort(np.abs(np.concatenate(arrays)))[199]
    assert counts == [int(np.sum(np.abs(a) <= threshold)) for a in arrays]


# --- the pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", prune.ALLOCATIONS)
def test_prune_reaches_the_sparsity_and_keeps_the_graph(allocation: str) -> None:
    model = mlp_model()
    before_ops, before = op_types(model), weights(model)
    result = run_pass(model, sparsity=0.5, allocation=allocation)
    after = weights(result.model)
    total = sum(w.size for w in before.values())
    zeroed = sum(int(np.count_nonzero(w == 0)) for w in after.values())
    assert result.modified
    assert result.stats["params_total"] == total
    assert result.stats["params_zeroed"] == zeroed
    assert result.stats["layers_pruned"] + result.stats["layers_dense"] == 3
    step = 1 / 32 if allocation == "rd" else 1 / total  # rounding per layer for the baselines
    assert 0.5 - step <= zeroed / total <= 0.5 + step
    assert op_types(result.model) == before_ops
    for name, weight in after.items():
        # Magnitude pruning: every zeroed weight is no larger than every kept one.
        dropped, kept = np.abs(before[name][weight == 0]), np.abs(before[name][weight != 0])
        if dropped.size and kept.size:
            assert dropped.max() <= kept.min()
        np.testing.assert_array_equal(weight[weight != 0], before[name][weight != 0])
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    table = result.tables["layers"]
    assert [row["layer"] for row in table] == ["layer0", "layer1", "layer2"]
    assert sum(round(row["sparsity"] * row["params"]) for row in table) == zeroed
    assert all((row["distortion"] is not None) == (allocation == "rd") for row in table)


def test_rd_distortion_is_below_uniform_on_calibration_data() -> None:
    """The point of the method; on this seeded model with 3 layers of different scales.

    Not a theorem: the DP is optimal for the sum of the per-layer curves, which only
    approximates the joint distortion (Xu et al., section 3).
    """
    reference = run(mlp_model(), feeds())["h2"]
    errors = {}
    for allocation in ("rd", "uniform"):
        model = run_pass(mlp_model(), sparsity=0.6, allocation=allocation).model
        errors[allocation] = float(np.mean((run(model, feeds())["h2"] - reference) ** 2))
    assert errors["rd"] < errors["uniform"]


def test_reported_distortion_matches_pruning_one_layer() -> None:
    model = mlp_model()
    layers, _ = prune.prunable_layers(model)
    weights_by_name = {layer.weight.name: layer.array() for layer in layers}
    probe = prune_probe.DistortionProbe(model, weights_by_name, [feeds()], suffixes=True)
    full = prune_probe.DistortionProbe(model, weights_by_name, [feeds()], suffixes=False)
    assert len(probe.runner) == 2 and not full.runner  # w1, w2 start suffixes; w0 runs it all
    reference = run(model, feeds())["h2"]
    half = pruning.magnitude_prune(layers[1].array(), layers[1].params // 2)
    alone = mlp_model()
    alone.graph.initializers["w1"].const_value = ir.Tensor(half, name="w1")
    expected = np.mean((run(alone, feeds())["h2"].astype(np.float64) - reference) ** 2) / np.mean(
        reference.astype(np.float64) ** 2
    )
    # float32 outputs, float64 error: agreement to a few ulp of the float32 output.
    assert probe.distortion_of("w1", half) == pytest.approx(expected, rel=1e-5)
    assert full.distortion_of("w1", half) == pytest.approx(expected, rel=1e-5)
    assert probe.curve("w1", np.array([0.0, 0.5]))[1] == pytest.approx(expected, rel=1e-5)


def test_suffix_sessions_are_chosen_by_size_not_by_time() -> None:
    """The same choice on every run and Ray worker: it changes the curves' last bits."""
    assert not prune_probe.wants_suffixes(weights(mlp_model()), feeds())
    big = {"w": np.zeros((1024, 1024), np.float32)}
    # 2 x 256 token ids: 512 rows x 1M weights = 5.4e8 multiply-adds; 400 float rows: 4.2e8.
    assert prune_probe.wants_suffixes(big, {"input_ids": np.zeros((2, 256), np.int64)})
    assert not prune_probe.wants_suffixes(big, {"x": np.zeros((2, 200, 1024), np.float32)})


def test_weights_become_inputs_of_the_probe_session() -> None:
    model = mlp_model()
    proto = prune_probe.with_weights_as_inputs(model, ["w0", "w2"])
    assert [i.name for i in proto.graph.input] == ["x", "w0", "w2"]
    assert [t.name for t in proto.graph.initializer] == ["w1"]


def test_lm_head_is_left_dense_unless_asked() -> None:
    result = run_pass(mlp_model(lm_head=64), sparsity=0.5, allocation="uniform")
    assert not np.any(weights(result.model)["head"] == 0)
    assert any("LM head" in note for note in result.notes)
    result = run_pass(
        mlp_model(lm_head=64), sparsity=0.5, allocation="uniform", include_lm_head=True
    )
    assert np.count_nonzero(weights(result.model)["head"] == 0) == 16 * 64 // 2


def test_exclude_by_glob() -> None:
    result = run_pass(mlp_model(), sparsity=0.5, allocation="uniform", exclude=["layer1"])
    assert not np.any(weights(result.model)["w1"] == 0)
    assert result.stats["params_total"] == 8 * 32 + 32 * 16
    assert "layer layer1: excluded by name" in result.notes


def declare(model: ir.Model, name: str, where: str) -> ir.Model:
    """``model`` with the initializer ``name`` also a graph ``input`` (a weight the user may
    override at run time, valid since IR 4) or ``output``."""
    value = model.graph.initializers[name]
    (model.graph.inputs if where == "input" else model.graph.outputs).append(value)
    return model


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_weight_that_is_also_a_graph_input_or_output_is_left_dense(where: str, monkeypatch) -> None:
    # Every initializer not measured is fed to the probe's sessions, w1 too.
    monkeypatch.setattr(prune_probe, "SHARED_BYTES", 0)
    model = declare(mlp_model(), "w1", where)
    before = weights(model)["w1"]
    result = run_pass(model, sparsity=0.5, allocation="rd")
    np.testing.assert_array_equal(weights(result.model)["w1"], before)
    assert f"layer layer1: its weight is also a graph {where}, left dense" in result.notes
    assert result.stats["params_total"] == 8 * 32 + 32 * 16
    onnx.checker.check_model(to_proto(result.model), full_check=True)


def test_no_weights_leaves_the_model_unchanged() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    result = run_pass(model)
    assert not result.modified
    assert result.stats == {"layers_pruned": 0}
    assert "no prunable weights" in result.notes[0]


@pytest.mark.parametrize("allocation", prune.ALLOCATIONS)
def test_idempotent(allocation: str) -> None:
    once = run_pass(mlp_model(), sparsity=0.5, allocation=allocation).model
    first = weights(once)
    again = run_pass(once, sparsity=0.5, allocation=allocation)
    if allocation == "rd":
        # Already-zero weights stay zero; the DP sees no gain from moving them.
        assert again.stats["params_zeroed"] == sum(
            int(np.count_nonzero(w == 0)) for w in first.values()
        )
    else:
        assert not again.modified
    for name, weight in weights(again.model).items():
        np.testing.assert_array_equal(weight, first[name])


def test_sparsity_zero_keeps_the_function() -> None:
    model = mlp_model()
    reference = run(model, feeds())
    result = run_pass(model, sparsity=0.0)
    assert not result.modified
    np.testing.assert_array_equal(run(result.model, feeds())["h2"], reference["h2"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"allocation": "random"}, "allocation"),
        ({"distortion": "kl"}, "distortion"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        run_pass(mlp_model(), **options)


def test_options_parse_from_strings() -> None:
    rewrite = prune.PrunePass.from_strings(
        {"sparsity": "0.3", "exclude": "a*|b", "allocation": "uniform"}
    )
    assert rewrite.options.sparsity == 0.3 and rewrite.options.exclude == ["a*", "b"]


def test_rewrite_file_with_calibration(tmp_path) -> None:
    from rewriter.job import rewrite_file

    source = tmp_path / "mlp.onnx"
    onnx.save(to_proto(mlp_model()), source)
    report = rewrite_file(source, tmp_path / "out.onnx", [prune.PrunePass()], calibration=feeds())
    record = report.passes[0]
    assert record.name == "prune" and not record.exact
    assert 0.5 - 1 / 32 <= record.stats["sparsity_permille"] / 1000 <= 0.5 + 1 / 32
    assert report.verification is not None and not report.verification.enforced


def test_real_bert_rd_pooled(real_model) -> None:
    bert = real_model("bert_eager_torchscript")
    model = ir.serde.deserialize_model(onnx.load(bert.path))
    rewrite = prune.PrunePass(
        prune.PruneOptions(sparsity=0.4, distortion="pooled", steps=4, max_amount=0.75)
    )
    rewrite.context = PassContext(calibration=[bert.inputs])
    result = rewrite(model)
    assert result.stats["params_total"] == 2 * (4 * 64 * 64 + 2 * 64 * 128) + 64 * 64  # + pooler
    assert 0.4 <= result.stats["params_zeroed"] / result.stats["params_total"] <= 0.4 + 1 / 4
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    outputs = run(result.model, bert.inputs)
    assert outputs["last_hidden_state"].shape == (2, 16, 64)


def test_calibration_batches_of_one_shape_run_as_one() -> None:
    model = mlp_model()
    two = [feeds(1), feeds(2)]
    dynamic = mlp_model(batch="N")
    probe = prune_probe.DistortionProbe(dynamic, {"w0": weights(dynamic)["w0"]}, two)
    assert len(probe.batches) == 1 and probe.batches[0]["x"].shape == (8, SIZES[0])
    # A fixed batch dimension cannot take the concatenation: one run per batch.
    probe = prune_probe.DistortionProbe(model, {"w0": weights(model)["w0"]}, two)
    assert len(probe.batches) == 2


@pytest.mark.slow  # measures 36 distortion curves of the real MiniLM: 1-6 min on 2 cores
def test_minilm_rd_beats_uniform_at_half_sparsity(tmp_path) -> None:
    from examples import minilm
    from rewriter import verify

    path, sentences = minilm.prepare(tmp_path)
    inputs = dict(np.load(sentences))
    dense = run(path, inputs)["last_hidden_state"]
    cosine = {}
    for allocation in ("rd", "uniform"):
        model = ir.serde.deserialize_model(onnx.load(path))
        options = prune.PruneOptions(
            sparsity=0.5,
            allocation=allocation,
            steps=8,
            max_amount=0.875,
            exclude=["*pooler*"],
            outputs=["last_hidden_state"],
        )
        rewrite = prune.PrunePass(options)
        rewrite.context = PassContext(calibration=[inputs])
        pruned = run(rewrite(model).model, inputs)["last_hidden_state"]
        cosine[allocation] = verify.pooled_cosine(dense, pruned, inputs["attention_mask"]).mean()
    # Measured (benchmarks/prune.py, grid 1/32): rd 0.79, uniform 0.74; 0.02 of margin.
    assert cosine["rd"] > cosine["uniform"] + 0.02


def test_plot_writes_the_curves_as_a_png(tmp_path) -> None:
    run_pass(mlp_model(), sparsity=0.5, plot=str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_curves_of_a_model_with_external_data(tmp_path, monkeypatch) -> None:
    # The probe's sessions get the model as bytes whose dense initializers (the LM head)
    # are references into its external-data file: ONNX Runtime must look for that file in
    # the model's folder, not in the working directory.
    from rewriter import io

    io.save(mlp_model(lm_head=24), tmp_path / "mlp.onnx", external_data=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = io.load(tmp_path / "mlp.onnx")
    assert io.external_data_dir(loaded) == tmp_path
    expected = run_pass(mlp_model(lm_head=24), steps=8)
    result = run_pass(loaded, steps=8)
    assert result.tables["layers"] == expected.tables["layers"]
