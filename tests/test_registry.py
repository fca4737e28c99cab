"""The registry, pipeline parsing and the pass manager."""

from __future__ import annotations

import pytest

from rewriter import registry
from rewriter.errors import InputError
from rewriter.manager import run_pipeline
from tests.helpers import softmax_model


def test_parse_pipeline_with_options():
    (p,) = registry.parse_pipeline("two-pass-softmax(log_softmax=false)")
    assert p.name == "two-pass-softmax" and p.options.log_softmax is False


def test_parse_several_passes():
    passes = registry.parse_pipeline(" two-pass-softmax , two-pass-softmax(log_softmax=1)")
    assert [p.name for p in passes] == ["two-pass-softmax", "two-pass-softmax"]
    assert passes[1].options.log_softmax is True


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "no passes"),
        ("nope", "unknown pass 'nope'"),
        ("two-pass-softmax(x=1)", "has no option 'x'"),
        ("two-pass-softmax(log_softmax)", "is not key=value"),
        ("two-pass-softmax(log_softmax=2)", "expects bool"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(InputError, match=message):
        registry.parse_pipeline(spec)


def test_toml_pipeline(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[pass]]\nname = "two-pass-softmax"\noptions = { log_softmax = false }\n')
    (p,) = registry.load_pipeline(path)
    assert p.options.log_softmax is False
    path.write_text("[[pass]]\noptions = {}\n")
    with pytest.raises(InputError, match="needs a name"):
        registry.load_pipeline(path)
    path.write_text("not toml [")
    with pytest.raises(InputError, match="not a valid TOML"):
        registry.load_pipeline(path)


def test_manager_times_each_pass_and_merges_stats():
    model = softmax_model()
    result = run_pipeline(model, registry.parse_pipeline("two-pass-softmax,two-pass-softmax"))
    assert [r.stats["softmax_replaced"] for r in result.records] == [1, 0]
    assert result.stats["softmax_replaced"] == 1
    assert all(r.seconds >= 0 for r in result.records) and result.exact
