"""`weightsmith` command line: one subcommand per capability, each in its own module under commands/."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from . import commands
from .errors import WeightsmithError
from .outputs import output_set
from .provenance import cli_recording, recording, without_output_hash
from .signals import InputChanged, Terminated, cli_signals
from .sources import set_default_nonfinite

# A value that starts with "-" but is a number or a comma-separated list of numbers (`--weights -1,2`,
# `--alpha -1e-3`): argparse only knows `-1` and `-.5` and would read these as unknown options.
_NEGATIVE_NUMBERS = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?(,\s*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?)*,?$", re.I)


class _Parser(argparse.ArgumentParser):
    """argparse that takes negative numbers and lists of them as option values (no option of ours looks
    like a number, so nothing is ambiguous). Subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBERS


def version() -> str:
    """The installed distribution's version, or the source tree's when running from a checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("weightsmith")
    except PackageNotFoundError:
        from pathlib import Path

        found = re.search(r'^version\s*=\s*"([^"]+)"', (Path(__file__).resolve().parents[1] / "pyproject.toml")
                          .read_text(encoding="utf-8"), re.M)
        return found.group(1) if found else "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="weightsmith",
        description="Merge diffusion models, extract/convert/compose LoRAs and mix models, streaming.",
    )
    parser.add_argument(
        "--nonfinite", choices=["report", "error"], default="report",
        help="what a NaN/Inf weight in an input does: report it (default) or refuse the input, naming file and key",
    )
    parser.add_argument(
        "--no-hash", action="store_true",
        help="leave modelspec.hash_sha256 out of the outputs (the SHA-256 of the data costs ~0.6 CPU-s per GB "
             "written; free on a machine with a core to spare) (also WEIGHTSMITH_HASH=0)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--debug", action="store_true",
        help="show the Python traceback of an unexpected error (also with WEIGHTSMITH_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        mod.register(sub)
    return parser


class _QuietPipe:
    """sys.stdout that survives its reader going away (`weightsmith … | head`): the first write or flush
    that meets a closed pipe points the descriptor at /dev/null, so the command finishes its work (a merge
    is not thrown away for a closed terminal pipe) and exits without a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def _closed_pipe(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed_pipe()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed_pipe()
            self._stream.flush()  # what was buffered now goes to /dev/null

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    stream = sys.stdout
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real descriptor (a test's capture): nothing to guard
        yield
        return
    sys.stdout = _QuietPipe(stream)
    try:
        yield
    finally:
        sys.stdout = stream
        try:
            stream.flush()
        except BrokenPipeError:  # a pipe closed after the last write of the command
            _QuietPipe(stream)._closed_pipe()


def main(argv: list[str] | None = None) -> int:
    with _quiet_broken_pipe():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_default_nonfinite(args.nonfinite)
    try:
        # every output of the command (model, --report, --chart) is placed together at the end, or none
        # and carries the run's recipe (provenance.py), built from the parsed options; `replay` records the run
        # it replays itself
        rec = None if getattr(args, "records_itself", False) else cli_recording(args)
        with cli_signals(), output_set(), recording(rec), without_output_hash(args.no_hash):
            return int(args.func(args) or 0)
    except WeightsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InputChanged as e:
        print(f"error: {e.path}: another program opened this input for writing while it was being read (a "
              "download or copy over it, a truncation); stopped before it could change under the run, nothing "
              "was written: wait until that program has finished, check the file, and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no output was written", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"\nterminated by {e}: no output was written", file=sys.stderr)
        return 128 + e.signum
    except MemoryError:
        print("error: out of memory; close other programs, or use smaller inputs or a machine with more memory",
              file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a read or a write: permissions, an I/O error, a vanished file
        print(f"error: {e}; check the path, its permissions and the disk", file=sys.stderr)
        return 2
    except Exception as e:
        # Every bad input is meant to be refused above, naming file and key; what arrives here is a bug. The
        # user gets one line instead of a traceback, and the way to see it for a bug report.
        if args.debug or os.environ.get("WEIGHTSMITH_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: internal error in `weightsmith {args.command}` ({type(e).__name__}: {str(e)[:300]}); "
              "the command stopped. This is a bug: rerun with `weightsmith --debug …` and report the traceback",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
