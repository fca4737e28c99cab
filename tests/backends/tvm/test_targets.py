"""Target presets, ``native`` and the features they record (:mod:`rewriter.backends.tvm.targets`)."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from rewriter.backends.tvm import cpu_features, targets  # noqa: E402
from rewriter.errors import InputError  # noqa: E402
from tests.backends.tvm.test_cpu_features import SPR_GUEST  # noqa: E402


def _features(target: dict | str) -> set[str]:
    resolved = targets.resolve(target) if isinstance(target, str) else tvm.target.Target(target)
    return set(cpu_features.target_features(resolved))


def test_cpu_presets_enable_what_their_cpu_has():
    spr, zen4, avx512 = _features("sapphirerapids"), _features("zen4"), _features("avx512")
    assert {"avx512fp16", "amx-int8", "amx-bf16", "movdir64b", "avx512bf16", "avx512vnni"} <= spr
    assert {"avx512bf16", "avx512vnni", "avx512f"} <= zen4
    assert not {"amx-tile", "movdir64b", "avx512fp16"} & zen4
    # The portable preset: what both have, nothing either lacks.
    assert {"avx512bf16", "avx512vnni"} <= avx512 and not {
        "movdir64b",
        "amx-tile",
        "sse4a",
    } & avx512
    assert targets.resolve("zen4").attrs["mcpu"] == "znver4"


def test_feature_table_covers_every_instruction_set_feature_of_the_presets():
    """Every SSE/AVX/AMX/MOVDIR64B feature a preset enables is checked at load."""
    for preset in ("sapphirerapids", "zen4", "avx512", "avx2", "native"):
        for feature in _features(preset):
            if feature.startswith(("sse", "avx", "amx", "movdir64b", "fma", "bmi", "f16c")):
                assert feature in cpu_features.LLVM_TO_FLAG, (preset, feature)


def test_native_takes_the_features_from_the_flags_not_the_name():
    """A KVM guest named rocketlake whose flags show AMX and MOVDIR64B; and a CPU named
    sapphirerapids whose flags lack AVX-512: the flags win both times."""
    guest = _features(targets.native_dict(SPR_GUEST, "rocketlake"))
    assert {"amx-int8", "amx-bf16", "avx512fp16", "movdir64b", "avx512bf16"} <= guest
    assert cpu_features.missing(guest, SPR_GUEST) == []
    no_avx512 = SPR_GUEST - {flag for flag in SPR_GUEST if flag.startswith(("avx512", "amx"))}
    crippled = _features(targets.native_dict(no_avx512, "sapphirerapids"))
    assert "avx2" in crippled and not any(f.startswith(("avx512", "amx")) for f in crippled)
    assert targets.native_dict(SPR_GUEST, "rocketlake")["mcpu"] == "rocketlake"


def test_schedules_are_tuned_for_the_named_cpu_or_for_the_host_that_runs_the_level():
    """A preset naming a CPU is tuned for it; ``avx512`` (an ISA level) for the compiling
    host where that host runs its code, else for the level (the schedules' defaults)."""
    assert targets.tuned_cpu(targets.resolve("zen4"), host="emeraldrapids") == "znver4"
    assert targets.tuned_cpu(targets.resolve("avx2"), host="emeraldrapids") == "haswell"
    avx512 = targets.resolve("avx512")
    assert targets.tuned_cpu(avx512, host="emeraldrapids", flags=SPR_GUEST) == "emeraldrapids"
    no_avx512 = frozenset(flag for flag in SPR_GUEST if not flag.startswith(("avx512", "amx")))
    assert targets.tuned_cpu(avx512, host="alderlake", flags=no_avx512) == "x86-64-v4"
    assert targets.tuned_cpu(targets.resolve("cuda")) == ""


def test_native_without_flags_is_an_input_error():
    with pytest.raises(InputError, match="native: cannot read this CPU's features"):
        targets.native_dict(frozenset(), "rocketlake")


def test_native_on_this_host_needs_nothing_it_lacks():
    if cpu_features.host_flags() is None:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    native = _features("native")
    assert cpu_features.missing(native) == []
    assert set(cpu_features.host_features()) <= native


def test_cli_offers_every_preset():
    from rewriter import cli

    parser = cli.build_parser()
    choices = next(
        action.choices for action in parser._actions if "--target" in action.option_strings
    )
    assert set(choices) == set(targets.PRESETS)
