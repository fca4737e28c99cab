"""Fault cases about files: what the tool reads is never written, outputs are all or nothing,
external data stays in the model's folder, interrupted and killed runs leave nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter import io, staging
from rewriter.errors import InputError
from tests.faults import (
    assert_refused,
    attention_like,
    run_cli,
    same_code_env,
    set_external_data,
    snapshot,
)

PASSES = ["--passes", "two-pass-softmax"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working folder holding m.onnx, inputs.npz, calibration.npz and p.toml (the cwd)."""
    monkeypatch.chdir(tmp_path)
    attention_like(tmp_path / "m.onnx")
    np.savez(tmp_path / "inputs.npz", x=np.ones((2, 16), np.float32))
    np.savez(tmp_path / "calibration.npz", x=np.ones((2, 16), np.float32))
    (tmp_path / "p.toml").write_text('[[pass]]\nname = "two-pass-softmax"\n')
    (tmp_path / "sub").mkdir()
    return tmp_path


# --- a write never lands on a read, nor on another write -------------------------------


def test_output_data_file_never_replaces_the_inputs_external_data(tmp_path, monkeypatch, capsys):
    # mv model.onnx orig.onnx; rewrite orig.onnx -o model.onnx: the data keeps its old name.
    monkeypatch.chdir(tmp_path)
    attention_like(tmp_path / "orig.onnx", location="model.onnx.data")
    before = snapshot(tmp_path)
    code, lines = run_cli(["orig.onnx", *PASSES, "-o", "model.onnx"], capsys)
    assert_refused(code, lines, r"model\.onnx\.data.*external.data.*another output name")
    assert snapshot(tmp_path) == before


def test_output_named_like_the_inputs_external_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    attention_like(tmp_path / "m.onnx", location="m.onnx.data")
    before = snapshot(tmp_path)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "m.onnx.data"], capsys)
    assert_refused(code, lines, r"m\.onnx\.data: the output model would overwrite the input's external data")
    assert snapshot(tmp_path) == before


def test_force_never_allows_replacing_external_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    attention_like(tmp_path / "m.onnx", location="m.onnx.data")
    before = snapshot(tmp_path)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "m.onnx", "--force"], capsys)
    assert_refused(code, lines, r"external-data file would overwrite the input's external data")
    assert snapshot(tmp_path) == before


def _link(folder: Path) -> None:
    (folder / "link.json").symlink_to("m.onnx")
    os.link(folder / "m.onnx", folder / "hard.onnx")


OVERLAPS = {
    "report on the model": (["--report-json", "m.onnx"], r"--report-json would overwrite the input model"),
    "report on the model via ..": (["--report-json", "sub/../m.onnx"], "would overwrite the input model"),
    "report on the model via a symlink": (["--report-json", "link.json"], "would overwrite the input model"),
    "report on the model via a hard link": (["--report-json", "hard.onnx"], "would overwrite the input model"),
    "library on the model": (["--target", "llvm", "--lib", "m.onnx"], "--lib would overwrite the input model"),
    "library metadata on the model": (
        ["--target", "llvm", "--lib", "m"],
        "m.onnx: the library's metadata would overwrite",
    ),
    "report on --inputs": (["--inputs", "inputs.npz", "--report-json", "inputs.npz"], "would overwrite --inputs"),
    "output on --inputs": (["--inputs", "inputs.npz", "-o", "inputs.npz"], "output model would overwrite --inputs"),
    "report on --calibration": (
        ["--calibration", "calibration.npz", "--report-json", "calibration.npz"],
        "would overwrite --calibration",
    ),
    "plot on the model": (["--passes", "quantize(bits=8)", "--plot", "m.onnx"], "plot of quantize would overwrite"),
    "report on the output": (["--report-json", "o.onnx"], "the output model and --report-json would be the same"),
    "library on the output's data": (
        ["--target", "llvm", "--lib", "o.onnx.data"],
        "external-data file and --lib would be the same",
    ),
    "report on the library metadata": (
        ["--target", "llvm", "--lib", "x.so", "--report-json", "x.so.json"],
        "metadata and --report-json would be the same",
    ),
}


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_no_write_lands_on_a_read_or_another_write(case, folder, capsys):
    _link(folder)
    options, message = OVERLAPS[case]
    passes = [] if "--passes" in options else PASSES
    argv = ["m.onnx", *passes, "-o", "o.onnx", *options]
    if case == "library metadata on the model":  # --lib m writes m.json; make the model m.json
        (folder / "m.onnx").rename(folder / "m.json")
        argv[0] = "m.json"
        message = "m.json: the library's metadata would overwrite the input model"
    before = snapshot(folder)
    code, lines = run_cli(argv, capsys)
    assert_refused(code, lines, message)
    assert snapshot(folder) == before


def test_report_on_the_pipeline_file(folder, capsys):
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", "--pipeline", "p.toml", "-o", "o.onnx", "--report-json", "p.toml"], capsys)
    assert_refused(code, lines, "--report-json would overwrite --pipeline")
    assert snapshot(folder) == before


# --- output locations are checked before any work --------------------------------------


def test_missing_report_folder_is_refused_before_the_model_is_written(folder, capsys):
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "nodir/r.json"], capsys)
    assert_refused(code, lines, "nodir: output folder of --report-json does not exist")
    assert snapshot(folder) == before


@pytest.mark.parametrize("output", ["newdir/", "sub/", "sub", ".", "..", ""])
def test_output_that_names_a_folder(output, folder, capsys):
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", output], capsys)
    assert_refused(code, lines, "must be a file name|is a folder|an output path is required")
    assert snapshot(folder) == before  # no file 'newdir'


def test_library_that_is_a_folder(folder, capsys):
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--target", "llvm", "--lib", "sub"], capsys)
    assert_refused(code, lines, "sub: --lib is a folder")
    assert snapshot(folder) == before


def test_output_that_is_not_a_regular_file(folder, capsys):
    os.mkfifo(folder / "fifo")
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "fifo"], capsys)
    assert_refused(code, lines, "fifo: --report-json exists and is not a regular file")
    assert snapshot(folder) == before


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot create files in (as root: /sys, where even root cannot)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        yield locked
        locked.chmod(0o755)
        return
    try:
        os.mkdir("/sys/rewriter-probe")
    except OSError:
        yield Path("/sys")
    else:
        os.rmdir("/sys/rewriter-probe")
        pytest.skip("no folder here refuses writes to root")


def test_unwritable_output_folder_is_refused_before_any_work(folder, unwritable_folder, capsys):
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", unwritable_folder / "o.onnx"], capsys)
    assert_refused(code, lines, f"{unwritable_folder}: (output folder of the output model is not writable|cannot write)")
    assert snapshot(folder) == before


# --- all outputs or none ----------------------------------------------------------------


def test_a_failure_after_the_model_is_written_leaves_no_output(folder, capsys, monkeypatch):
    from rewriter.job import Report

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Report, "to_json", full_disk)
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "r.json"], capsys)
    assert code == 1 and len(lines) == 1 and "No space left" in lines[0]
    assert snapshot(folder) == before


def test_a_failed_rename_puts_back_what_was_placed(folder, capsys, monkeypatch):
    (folder / "o.onnx").write_bytes(b"previous model")
    (folder / "r.json").write_text("previous report")
    before = snapshot(folder)
    renames = []
    real_replace = os.replace

    def flaky_replace(source, destination):
        renames.append(Path(destination).name)
        if Path(destination).name == "r.json" and len(renames) == 2:  # the second output
            raise OSError(5, "Input/output error")
        return real_replace(source, destination)

    monkeypatch.setattr(staging.os, "replace", flaky_replace)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "r.json"], capsys)
    assert code == 1 and "Input/output error" in lines[-1]
    assert renames[:2] == ["o.onnx", "r.json"]
    assert snapshot(folder) == before  # o.onnx restored from its hard link


# --- stage folders: recognised, and removed once their run is dead ---------------------


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _stage(folder: Path, name: str, *, age: float) -> Path:
    stage = folder / name
    stage.mkdir()
    (stage / "o.onnx.data").write_bytes(b"x" * 100)
    old = time.time() - age
    for path in (stage / "o.onnx.data", stage):
        os.utime(path, (old, old))
    return stage


def test_a_later_run_removes_stale_stage_folders_of_dead_runs(folder, capsys):
    dead = _dead_pid()
    stale = _stage(folder, f".o.onnx.rewriter-stage-{dead}-abc123", age=3600)
    running = _stage(folder, f".o.onnx.rewriter-stage-{os.getpid()}-def456", age=3600)
    recent = _stage(folder, f".o.onnx.rewriter-stage-{dead}-ghi789", age=0)
    foreign = _stage(folder, ".o.onnx.someone-elses-12", age=3600)
    assert run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "-q"], capsys)[0] == 0
    assert not stale.exists()
    assert running.exists() and recent.exists() and foreign.exists()
    assert not [p for p in folder.iterdir() if staging.STAGE_MARK in p.name and p not in (running, recent)]


# --- interrupts ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def default_sigint():
    """Each test starts with Python's own SIGINT handler, whatever an earlier test or
    library left, and gets it back after (the interrupt tests raise real SIGINTs)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _signal_after_writing(monkeypatch: pytest.MonkeyPatch, signum: int) -> None:
    """``signum`` raised in this process right after the first staged output is written."""
    real_write = io.write

    def write_then_signal(*args, **kwargs):
        real_write(*args, **kwargs)
        signal.raise_signal(signum)

    monkeypatch.setattr(io, "write", write_then_signal)


def test_a_stale_python_handler_is_replaced_for_the_write(folder, capsys, monkeypatch):
    """A Python SIGINT handler left by a library or an earlier run still lets the write be
    interrupted cleanly: ours takes over for the write and gives that one back after."""

    def left_behind(signum, frame):
        raise RuntimeError("the stale handler ran")

    signal.signal(signal.SIGINT, left_behind)
    _signal_after_writing(monkeypatch, signal.SIGINT)
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx"], capsys)
    assert code == 130 and lines == ["rewrite: interrupted; nothing written"]
    assert snapshot(folder) == before
    assert signal.getsignal(signal.SIGINT) is left_behind


def test_an_interrupt_swallowed_during_the_write_still_stops_the_run(folder, capsys, monkeypatch):
    """C code that checks for signals may swallow the KeyboardInterrupt; the run must
    still end with 130 and nothing written."""
    real_write = io.write

    def write_then_interrupt(*args, **kwargs):
        real_write(*args, **kwargs)
        with contextlib.suppress(KeyboardInterrupt):  # swallowed, as some C extensions do
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(io, "write", write_then_interrupt)
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "r.json"], capsys)
    assert code == 130 and lines == ["rewrite: interrupted; nothing written"]
    assert snapshot(folder) == before


def test_an_interrupt_during_the_renames_undoes_them(folder, capsys, monkeypatch):
    (folder / "r.json").write_text("previous report")
    before = snapshot(folder)
    real_replace = os.replace
    calls = []

    def interrupted_replace(source, destination):
        calls.append(destination)
        if Path(destination).name == "r.json":  # the model is in place by now
            signal.raise_signal(signal.SIGINT)
        return real_replace(source, destination)

    monkeypatch.setattr(staging.os, "replace", interrupted_replace)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "r.json"], capsys)
    assert code == 130 and lines == ["rewrite: interrupted; nothing written"]
    assert snapshot(folder) == before


def test_an_interrupt_during_verification(folder, capsys, monkeypatch):
    from rewriter import verify

    real_run = verify.run

    def interrupted_run(model, feeds):
        if str(model).endswith("o.onnx"):  # the staged rewritten model
            signal.raise_signal(signal.SIGINT)
        return real_run(model, feeds)

    monkeypatch.setattr(verify, "run", interrupted_run)
    before = snapshot(folder)
    code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx"], capsys)
    assert code == 130 and lines == ["rewrite: interrupted; nothing written"]
    assert snapshot(folder) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_during_the_write_is_an_interrupt(folder, capsys, monkeypatch):
    """SIGTERM stops the run like Ctrl-C: exit 143, one line, nothing written, and the
    SIGTERM handler given back after."""

    def unhandled(signum, frame):  # the test's own guard: Python's default would kill pytest
        raise RuntimeError("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    _signal_after_writing(monkeypatch, signal.SIGTERM)
    before = snapshot(folder)
    try:
        code, lines = run_cli(["m.onnx", *PASSES, "-o", "o.onnx", "--report-json", "r.json"], capsys)
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and lines == ["rewrite: terminated; nothing written"]
    assert snapshot(folder) == before


def _rewrite_process(folder: Path, hook: str) -> subprocess.Popen[str]:
    """``rewrite m.onnx --passes two-pass-softmax -o o.onnx`` through the console script's
    entry (``rewriter.entry.main``) in a child Python that runs ``hook`` first; the hook
    prints a line when the child is where the test wants to signal it."""
    code = "\n".join(
        [
            "import sys, time",
            "from rewriter import entry",
            hook,
            "sys.exit(entry.main(['m.onnx', '--passes', 'two-pass-softmax', '-o', 'o.onnx']))",
        ]
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=folder, env=same_code_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# Blocks the first import of the CLI (the second or so that onnx and onnx-ir take).
_BLOCK_IMPORT = """
assert "rewriter.cli" not in sys.modules and "onnx" not in sys.modules  # the entry is light
class Blocking:
    def find_spec(self, name, path=None, target=None):
        if name == "rewriter.cli":
            print("importing", flush=True)
            time.sleep(60)
sys.meta_path.insert(0, Blocking())
"""


@pytest.mark.parametrize(
    "signum,code,line",
    [
        (signal.SIGINT, 130, "rewrite: interrupted; nothing written"),
        (signal.SIGTERM, 143, "rewrite: terminated; nothing written"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_while_the_cli_is_imported(signum, code, line, folder):
    """The first second of a run is spent importing: a signal there was a 30-line
    KeyboardInterrupt traceback (SIGINT) or a silent death (SIGTERM)."""
    child = _rewrite_process(folder, _BLOCK_IMPORT)
    assert child.stdout is not None and child.stdout.readline() == "importing\n"
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == code and err.strip().splitlines() == [line], err


def test_sigterm_to_a_running_process_leaves_no_stage_folder(folder):
    """A real SIGTERM while the staged model waits for the commit (it left an 80 MB stage
    folder behind, the process killed by the signal)."""
    hook = "\n".join(
        [
            "from rewriter import io",
            "real_write = io.write",
            "def write_and_wait(*args, **kwargs):",
            "    real_write(*args, **kwargs)",
            "    print('written', flush=True)",
            "    time.sleep(60)",
            "io.write = write_and_wait",
        ]
    )
    before = snapshot(folder)
    child = _rewrite_process(folder, hook)
    assert child.stdout is not None and child.stdout.readline() == "written\n"
    assert [p for p in folder.iterdir() if staging.STAGE_MARK in p.name]
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143 and err.strip().splitlines() == ["rewrite: terminated; nothing written"], err
    assert snapshot(folder) == before


# --- file names -----------------------------------------------------------------------------


def _odd(name: str, byte: bytes) -> str:
    """``name`` followed by a byte that is not UTF-8, as Python spells such a file name."""
    return os.fsdecode(name.encode() + byte)


@pytest.mark.parametrize(
    "folder_name,model,output,location",
    [
        ("d", _odd("in_", b"\xff") + ".onnx", "o.onnx", None),
        ("d", "m.onnx", _odd("o_", b"\xfe") + ".onnx", None),
        (_odd("d_", b"\xfd"), _odd("in_", b"\xff") + ".onnx", _odd("o_", b"\xfe") + ".onnx", None),
        ("d", _odd("in_", b"\xff") + ".onnx", "o.onnx", "w.data"),
        (_odd("d_", b"\xfd"), "m.onnx", "o.onnx", "w.data"),
    ],
    ids=["input", "output", "folder", "input with external data", "folder with external data"],
)
def test_file_names_that_are_not_utf8(folder_name, model, output, location, tmp_path, capsys):
    """A Linux file name is bytes; one that is not UTF-8 reaches Python as a str with
    surrogates, which onnx.checker and ONNX Runtime refuse as an argument: a valid model
    was 'invalid' (exit 2) and a valid output 'failed the checker' (exit 1)."""
    attention_like(tmp_path / "m.onnx", location=location)  # built under UTF-8 names
    folder = tmp_path / folder_name
    folder.mkdir()
    for name in ["m.onnx", location]:
        if name:
            os.rename(tmp_path / name, folder / (model if name == "m.onnx" else name))
    before = snapshot(folder)
    code, lines = run_cli([folder / model, *PASSES, "-o", folder / output, "-q"], capsys)
    assert code == 0, lines
    assert snapshot(folder).items() >= before.items()
    assert not [p for p in folder.iterdir() if staging.STAGE_MARK in p.name]
    io.check_model(folder / output)


def test_external_data_named_after_an_output_that_is_not_utf8(tmp_path):
    """ONNX stores a data file's name as UTF-8 text: OUT.onnx.data cannot be named after
    such an output, and the run says so (exit 2, nothing written). In a child process:
    its stderr escapes the name's odd byte, pytest's capture would refuse it."""
    attention_like(tmp_path / "m.onnx", location="w.data")
    before = snapshot(tmp_path)
    argv = ["m.onnx", *PASSES, "-o", _odd("o_", b"\xfe") + ".onnx"]
    done = subprocess.run(
        [sys.executable, "-m", "rewriter.entry", *argv], cwd=tmp_path, env=same_code_env(),
        capture_output=True, text=True, errors="backslashreplace", check=False,
    )
    lines = done.stderr.strip().splitlines()
    assert_refused(done.returncode, lines, r"o_\\udcfe\.onnx\.data, and ONNX stores that name as UTF-8 text")
    assert snapshot(tmp_path) == before


# --- external data stays in the model's folder ---------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A model folder and, beside it, a secret file the model must never reach."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"s" * 4096)
    (tmp_path / "models").mkdir()
    return tmp_path / "models", secret


def _record_stats(monkeypatch, under: Path) -> list[str]:
    """Record every os.stat / os.lstat / os.open of a path under ``under``."""
    seen: list[str] = []
    for name in ("stat", "lstat", "open"):
        real = getattr(os, name)

        def spy(path, *args, _real=real, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(str(under)):
                seen.append(os.fspath(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    return seen


def _escape(models: Path, secret: Path, how: str) -> Path:
    model = attention_like(models / "m.onnx", location="w.bin")
    (models / "w.bin").unlink()
    if how == "absolute":
        set_external_data(model, location=str(secret))
    elif how == "dotdot":
        set_external_data(model, location="../outside/secret.bin")
    elif how == "symlink":
        (models / "w.bin").symlink_to("../outside/secret.bin")
    elif how == "absolute symlink":
        (models / "w.bin").symlink_to(secret)
    elif how == "symlinked folder":
        (models / "weights").symlink_to(secret.parent)
        set_external_data(model, location="weights/secret.bin")
    return model


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "absolute symlink", "symlinked folder"])
def test_external_data_outside_the_model_folder_is_never_touched(how, outside, capsys, monkeypatch):
    models, secret = outside
    model = _escape(models, secret, how)
    seen = _record_stats(monkeypatch, secret.parent)
    code, lines = run_cli([model, *PASSES, "-o", models / "o.onnx", "--no-verify"], capsys)
    monkeypatch.undo()
    assert_refused(code, lines, "external data of tensor 'w': .*(absolute|outside|out of)")
    assert "4096" not in lines[0]  # nothing about the file leaks
    assert seen == []
    assert not (models / "o.onnx").exists()


def test_load_refuses_external_data_outside_the_folder(outside, monkeypatch):
    models, secret = outside
    model = _escape(models, secret, "dotdot")
    seen = _record_stats(monkeypatch, secret.parent)
    with pytest.raises(InputError, match="outside the model's folder"):
        io.load(model)
    assert seen == []


@pytest.mark.parametrize(
    "entries,message",
    [
        ({"offset": "abc"}, "offset 'abc' is not a byte count"),
        ({"offset": "-4"}, "offset '-4' is not a byte count"),
        ({"length": "1e3"}, "length '1e3' is not a byte count"),
        ({"length": "100"}, r"length 100 does not match its shape \[16, 16\] and type \(1024 bytes\)"),
        ({"length": "2048"}, r"length 2048 does not match"),
    ],
)
@pytest.mark.parametrize("verify_flag", [[], ["--no-verify"]])
def test_bad_external_data_entries(entries, message, verify_flag, tmp_path, capsys):
    model = attention_like(tmp_path / "m.onnx", location="w.bin")
    with open(tmp_path / "w.bin", "ab") as data:
        data.write(b"\0" * 4096)  # long enough for any of the entries
    set_external_data(model, **entries)
    code, lines = run_cli([model, *PASSES, "-o", tmp_path / "o.onnx", *verify_flag], capsys)
    assert_refused(code, lines, message)
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_in_a_subfolder_is_fine(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    model = attention_like(tmp_path / "m.onnx", location="weights/w.bin")
    code, _ = run_cli([model, *PASSES, "-o", tmp_path / "o.onnx", "-q"], capsys)
    assert code == 0
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
