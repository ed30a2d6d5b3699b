"""Benchmark: a merge of two models made of very many tiny tensors (200,000 4x4 fp32 tensors: a 17 MB
header, 12 MB of data), against the same merge of the same bytes in 64 tensors and a plain safetensors
copy of the many-tensor file, measured in the same run (issue 19 item 9: time and memory must stay flat
in the number of tensors, not only in their size).

Contenders (each in a fresh forked process; wall time and peak RssAnon, so memory-mapped file pages don't
count):
  * weightsmith merge, many tensors     open_model x2 -> plan_merge -> execute_merge -> report table + JSON
  * weightsmith merge, same bytes in 64 the same, for two files holding the same bytes in 64 tensors
  * safetensors load_file + save_file   the library's own round trip of one many-tensor file (no merge)

    .venv/bin/python bench/bench_many_tensors.py            # 200,000 tensors
    .venv/bin/python bench/bench_many_tensors.py --quick    # 50,000 tensors
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import measure, table  # noqa: E402

from weightsmith.safetensors_io import StreamingWriter  # noqa: E402

SHAPE = (4, 4)
FEW = 64


def write_many(path: str, n: int, seed: int) -> None:
    """n tensors of SHAPE fp32, named like a model's (2,000 blocks of 100), generated in one go."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, *SHAPE, generator=g)
    plan = {f"double_blocks.{i // 100}.img_attn.part_{i % 100}.weight": (SHAPE, torch.float32) for i in range(n)}
    with StreamingWriter(path, plan) as w:
        for i, k in enumerate(plan):
            w.write(k, data[i])


def write_few(path: str, n: int, seed: int) -> None:
    """The same number of bytes in FEW tensors."""
    g = torch.Generator().manual_seed(seed)
    rows = n * SHAPE[0] * SHAPE[1] // FEW
    data = torch.randn(FEW, rows, generator=g)
    with StreamingWriter(path, {f"double_blocks.{i}.img_attn.qkv.weight": ((rows,), torch.float32)
                                for i in range(FEW)}) as w:
        for i in range(FEW):
            w.write(f"double_blocks.{i}.img_attn.qkv.weight", data[i])


def weightsmith_merge(a: str, b: str, out: str) -> None:
    from weightsmith.merge import execute_merge, plan_merge

    report = execute_merge(plan_merge([a, b], "weighted_sum", [0.5, 0.5]), out)
    report.table()
    json.dumps(report.to_dict(), default=str)


def safetensors_copy(a: str, b: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    save_file(load_file(a), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="50,000 tensors instead of 200,000")
    ap.add_argument("-n", type=int, default=None, help="number of tensors (overrides --quick)")
    args = ap.parse_args(argv)
    n = args.n or (50_000 if args.quick else 200_000)
    with tempfile.TemporaryDirectory(prefix="ws-bench-many-") as tmp:
        t = Path(tmp)
        files = {name: str(t / f"{name}.safetensors") for name in ("many_a", "many_b", "few_a", "few_b")}
        measure("generate", _generate, files, n)
        header = int.from_bytes(Path(files["many_a"]).read_bytes()[:8], "little")
        print(f"inputs: 2 x {n} tensors of {list(SHAPE)} fp32 ({Path(files['many_a']).stat().st_size / 1e6:.1f} MB, "
              f"header {header / 1e6:.1f} MB); 2 x {FEW} tensors holding the same bytes")
        rows = [
            measure("safetensors load_file + save_file", safetensors_copy, files["many_a"], files["many_b"],
                    str(t / "copy.safetensors")),
            measure(f"weightsmith merge, same bytes in {FEW}", weightsmith_merge, files["few_a"], files["few_b"],
                    str(t / "few_out.safetensors")),
            measure(f"weightsmith merge, {n} tensors", weightsmith_merge, files["many_a"], files["many_b"],
                    str(t / "many_out.safetensors")),
        ]
    print(table(rows, baseline="safetensors load_file + save_file"))
    few, many = rows[1], rows[2]
    per_key_us = (many.seconds - few.seconds) / n * 1e6
    per_key_bytes = (many.extra_anon - few.extra_anon) / n
    print(f"merge of {n} tensors: {many.seconds:.2f} s, peak RssAnon +{many.extra_anon / 2**20:.0f} MB over start; "
          f"per tensor beyond the few-tensor merge: {per_key_us:.0f} us and {per_key_bytes:.0f} bytes")
    return 0


def _generate(files: dict[str, str], n: int) -> None:
    write_many(files["many_a"], n, 1)
    write_many(files["many_b"], n, 2)
    write_few(files["few_a"], n, 1)
    write_few(files["few_b"], n, 2)


if __name__ == "__main__":
    sys.exit(main())
