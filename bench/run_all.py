"""Run every benchmark in bench/, each in its own process (a benchmark that forks workers must not
inherit another one's torch threads). Each prints its own table with ratios against baselines measured
in the same run. `--quick` passes --quick to each.

    .venv/bin/python bench/run_all.py [--quick] [names...]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv if a.startswith("-")]
    names = [a for a in argv if not a.startswith("-")]
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem[len("bench_"):]
        if names and name not in names:
            continue
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(path), *flags]).returncode:
            failed.append(name)
    if failed:
        print(f"\nbenchmarks missing their targets (or failing): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
