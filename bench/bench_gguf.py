"""GGUF in and out, measured in one run:

1. decoding one Flux-sized tensor (12288 x 3072, the double blocks' MLP) stored as Q8_0, Q5_1 and Q4_K:
   our torch kernels vs the gguf package's numpy decoder (and ComfyUI-GGUF's own torch decoder in fp32
   when COMFYUI_GGUF_PATH points at a copy of it); the values must be bit-identical;
2. merging two Flux-shaped Q8_0 GGUF files 0.5/0.5 to gguf-q8_0 and to bf16 safetensors, vs merging their
   bf16 twins to bf16: wall time and peak RssAnon (target: < 1 GB above the interpreter).

    .venv/bin/python bench/bench_gguf.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import measure, table  # noqa: E402

from weightsmith.encodings import gguf_quants  # noqa: E402
from weightsmith.encodings.gguf_write import write_gguf  # noqa: E402
from weightsmith.merge import merge  # noqa: E402
from weightsmith.report import format_table  # noqa: E402
from weightsmith.sources import open_model  # noqa: E402
from weightsmith.testmodels import FLUX_E2E, FluxConfig, flux_shapes, write_model  # noqa: E402


def _blocks(qtype: str, n_values: int) -> np.ndarray:
    """Random raw blocks with finite fp16 scales (the package cannot encode K-quants, so they are raw)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(n_values // block, size), dtype=np.uint8)
    at = {"Q8_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2]}[qtype]
    for a in at:
        raw[:, a:a + 2] = rng.uniform(-0.01, 0.01, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def _comfyui_gguf_dequant():
    d = os.environ.get("COMFYUI_GGUF_PATH")
    if not d or not (Path(d) / "dequant.py").is_file():
        return None
    pkg = types.ModuleType("comfyui_gguf_bench")
    pkg.__path__ = [d]
    sys.modules["comfyui_gguf_bench"] = pkg
    try:
        return importlib.import_module("comfyui_gguf_bench.dequant")
    except ImportError:
        return None


def _best(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def decode_rows(shape: tuple[int, int]) -> tuple[list[dict], bool]:
    import gguf

    theirs = _comfyui_gguf_dequant()
    rows, same = [], True
    for qtype in ("Q8_0", "Q5_1", "Q4_K"):
        q = gguf.GGMLQuantizationType[qtype]
        raw = _blocks(qtype, shape[0] * shape[1]).reshape(shape[0], -1)
        t_torch, ours = _best(lambda raw=raw, qtype=qtype: gguf_quants.dequantize(torch.from_numpy(raw), qtype, shape))
        t_np, ref = _best(lambda raw=raw, q=q: gguf.quants.dequantize(raw, q), repeat=1)
        same &= np.array_equal(ours.numpy().view(np.uint32), np.ascontiguousarray(ref, np.float32).view(np.uint32))
        row = {"type": qtype, "torch (ours) s": f"{t_torch:.3f}", "gguf numpy s": f"{t_np:.3f}",
               "numpy / ours": f"{t_np / t_torch:.1f}x"}
        if theirs is not None:
            t_c, _ = _best(lambda raw=raw, q=q: theirs.dequantize(torch.from_numpy(raw), q, shape, dtype=torch.float32))
            row["ComfyUI-GGUF s"] = f"{t_c:.3f}"
        rows.append(row)
    return rows, same


def merge_gguf(a: str, b: str, out: str, dtype: str) -> None:
    merge([a, b], out, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smaller tensor and a 0.3 GB model")
    args = ap.parse_args(argv)
    shape = (3072, 3072) if args.quick else (12288, 3072)
    rows, same = decode_rows(shape)
    print(f"decode one {shape[0]}x{shape[1]} tensor to fp32 ({torch.get_num_threads()} torch threads; best of 3)")
    print(format_table(rows))
    print(f"bit-identical to gguf.quants.dequantize: {same}")
    cfg = FluxConfig(**{**FLUX_E2E.__dict__, "depth": 0 if args.quick else 2, "depth_single": 1 if args.quick else 2})
    with tempfile.TemporaryDirectory(prefix=".bench_gguf_", dir=Path(__file__).resolve().parents[1]) as tmp:
        for name, seed in (("a", 0), ("b", 1)):
            write_model(f"{tmp}/{name}.safetensors", flux_shapes(cfg, "dev"), seed=seed, dtype=torch.bfloat16)
            write_gguf(f"{tmp}/{name}.gguf", open_model(f"{tmp}/{name}.safetensors"), "Q8_0")
        size = Path(f"{tmp}/a.gguf").stat().st_size
        ms = [
            measure("bf16 twins -> bf16", merge_gguf, f"{tmp}/a.safetensors", f"{tmp}/b.safetensors",
                    f"{tmp}/m1.safetensors", "bf16"),
            measure("Q8_0 GGUF -> bf16", merge_gguf, f"{tmp}/a.gguf", f"{tmp}/b.gguf", f"{tmp}/m2.safetensors", "bf16"),
            measure("Q8_0 GGUF -> gguf-q8_0", merge_gguf, f"{tmp}/a.gguf", f"{tmp}/b.gguf", f"{tmp}/m3.gguf",
                    "gguf-q8_0"),
        ]
    print(f"\nmerge 0.5/0.5 of two Flux-shaped models (hidden 3072, {cfg.depth}+{cfg.depth_single} blocks; "
          f"Q8_0 file {size / 1e9:.2f} GB)")
    print(table(ms, baseline="bf16 twins -> bf16"))
    worst = max(m.extra_anon for m in ms[1:]) / 2**20
    print(f"GGUF merges: peak RssAnon {worst:.0f} MB above the interpreter's baseline (target < 1024 MB); "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0 if same and worst < 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
