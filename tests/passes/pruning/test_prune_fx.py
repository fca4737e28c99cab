"""Tests of the torch front of pruning (rewriter.passes.pruning.prune_torch, prune_width_torch, fx): masks in place, Linear modules rebuilt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewriter.errors import InputError
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning import prune_torch, prune_width_torch
from rewriter.passes.pruning.prune import PruneOptions
from rewriter.passes.pruning.prune_2to4 import Prune2to4Options
from rewriter.passes.pruning.prune_width import PruneWidthOptions


class Glu(torch.nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, h, bias=False)
        self.up_proj = torch.nn.Linear(d, h, bias=False)
        self.down_proj = torch.nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Net(torch.nn.Module):
    """Two GLU blocks with residuals, an untraceable outer forward (data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([Glu(), Glu()])
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        if x.sum() > 1e9:  # not traceable by symbolic_trace
            x = x * 0
        return self.head(x)


def batch() -> tuple[torch.Tensor]:
    return (torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1)),)


def linear_weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {
        n: m.weight.detach().numpy().copy()
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


@pytest.mark.parametrize("allocation", ["rd", "uniform", "global-magnitude"])
def test_prune_module_reaches_the_sparsity(allocation: str) -> None:
    net = Net()
    before = linear_weights(net)
    report = prune_torch.prune_module(
        net, [batch()], PruneOptions(sparsity=0.5, allocation=allocation)
    )
    after = linear_weights(net)
    total = sum(w.size for w in before.values())
    zeroed = sum(int(np.count_nonzero(w == 0)) for w in after.values())
    assert report.stats["params_total"] == total and report.stats["params_zeroed"] == zeroed
    assert abs(zeroed / total - 0.5) <= 1 / 32
    for name, weight in after.items():
        np.testing.assert_array_equal(weight[weight != 0], before[name][weight != 0])


def test_prune_module_rd_matches_the_onnx_arithmetic() -> None:
    """The torch curves feed the same DP: the allocation is the DP's on those curves."""
    net = Net()
    layers, _ = prune_torch.prunable_modules(net)
    amounts = pruning.amount_grid(0.95, 32)
    curves = prune_torch._curves(net, layers, amounts, [batch()], "mse")
    assert curves[:, 0].tolist() == [0.0] * len(layers)
    assert np.all(np.diff(pruning.monotone(curves), axis=1) >= 0)
    expected = pruning.allocate_rd(
        pruning.monotone(curves), [m.weight.numel() for _, m in layers], amounts, 0.5
    )
    report = prune_torch.prune_module(net, [batch()], PruneOptions(sparsity=0.5))
    assert report.stats["params_zeroed"] == sum(expected.counts)


def test_prune_module_restores_weights_while_measuring_and_excludes() -> None:
    net = Net()
    report = prune_torch.prune_module(net, [batch()], PruneOptions(sparsity=0.0, exclude=["head"]))
    assert report.stats["params_zeroed"] == 0
    assert "layer head: excluded by name" in report.notes
    with pytest.raises(InputError, match="calibration"):
        prune_torch.prune_module(net, [], PruneOptions())


def test_two_four_in_place() -> None:
    net = Net()
    before = linear_weights(net)
    report = prune_torch.prune_2to4_module(net, Prune2to4Options(exclude=["head"]))
    assert report.stats == {
        "layers_sparsified": 6,
        "layers_skipped": 0,
        "params_total": 6 * 128,
        "params_zeroed": 6 * 64,
    }
    for name, weight in linear_weights(net).items():
        if name == "head":
            np.testing.assert_array_equal(weight, before[name])
            continue
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert (np.count_nonzero(groups, axis=-1) == 2).all()
        np.testing.assert_array_equal(weight != 0, pruning.two_four_mask(before[name], 1))
    again = prune_torch.prune_2to4_module(net, Prune2to4Options(exclude=["head"]))
    assert again.stats["params_zeroed"] == report.stats["params_zeroed"]


def test_width_rebuilds_linears_in_untraceable_models() -> None:
    net = Net()
    x = batch()[0]
    block = net.blocks[0]
    scores = block.gate_proj.weight.abs().amax(1) + block.up_proj.weight.abs().amax(1)
    keep = torch.sort(torch.argsort(scores, descending=True)[:8]).values
    with torch.no_grad():
        expected = block.down_proj.weight[:, keep] @ (
            torch.nn.functional.silu(block.gate_proj.weight[keep] @ x[0, 0])
            * (block.up_proj.weight[keep] @ x[0, 0])
        )
    report = prune_width_torch.prune_width_module(net, PruneWidthOptions(ratio=0.5))
    assert report.stats == {
        "glu_pruned": 2,
        "mlp_pruned": 0,
        "channels_before": 32,
        "channels_after": 16,
        "params_removed": 2 * 3 * 8 * 8,
    }
    assert net.blocks[0].gate_proj.weight.shape == (8, 8) and net.blocks[
        1
    ].down_proj.weight.shape == (8, 8)
    with torch.no_grad():
        # float32, 8-term dot products: 1e-6 absolute on values of order 1.
        torch.testing.assert_close(net.blocks[0](x)[0, 0], expected, rtol=0, atol=1e-5)
        assert net(x).shape == (4, 3, 4)


def test_width_plain_mlp_in_sequential_and_near_miss() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    report = prune_width_torch.prune_width_module(mlp, PruneWidthOptions(ratio=0.25))
    assert report.stats["mlp_pruned"] == 1 and mlp[0].out_features == 6 and mlp[2].in_features == 6
    assert mlp(torch.randn(2, 4)).shape == (2, 4)
    # No activation between the Linears: nothing to prune, nothing changed.
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    assert (
        prune_width_torch.prune_width_module(plain, PruneWidthOptions(ratio=0.5)).stats["mlp_pruned"]
        == 0
    )
    assert plain[0].out_features == 8


def test_width_on_transformers_llama() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    report = prune_width_torch.prune_width_module(model, PruneWidthOptions(ratio=0.25))
    assert report.stats["glu_pruned"] == 2 and report.stats["channels_after"] == 2 * 48
    assert model.model.layers[0].mlp.down_proj.in_features == 48
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    assert pruned.shape == dense.shape and torch.isfinite(pruned).all()
    # The LM head shares nothing with width pruning, and unstructured pruning leaves it dense.
    layers, notes = prune_torch.prunable_modules(model)
    assert "lm_head" not in [name for name, _ in layers]


class Traceable(torch.nn.Module):
    """Two GLU blocks with residuals, traceable by symbolic_trace."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([Glu(), Glu()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_fx_front_runs_the_passes_by_name_and_leaves_the_model_alone() -> None:
    from rewriter import fx as fx_front

    model = Traceable()
    before = linear_weights(model)
    gm, report = fx_front.rewrite(model, "prune-width(ratio=0.5),prune-2to4", batch())
    width, two_four = report.passes
    assert width.stats["glu_pruned"] == 2 and width.modified
    assert two_four.stats["layers_sparsified"] == 6 and two_four.modified
    assert gm.get_submodule("blocks.0.down_proj").in_features == 8
    assert (gm.get_submodule("blocks.1.up_proj").weight.reshape(8, -1, 4) != 0).sum(-1).max() == 2
    for name, weight in linear_weights(model).items():  # the traced model is untouched
        np.testing.assert_array_equal(weight, before[name])
    assert report.verification is not None and not report.verification.enforced
    _, report = fx_front.rewrite(model, "prune(sparsity=0.5,allocation=uniform)", batch())
    assert report.passes[0].stats["params_zeroed"] == 6 * 128 // 2
    for name, weight in linear_weights(model).items():
        np.testing.assert_array_equal(weight, before[name])
    with pytest.raises(InputError, match="calibration"):
        fx_front.rewrite(model, "prune", batch())
