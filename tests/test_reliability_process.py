"""The process around a command (issue 19 item 7): every output of a run placed together or not at all
(a model must not stay when its --report/--chart cannot be written, and the other way round), every
catchable terminating signal cleans up, a SIGKILL'd run's temp file is removed by the next run, and an
input truncated while it is read stops the run with exit 2 instead of a SIGBUS.

Signals and truncation run the real CLI in a subprocess whose progress hook pauses the command in the
middle (the temp file exists, inputs are mapped), so the signal or the truncation lands mid-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability_cases import assert_actionable
from safetensors.torch import save_file

from weightsmith.cli import main as cli_main
from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict


@dataclass
class Work:
    dir: Path
    base: Path
    tuned: Path
    other: Path
    lora: Path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    d = tmp_path_factory.mktemp("reliability_process")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    paths = []
    for name, sd in (("base", base), ("tuned", finetune(base, seed=2, rank=4, scale=0.05)),
                     ("other", finetune(base, seed=3, rank=4, scale=0.05))):
        paths.append(d / f"{name}.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(paths[-1]))
    lora = random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=8, seed=5, targets=flux_block_linears)
    save_lora(lora, d / "lora.safetensors", fmt="comfy")
    return Work(d, *paths, d / "lora.safetensors")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _copy_inputs(work: Work, folder: Path) -> Work:
    """Private copies of the inputs (a test that truncates or signals must not touch the shared ones)."""
    folder.mkdir(exist_ok=True)
    copies = [shutil.copy(p, folder / p.name) for p in (work.base, work.tuned, work.other, work.lora)]
    return Work(folder, *map(Path, copies))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# All outputs of a run together, or none

_ARGV = {
    "merge": lambda w, out, rep: ["merge", w.base, w.tuned, "-o", out, "--report", rep],
    "mix": lambda w, out, rep: ["mix", w.base, w.tuned, w.other, "-o", out, "--report", rep],
    "extract": lambda w, out, rep: ["extract", w.base, w.tuned, "--rank", "4", "-o", out, "--report", rep],
    "validate": lambda w, out, rep: ["validate", w.base, w.tuned, w.lora, "--report", rep, "--chart", out],
    "compose": lambda w, out, rep: ["compose", w.lora, f"{w.lora}:0.5", "-o", out, "--report", rep],
    "rerank": lambda w, out, rep: ["rerank", w.lora, "--rank", "4", "-o", out, "--report", rep],
    "convert": lambda w, out, rep: ["convert", w.lora, "--to", "kohya", "-o", out, "--report", rep],
}
# What writes the first of the two outputs; right after it, the test makes the second one unwritable.
_FIRST_WRITER = {
    "merge": ("weightsmith.commands.merge", "execute_merge", "report"),
    "mix": ("weightsmith.commands.mix", "lossless_mix", "report"),
    "extract": ("weightsmith.commands.extract", "write_json", "out"),  # the report is written before the LoRA
    "validate": ("weightsmith.commands.extract", "write_json", "out"),  # report, then the chart (`out`)
    "compose": ("weightsmith.lora.formats", "save_lora", "report"),
    "rerank": ("weightsmith.lora.formats", "save_lora", "report"),
    "convert": ("weightsmith.commands.convert", "save_lora", "report"),
}


@pytest.mark.parametrize("command", list(_ARGV))
def test_an_output_that_cannot_be_placed_takes_the_runs_other_outputs_with_it(work, tmp_path, capsys, monkeypatch,
                                                                               command):
    """Another program creates the second output's path right after the first output was written (the
    late failure a read-only or full folder gives too): the run exits 2 and leaves none of its outputs."""
    import importlib

    out = tmp_path / ("chart.png" if command == "validate" else "out.safetensors")
    rep = tmp_path / "report.json"
    module_name, attr, blocked = _FIRST_WRITER[command]
    module = importlib.import_module(module_name)
    real = getattr(module, attr)
    foreign = {"out": out, "report": rep}[blocked]

    def first_then_block(*args, **kwargs):
        result = real(*args, **kwargs)
        foreign.write_bytes(b"written by another program meanwhile")
        return result

    monkeypatch.setattr(module, attr, first_then_block)
    inputs = {p: _sha(p) for p in (work.base, work.tuned, work.other, work.lora)}
    rc = cli_main([str(a) for a in _ARGV[command](work, out, rep)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: refusing to overwrite existing file"), err
    assert_actionable(err, foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name], "an output of the failed run stayed"
    assert foreign.read_bytes() == b"written by another program meanwhile"
    assert {p: _sha(p) for p in inputs} == inputs


_CAN_DROP_DAC = os.geteuid() != 0 or shutil.which("setpriv") is not None


@pytest.mark.skipif(not _CAN_DROP_DAC, reason="running as root without setpriv: a read-only folder cannot be made")
@pytest.mark.parametrize("command", ["merge", "mix", "extract", "compose"])
def test_a_read_only_report_folder_is_refused_before_any_work(work, tmp_path, command):
    """Today's bug: the model was written, then the report's temp file could not be created (a traceback)
    and the model stayed. Now the folder is checked with the other outputs, before anything is read."""
    out_dir, ro = tmp_path / "out", tmp_path / "read-only"
    out_dir.mkdir()
    ro.mkdir()
    ro.chmod(0o555)
    out, rep = out_dir / "out.safetensors", ro / "report.json"
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it, for this process only
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    argv = [str(a) for a in _ARGV[command](work, out, rep)]
    r = subprocess.run([*prefix, sys.executable, "-m", "weightsmith", *argv], capture_output=True, text=True,
                       timeout=300)
    ro.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: folder ") and "not writable" in r.stderr and "Traceback" not in r.stderr
    assert_actionable(r.stderr, ro)
    assert list(out_dir.iterdir()) == [] and list(ro.iterdir()) == []


# A tiny model pair: the merged model fits under the file size limit, the chart PNG does not.
_FULL_DISK_CHART = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from weightsmith.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(sys.argv[2:])
    print(json.dumps({"rc": rc, "stderr": err.getvalue()}))
    """
)


def test_a_chart_the_disk_cannot_hold_takes_the_model_with_it(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.randn(4, 4), "img_in.weight": torch.randn(4, 4)}, str(a))
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.randn(4, 4), "img_in.weight": torch.randn(4, 4)}, str(b))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, chart = out_dir / "m.safetensors", out_dir / "chart.png"
    r = subprocess.run([sys.executable, "-c", _FULL_DISK_CHART, "2048", "merge", str(a), str(b), "-o", str(out),
                        "--chart", str(chart)], capture_output=True, text=True, timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 2, res
    assert res["stderr"].startswith("error: could not write") and "free disk space" in res["stderr"], res
    assert list(out_dir.iterdir()) == [], "the model stayed although its chart could not be written"


# --------------------------------------------------------------------------------------------------
# Signals, SIGKILL, an input truncated mid-run: the real CLI in a subprocess, paused mid-run

_PAUSED_RUN = textwrap.dedent(
    """
    import importlib, pathlib, sys, time
    command, ready = sys.argv[1], pathlib.Path(sys.argv[2])
    module = importlib.import_module("weightsmith.commands." + ("extract" if command == "validate" else command))

    go = ready.with_suffix(".go")

    class PauseMidRun:  # stands in for the progress bar: at the second update, say so and wait for "go"
        def __init__(self, *args, **kwargs):
            self.calls = 0

        def __call__(self, done, total):
            self.calls += 1
            if self.calls == 2:
                ready.write_text("mid-run")
                deadline = time.monotonic() + 120
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)

    module.TerminalProgress = PauseMidRun
    from weightsmith.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


def _start_paused(command: str, argv: list, ready: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, command, str(ready), *map(str, argv)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"{command} never reached the middle of its run (rc {p.returncode}):\n{err}")
        time.sleep(0.05)
    return p


_RUNS = {
    "merge": lambda w, out: ["merge", w.base, w.tuned, "-o", out],
    "mix": lambda w, out: ["mix", w.base, w.tuned, w.other, "-o", out],
}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGQUIT"])
@pytest.mark.parametrize("command", list(_RUNS))
def test_a_terminating_signal_mid_run_cleans_up_and_exits_128_plus_its_number(work, tmp_path, command, sig):
    w = _copy_inputs(work, tmp_path / "in")
    inputs = {p: _sha(p) for p in (w.base, w.tuned, w.other)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    p = _start_paused(command, _RUNS[command](w, out), tmp_path / "ready")
    assert _hidden(out_dir), "the temp file should exist mid-run"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    number = getattr(signal, sig).value
    assert p.returncode == 128 + number, (p.returncode, err)
    assert f"terminated by {sig}: no output was written" in err and "Traceback" not in err, err
    assert list(out_dir.iterdir()) == [], f"left {list(out_dir.iterdir())}"
    assert {q: _sha(q) for q in inputs} == inputs


def test_a_sigkilled_runs_temp_file_is_removed_by_the_next_run(work, tmp_path):
    """SIGKILL cannot be caught: the hidden temp file stays (named with the dead pid), and the next run
    writing the same output removes it and says so."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    p = _start_paused("merge", _RUNS["merge"](work, out), tmp_path / "ready")
    p.kill()
    p.communicate(timeout=60)
    stale = _hidden(out_dir)
    assert len(stale) == 1 and f".{p.pid}-" in stale[0], stale
    r = subprocess.run([sys.executable, "-m", "weightsmith", *map(str, _RUNS["merge"](work, out))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "left by a run that was killed" in r.stderr and stale[0] in r.stderr, r.stderr
    assert [q.name for q in out_dir.iterdir()] == ["out.safetensors"]


_READERS = {
    "merge": lambda w, out: (["merge", w.base, w.tuned, "-o", out], w.tuned),
    "mix": lambda w, out: (["mix", w.base, w.tuned, w.other, "-o", out], w.tuned),
    "extract": lambda w, out: (["extract", w.base, w.tuned, "--rank", "4", "-o", out], w.tuned),
    "validate": lambda w, out: (["validate", w.base, w.tuned, w.lora, "--report", out.with_suffix(".json")], w.base),
}


@pytest.mark.parametrize("command", list(_READERS))
def test_an_input_truncated_mid_run_stops_it_with_exit_2_not_sigbus(work, tmp_path, command):
    """Today's bug: the truncated input's memory map killed the process with SIGBUS and left the temp
    file. Now the run stops with exit 2 naming the file; where the lease holds the truncation back (Linux,
    our own files), the input is not even changed."""
    w = _copy_inputs(work, tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv, victim = _READERS[command](w, out_dir / "out.safetensors")
    before = _sha(victim)
    p = _start_paused(command, argv, tmp_path / "ready")
    try:  # as `truncate -s` does it: open for writing without blocking, then cut the file
        fd = os.open(victim, os.O_WRONLY | os.O_NONBLOCK)
    except BlockingIOError:  # the reader's lease holds writers back: the run is told and stops
        truncated = False
    else:
        os.ftruncate(fd, victim.stat().st_size // 3)
        os.close(fd)
        truncated = True
    (tmp_path / "ready.go").write_text("go")  # no lease here: the size check stops the run at its next read
    _, err = p.communicate(timeout=240)
    assert p.returncode == 2, (p.returncode, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert_actionable(err, victim)
    assert list(out_dir.iterdir()) == [], f"left {list(out_dir.iterdir())}"
    if not truncated:
        assert _sha(victim) == before


def test_a_file_that_shrinks_between_reads_is_an_error_naming_it(work, tmp_path):
    """Outside the CLI (a node, the core API) no lease is taken: the source compares the file's size
    before reading, so a later read of a truncated file is a BadFileError, not a SIGBUS (in a subprocess:
    today it kills the interpreter)."""
    victim = shutil.copy(work.tuned, tmp_path / "victim.safetensors")
    script = textwrap.dedent(
        """
        import os, sys, time
        from weightsmith.errors import BadFileError
        from weightsmith.sources import open_model
        src = open_model(sys.argv[1])
        keys = src.keys()
        float(src.get(keys[0]).float().sum())
        os.truncate(sys.argv[1], 200)
        time.sleep(0.05)
        try:
            for k in keys:
                float(src.get(k).float().sum())
        except BadFileError as e:
            print("refused:", e)
        """
    )
    r = subprocess.run([sys.executable, "-c", script, str(victim)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.startswith("refused: ") and "changed while it was being read" in r.stdout, r.stdout
    assert_actionable(r.stdout, victim)
