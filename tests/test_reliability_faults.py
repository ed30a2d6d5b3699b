"""Faults while writing: a full disk (RLIMIT_FSIZE in a subprocess) at the header and in the middle of the
data for every CLI command that writes a model or a LoRA, Ctrl-C in the middle of a CLI merge or mix, an
output that appears while we write, report files aimed at an input, and the permissions of what we write.

In every case: a clear `error: …` naming the output and saying what to do, exit status 2 (130 for Ctrl-C),
no file at the output path and no temp file beside it. tests/test_io.py kills the writer itself with
SIGKILL/SIGINT/SIGTERM; here the commands go through the same writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability_cases import assert_actionable
from safetensors.torch import save_file

from weightsmith.cli import main as cli_main
from weightsmith.errors import OutputPathError
from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.safetensors_io import StreamingWriter, write_safetensors
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
    d = tmp_path_factory.mktemp("reliability_faults")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    paths = []
    for name, sd in (("base", base), ("tuned", finetune(base, seed=2, rank=4, scale=0.05)),
                     ("other", finetune(base, seed=3, rank=4, scale=0.05))):
        paths.append(d / f"{name}.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(paths[-1]))
    lora = random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=8, seed=5, targets=flux_block_linears)
    save_lora(lora, d / "lora.safetensors", fmt="comfy")
    return Work(d, *paths, d / "lora.safetensors")


# Runs several CLI commands in one process under a file size limit (the full disk); prints one JSON line each.
_FULL_DISK = textwrap.dedent(
    """
    import contextlib, io, json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from weightsmith.cli import main
    for argv in json.loads(sys.argv[2]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except BaseException as e:  # a traceback a user would see
                rc = f"{type(e).__name__}: {e}"
        print(json.dumps({"argv": argv, "rc": rc, "stderr": err.getvalue()}), flush=True)
    """
)

COMMANDS = {
    "merge": lambda w, out: ["merge", w.base, w.tuned, "-o", out],
    "mix": lambda w, out: ["mix", w.base, w.tuned, w.other, "-o", out],
    "extract": lambda w, out: ["extract", w.base, w.tuned, "--rank", "8", "-o", out],
    "compose": lambda w, out: ["compose", w.lora, f"{w.lora}:0.5", "-o", out],
    "convert": lambda w, out: ["convert", w.lora, "--to", "kohya", "-o", out],
}


@pytest.mark.parametrize("limit,where", [(4096, "header"), (96 * 1024, "data")])
def test_full_disk_gives_a_clear_error_and_leaves_nothing(work, tmp_path, limit, where):
    outs = {name: tmp_path / name / "out.safetensors" for name in COMMANDS}
    for out in outs.values():
        out.parent.mkdir()
    argvs = [[str(a) for a in COMMANDS[name](work, out)] for name, out in outs.items()]
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(limit), json.dumps(argvs)], capture_output=True,
                       text=True, timeout=300)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(COMMANDS), r.stdout + r.stderr
    for name, res in zip(outs, results):
        out = outs[name]
        assert res["rc"] == 2, f"{name} under a {where} full disk: {res['rc']}\n{res['stderr']}"
        assert res["stderr"].startswith("error: could not ") and "Traceback" not in res["stderr"], res["stderr"]
        assert_actionable(res["stderr"], out)
        assert "free disk space" in res["stderr"] or "free space" in res["stderr"]
        assert list(out.parent.iterdir()) == [], f"{name}: left {list(out.parent.iterdir())}"


class _CtrlC:
    """Stands in for TerminalProgress: Ctrl-C (KeyboardInterrupt) at the n-th progress update."""

    at = 4

    def __init__(self, desc: str, *args, **kwargs):
        self.calls = 0

    def __call__(self, done: int, total: int) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["merge", "mix", "extract"])
def test_ctrl_c_in_the_middle_of_a_command_leaves_nothing(work, tmp_path, capsys, monkeypatch, command):
    import importlib

    module = importlib.import_module(f"weightsmith.commands.{command}")
    monkeypatch.setattr(module, "TerminalProgress", _CtrlC)
    out = tmp_path / "out.safetensors"
    rc = cli_main([str(a) for a in COMMANDS[command](work, out)])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted: no output was written" in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_appears_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "o.safetensors"
    plan = {"a": ((4,), torch.float32), "b": ((4,), torch.float32)}
    with pytest.raises(OutputPathError) as e:
        with StreamingWriter(out, plan) as w:
            w.write("a", torch.ones(4))
            out.write_bytes(b"written by someone else meanwhile")
            w.write("b", torch.ones(4))
    assert_actionable(str(e.value), out)
    assert out.read_bytes() == b"written by someone else meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]


def test_outputs_get_the_usual_permissions(work, tmp_path, capsys):
    """The temp file becomes the output: it must be created with the umask's mode (mkstemp's 0600 would make
    outputs unreadable to anyone but the server's user)."""
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    p = write_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(2)})
    assert p.stat().st_mode & 0o777 == want
    assert cli_main(["merge", str(work.base), str(work.tuned), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == want


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("option", ["--report", "--chart"])
@pytest.mark.parametrize("command", ["merge", "mix", "extract"])
def test_report_and_chart_paths_never_replace_an_input(work, tmp_path, capsys, command, option):
    """--report/--chart name a second output: aimed at an input model, it must be refused like -o is."""
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(work.tuned.read_bytes())
    before = _sha(victim)
    argv = {"merge": ["merge", work.base, victim], "mix": ["mix", work.base, victim, work.other],
            "extract": ["extract", work.base, victim]}[command]
    rc = cli_main([str(a) for a in [*argv, "-o", tmp_path / "out.safetensors", option, victim]])
    err = capsys.readouterr().err
    assert _sha(victim) == before, f"{command} {option} overwrote its input {victim.name}"
    assert rc == 2 and err.startswith("error: ")
