"""Lossless mix of three ~2 GB Flux-shaped bf16 models (hidden 3072, 2 double + 2 single blocks), file to
file: wall time and peak anonymous memory (RssAnon; mmapped file pages don't count), against, in the
same run:

* a plain streaming copy of the three inputs (read every tensor, write three files): the I/O floor the
  issue measures against;
* a streaming copy of the reference alone (the write volume of one mix output), for scale;
* the whole-model-in-RAM approach of the losslessmix script: load all three, mix every tensor with the
  script's formula in the tensors' own dtype, `save_file`.

Targets (issue 7): ours ≤ 1 GB peak RssAnon and ≤ 2× the streaming copy of the three.

    .venv/bin/python bench/bench_mix.py [--quick] [--skip-ram]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import drop_page_cache_hint, estimate_line, in_child, measure, table  # noqa: E402

from weightsmith.mix import lossless_mix  # noqa: E402
from weightsmith.safetensors_io import StreamingWriter  # noqa: E402
from weightsmith.sources import open_model  # noqa: E402
from weightsmith.testmodels import FLUX_E2E, FluxConfig, flux_shapes, iter_random_tensors  # noqa: E402


def write_trio(folder: Path, cfg: FluxConfig) -> list[Path]:
    """a: random weights; b, c: small element-wise perturbations of a (cheap to generate, close to a like
    fine-tunes are, so picks are a real mixture)."""
    shapes = flux_shapes(cfg, "dev")
    paths = [folder / f"{n}.safetensors" for n in "abc"]
    plan = {k: (s, torch.bfloat16) for k, s in shapes.items()}
    with StreamingWriter(paths[0], plan) as wa, StreamingWriter(paths[1], plan) as wb, \
            StreamingWriter(paths[2], plan) as wc:
        for k, t in iter_random_tensors(shapes, seed=0, dtype=torch.float32):
            flat = t.reshape(-1)
            wa.write(k, t.to(torch.bfloat16))
            wb.write(k, (flat + 0.02 * flat.roll(1)).reshape(t.shape).to(torch.bfloat16))
            wc.write(k, (flat - 0.02 * flat.roll(7)).reshape(t.shape).to(torch.bfloat16))
            del t, flat
    return paths


def stream_copy(inputs: list[str], outputs: list[str]) -> None:
    """Read every tensor, write it to a new file: no per-tensor NaN/Inf scan (a plain copy)."""
    for src_path, out in zip(inputs, outputs):
        with open_model(src_path, nonfinite="ignore") as src, StreamingWriter(out, {k: (src.info(k).shape, src.info(k).dtype)
                                                               for k in src.keys()}) as w:
            for k in src.keys():
                w.write(k, src.get(k))


def ours(a: str, b: str, c: str, out: str) -> None:
    lossless_mix(a, b, c, out=out)


def estimate_ours(a: str, b: str, c: str, out: str) -> dict:
    """The pre-run estimate `weightsmith mix` prints for this run (headers + calibration only)."""
    from weightsmith.estimate_work import mix_estimate
    from weightsmith.mix import plan_mix
    from weightsmith.sources import as_source

    sources = [as_source(p) for p in (a, b, c)]
    return mix_estimate(plan_mix(sources[0], sources[1:]), sources, out, "cpu").to_dict()


def whole_model_in_ram(a: str, b: str, c: str, out: str) -> None:
    """What the losslessmix script does (minus pickle): three whole state dicts in memory (its torch.load
    materialises them; load_file alone would only map the files, hence the clone), the formula per key in
    the tensors' dtype, the result dict saved at the end (save_file: no fsync, unlike our writer)."""
    from safetensors.torch import load_file, save_file

    ma, mb, mc = ({k: v.clone() for k, v in load_file(p).items()} for p in (a, b, c))
    for k in ma:
        d_b = torch.abs(ma[k] - mb[k])
        d_c = torch.abs(ma[k] - mc[k])
        ma[k] = mc[k] * (d_b > d_c) + mb[k] * (d_b <= d_c)
    save_file(ma, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three ~0.2 GB inputs (hidden 1024) instead of ~2 GB")
    ap.add_argument("--skip-ram", action="store_true", help="leave out the whole-model-in-RAM contender (~9 GB RAM)")
    args = ap.parse_args(argv)
    if args.quick:
        cfg = FluxConfig(hidden=1024, depth=2, depth_single=2, num_heads=8, context_in=4096, vec_in=768)
    else:
        cfg = FluxConfig(**{**FLUX_E2E.__dict__, "depth": 2, "depth_single": 2})
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1], prefix=".bench_mix_") as tmp:
        t = Path(tmp)
        # Generated in a child process too: the parent never runs a threaded torch op, so the forked
        # contenders cannot inherit a busy OpenMP pool (libgomp is not fork-safe and would hang them).
        gen = measure("generate inputs", write_trio, t, cfg)
        a, b, c = (str(t / f"{n}.safetensors") for n in "abc")
        size = Path(a).stat().st_size
        rows = []

        def run(name, fn, *fn_args, outputs=()):
            drop_page_cache_hint([a, b, c])  # every contender starts with the inputs in the page cache
            rows.append(measure(name, fn, *fn_args))
            for o in outputs:
                Path(o).unlink(missing_ok=True)

        copies = [str(t / f"copy_{n}.safetensors") for n in "abc"]
        run("stream copy of a, b, c", stream_copy, [a, b, c], copies, outputs=copies)
        run("stream copy of a only", stream_copy, [a], copies[:1], outputs=copies[:1])
        out = str(t / "mix.safetensors")
        est = in_child(estimate_ours, a, b, c, out)
        run("weightsmith lossless_mix", ours, a, b, c, out, outputs=[out])
        if not args.skip_ram:
            run("whole models in RAM + save_file", whole_model_in_ram, a, b, c, out, outputs=[out])
    print(f"inputs: 3 x Flux-shaped bf16, hidden {cfg.hidden}, {cfg.depth} double + {cfg.depth_single} single "
          f"blocks, {size / 1e9:.2f} GB each (generated in {gen.seconds:.0f}s); {torch.get_num_threads()} torch threads")
    print(table(rows, baseline="stream copy of a, b, c"))
    print("load average over the last 1/5/15 min: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
          + f" on {os.cpu_count()} CPUs (the mix is CPU-bound, the copies I/O-bound: contention moves the ratio)")
    mix = next(r for r in rows if r.name == "weightsmith lossless_mix")
    print(estimate_line(est, mix))
    copy3 = rows[0]
    ok_mem = mix.peak_anon <= 2**30
    ok_time = mix.seconds <= 2 * copy3.seconds
    print(f"lossless_mix: peak RssAnon {mix.peak_anon / 2**20:.0f} MB (target <= 1024: {'ok' if ok_mem else 'MISSED'}), "
          f"{mix.seconds / copy3.seconds:.2f}x the streaming copy of the three inputs "
          f"(target <= 2x: {'ok' if ok_time else 'MISSED'})")
    return 0 if ok_mem and ok_time else 1


if __name__ == "__main__":
    sys.exit(main())
