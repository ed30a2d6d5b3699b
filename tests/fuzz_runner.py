"""Running one CLI command on one fuzz case and judging the outcome (used by tests/test_fuzz_cli.py).

A command is run in-process (`weightsmith.cli.main`, the same code path as the installed entry point
minus the interpreter start) under a wall-clock alarm, or as a real `python -m weightsmith` process. The
outcome is bad when: the exit status is neither 0 nor 2; a refusal (2) has no `error: ` message or shows
a traceback or the internal-error text; an exception escapes `main`; the command outlives its timeout;
a temp file (`*.tmp`) or, after a refusal, any file is left in the output folder; an output of a
successful run is not a readable safetensors file; an input's bytes changed (sha256 before/after).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import stat
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_cases import Case

# role -> command templates. {bad}: the case's input; {base}/{tuned}: a valid model pair; {lora}: a valid
# LoRA for them; {out}: an empty folder for the outputs.
COMMANDS: dict[str, list[list[str]]] = {
    "model": [
        ["merge", "{base}", "{bad}", "-o", "{out}/m.safetensors", "--report", "{out}/m.json"],
        ["merge", "{bad}", "{base}", "-o", "{out}/m.safetensors"],
        ["mix", "{base}", "{tuned}", "{bad}", "-o", "{out}/x.safetensors", "--report", "{out}/x.json"],
        ["mix", "{bad}", "{base}", "{tuned}", "-o", "{out}/x.safetensors"],
        ["extract", "{base}", "{bad}", "-o", "{out}/e.safetensors", "--rank", "2"],
        ["validate", "{bad}", "{tuned}", "{lora}"],
        ["inspect", "{bad}", "--json", "{out}/i.json"],
        ["verify", "{lora}", "--arch", "flux", "--model", "{bad}"],
        ["convert", "{bad}", "-o", "{out}/c.safetensors"],
        ["compose", "{bad}", "-o", "{out}/co.safetensors"],
        ["rerank", "{bad}", "--rank", "2", "-o", "{out}/r.safetensors"],
    ],
    "lora": [
        ["validate", "{base}", "{tuned}", "{bad}", "--report", "{out}/v.json"],
        ["convert", "{bad}", "-o", "{out}/c.safetensors"],
        ["convert", "{bad}", "-o", "{out}/c.safetensors", "--to", "kohya", "--dtype", "fp16"],
        ["convert", "{bad}", "-o", "{out}/c.safetensors", "--target-arch", "chroma", "--to", "diffusers"],
        ["inspect", "{bad}", "--modules"],
        ["verify", "{bad}", "--arch", "flux"],
        ["compose", "{lora}", "{bad}:0.5", "-o", "{out}/co.safetensors"],
        ["compose", "{bad}", "--rank", "2", "-o", "{out}/co.safetensors", "--format", "kohya"],
        ["rerank", "{bad}", "--rank", "2", "-o", "{out}/r.safetensors"],
    ],
}


class FuzzTimeout(BaseException):
    """Raised by the alarm in the command's thread: it hung."""


@dataclass
class Outcome:
    case: str
    argv: list[str]
    rc: int | None
    stdout: str = ""
    stderr: str = ""
    escaped: str = ""  # the traceback of an exception that escaped main()
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"[{self.case}] weightsmith {' '.join(self.argv)} -> {self.rc}: {'; '.join(self.problems)}"
        tail = (self.escaped or self.stderr)[-1500:]
        return head + ("\n" + tail if tail else "")


def sha256(path: Path) -> str | None:
    """A file's digest; a folder's: every regular file in it; None for what cannot be read without
    blocking (FIFO, socket, device)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return "|".join(f"{p.name}:{sha256(p)}" for p in sorted(path.iterdir()))
    if not stat.S_ISREG(st.st_mode):
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def argv_for(template: list[str], case: Case, base: Path, tuned: Path, lora: Path, out: Path) -> list[str]:
    return [a.format(bad=case.path, base=base, tuned=tuned, lora=lora, out=out) for a in template]


def _alarm(signum, frame):
    raise FuzzTimeout()


def run_in_process(argv: list[str], timeout: float) -> tuple[int | None, str, str, str]:
    """(exit status or None on timeout, stdout, stderr, traceback of an exception escaping main)."""
    from weightsmith.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    rc: int | None = None
    escaped = ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except FuzzTimeout:
        rc = None
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001  (anything escaping main is what this looks for)
        escaped = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue(), escaped


def run_subprocess(argv: list[str], timeout: float) -> tuple[int | None, str, str, str]:
    env = dict(os.environ)
    env.pop("WEIGHTSMITH_DEBUG", None)
    try:
        r = subprocess.run([sys.executable, "-m", "weightsmith", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return None, str(e.stdout or ""), str(e.stderr or ""), ""
    return r.returncode, r.stdout, r.stderr, ""


def _check_output_file(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception as e:  # noqa: BLE001
        return f"output {path.name} is not readable safetensors: {e}"
    return None


def judge(case: Case, argv: list[str], result: tuple[int | None, str, str, str], out: Path,
          before: dict[Path, str | None], after: dict[Path, str | None]) -> Outcome:
    rc, stdout, stderr, escaped = result
    o = Outcome(case.name, argv, rc, stdout, stderr, escaped)
    if escaped:
        o.problems.append("exception escaped main()")
    elif rc is None:
        o.problems.append("timed out (hang)")
    elif rc not in (0, 2) and not (rc == 1 and argv[0] in ("verify", "extract")):
        o.problems.append(f"exit status {rc}")
    if "Traceback (most recent call last)" in stderr:
        o.problems.append("traceback on stderr")
    if "internal error" in stderr:
        o.problems.append("internal error")
    if rc == 2 and "error: " not in stderr:
        o.problems.append("refusal without an 'error: ' message")
    files = sorted(p for p in out.rglob("*")) if out.exists() else []
    if any(p.name.endswith(".tmp") for p in files):
        o.problems.append("temp file left: " + ", ".join(p.name for p in files if p.name.endswith(".tmp")))
    if rc == 2 and files:
        o.problems.append("refused but left " + ", ".join(p.name for p in files))
    if rc == 0:
        for p in files:
            if p.suffix == ".safetensors" and (bad := _check_output_file(p)):
                o.problems.append(bad)
    for path, digest in before.items():
        if after.get(path) != digest:
            o.problems.append(f"input changed: {path}")
    return o
