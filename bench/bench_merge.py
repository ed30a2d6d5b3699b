"""Benchmark: merging two Flux-shaped bf16 models 0.5/0.5, side by side in one run.

Contenders (each in a fresh forked process; wall time and peak RssAnon, so memory-mapped file pages
don't count):
  * weightsmith            plan_merge + execute_merge (streaming, fp32 math, bf16 out)
  * streaming copy (floor) read both inputs, write one output, no arithmetic
  * sd-mecha 1.1.8         sd_mecha.weighted_sum -> sd_mecha.merge(output=file), bf16 out
  * ComfyUI                UNET loads (bf16, as on a GPU) -> ModelMergeSimple -> the ModelSave path
  * naive                  safetensors load_file x2 -> average in fp32 -> save_file

    .venv/bin/python bench/bench_merge.py            # 2 x ~2.05 GB inputs (hidden 3072, 2 double + 2 single blocks)
    .venv/bin/python bench/bench_merge.py --quick    # 2 x ~0.77 GB (1 double block): a faster check

Inputs are generated into a temporary folder and deleted at the end (as are all outputs).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _util import drop_page_cache_hint, estimate_line, in_child, measure, table  # noqa: E402

from weightsmith.safetensors_io import StreamingWriter, read_header  # noqa: E402
from weightsmith.testmodels import FluxConfig, flux_shapes  # noqa: E402

FULL = FluxConfig(hidden=3072, depth=2, depth_single=2, num_heads=24, context_in=4096, vec_in=768)
# ComfyUI only detects Flux at hidden 3072, so the quick inputs are narrow in depth, not in width
QUICK = FluxConfig(hidden=3072, depth=1, depth_single=0, num_heads=24, context_in=4096, vec_in=768)


def write_input(path: Path, cfg: FluxConfig, seed: int) -> None:
    """A bf16 Flux-dev-shaped file, generated fast (uniform values scaled like an init; values don't
    matter for timing, only sizes and layout do)."""
    shapes = flux_shapes(cfg, "dev")
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(path, {k: (s, torch.bfloat16) for k, s in shapes.items()}) as w:
        for k, s in shapes.items():
            fan_in = s[1] if len(s) > 1 else 1
            t = torch.empty(s, dtype=torch.float32).uniform_(-1, 1, generator=gen) * (1.0 / math.sqrt(fan_in))
            w.write(k, t.to(torch.bfloat16))


def _write_inputs(a: Path, b: Path, cfg: FluxConfig) -> None:
    write_input(a, cfg, 1)
    write_input(b, cfg, 2)


# --------------------------------------------------------------------------------------------------
# contenders (module level: they run in forked children)


def run_weightsmith(a: str, b: str, out: str) -> None:
    from weightsmith.merge import execute_merge, plan_merge

    plan = plan_merge([a, b], "weighted_sum", [0.5, 0.5])
    execute_merge(plan, out, dtype="bf16")


def estimate_weightsmith(a: str, b: str, out: str) -> dict:
    """The pre-run estimate `weightsmith merge` prints for this run (headers + calibration only)."""
    from weightsmith.estimate_work import merge_estimate
    from weightsmith.merge import plan_merge

    return merge_estimate(plan_merge([a, b], "weighted_sum", [0.5, 0.5]), out, "bf16", "cpu").to_dict()


def run_copy(a: str, b: str, out: str) -> None:
    """The floor: every byte of both inputs read, one output written, no arithmetic."""
    from weightsmith.sources import open_model

    src = open_model(a)
    src.nonfinite = "ignore"
    hb = read_header(b)
    buf = bytearray(max(i.nbytes for i in hb.tensors.values()))
    view = memoryview(buf)
    with open(b, "rb", buffering=0) as fb, StreamingWriter(out, {k: (i.shape, i.dtype) for k, i in
                                                                 ((k, src.info(k)) for k in src.keys())}) as w:
        for k in src.keys():
            start, end = hb.offsets[k]
            fb.seek(start)
            fb.readinto(view[: end - start])
            w.write(k, src.get(k))


class _Quiet:
    """tqdm stand-in so sd-mecha's progress bar doesn't flood the output."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def run_sd_mecha(a: str, b: str, out: str) -> None:
    import sd_mecha

    recipe = sd_mecha.weighted_sum(sd_mecha.model(a), sd_mecha.model(b), alpha=0.5)
    sd_mecha.merge(recipe, output=out, output_dtype=torch.bfloat16, merge_dtype=torch.float32, tqdm=_Quiet)


def run_comfyui(a: str, b: str, out: str) -> None:
    from comfy_support import import_comfy

    import_comfy()
    import comfy.sd
    from comfy_extras.nodes_model_merging import ModelMergeSimple, save_checkpoint

    opts = {"dtype": torch.bfloat16}  # what a GPU user gets; under --cpu ComfyUI would load fp32 (2x the RAM)
    m1 = comfy.sd.load_diffusion_model(a, model_options=opts)
    m2 = comfy.sd.load_diffusion_model(b, model_options=opts)
    (merged,) = ModelMergeSimple().merge(m1, m2, 0.5)
    save_checkpoint(merged, filename_prefix="merged", output_dir=str(Path(out).parent))


def run_naive(a: str, b: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    sa, sb = load_file(a), load_file(b)
    merged = {k: ((sa[k].float() + sb[k].float()) * 0.5).to(torch.bfloat16) for k in sa}
    save_file(merged, out)


CONTENDERS = [
    ("streaming copy (floor)", run_copy),
    ("weightsmith merge", run_weightsmith),
    ("sd-mecha 1.1.8 weighted_sum", run_sd_mecha),
    ("ComfyUI ModelMergeSimple+save", run_comfyui),
    ("naive load_file+avg+save_file", run_naive),
]


def _check(ours: Path, naive: Path) -> str:
    """Ours and the naive fp32 average must agree exactly (same math, one bf16 rounding)."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(ours), "pt") as fa, safe_open(str(naive), "pt") as fb:
        for k in fa.keys():
            worst = max(worst, float((fa.get_tensor(k).float() - fb.get_tensor(k).float()).abs().max()))
    return f"max |weightsmith - naive| = {worst:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (~0.77 GB each) for a faster check")
    ap.add_argument("--workdir", default=None, help="where to put the temporary inputs/outputs (default: a temp dir)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: mecha,comfy,naive")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per contender; the fastest is kept (the machine is shared: single runs are noisy)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if importlib.util.find_spec("sd_mecha") is None:
        print("sd-mecha is not installed (pip install -e '.[bench]'): skipping it")
        skip.add("mecha")
    work = Path(tempfile.mkdtemp(prefix="ws-bench-merge-", dir=args.workdir))
    try:
        a, b = work / "a.safetensors", work / "b.safetensors"
        t0 = time.perf_counter()
        # generated in a child: torch's OpenMP pool must not start in this process before it forks the
        # contenders (a parallel op in a child forked after that hangs in libgomp)
        measure("generate inputs", _write_inputs, a, b, cfg)
        size = a.stat().st_size
        n_params = sum(i.numel for i in read_header(a).tensors.values())
        print(f"inputs: 2 x {size / 1e9:.2f} GB bf16 ({n_params / 1e9:.3f} B params, hidden {cfg.hidden}, "
              f"{cfg.depth} double + {cfg.depth_single} single blocks), generated in {time.perf_counter() - t0:.1f} s; "
              f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
        rows = []
        estimates: dict[str, dict] = {}
        cpu_seconds: dict[str, float] = {}
        for name, fn in CONTENDERS:
            if ("mecha" in skip and "mecha" in name) or ("comfy" in skip and "ComfyUI" in name) or \
                    ("naive" in skip and "naive" in name):
                continue
            out_dir = work / name.split()[0].lower()
            out_dir.mkdir()
            out = out_dir / "out.safetensors"
            best = None
            for _ in range(max(1, args.repeat)):
                for f in out_dir.glob("*.safetensors"):
                    f.unlink()
                drop_page_cache_hint([a, b])  # every contender starts with warm inputs
                if name.startswith("weightsmith") and name not in estimates:
                    estimates[name] = in_child(estimate_weightsmith, str(a), str(b), str(out))
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                try:
                    m = measure(name, fn, str(a), str(b), str(out))
                except RuntimeError as e:
                    print(f"{name}: FAILED ({e})")
                    break
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                if best is None or m.seconds < best[0].seconds:
                    best = (m, cpu)
            if best is None:
                continue
            m, cpu = best
            cpu_seconds[name] = cpu
            produced = list(out_dir.glob("*.safetensors"))
            print(f"  {name}: {m.seconds:.2f} s wall, {cpu:.2f} s CPU, peak RssAnon {m.peak_anon / 2**20:.0f} MB"
                  + ("" if produced else "  (no output file!)"))
            if name in estimates:
                print("  " + estimate_line(estimates[name], m))
            rows.append(m)
            if name.startswith("weightsmith") or name.startswith("naive"):
                continue
            for f in produced:
                f.unlink()
        ours_out = work / "weightsmith" / "out.safetensors"
        naive_out = work / "naive" / "out.safetensors"
        if ours_out.exists() and naive_out.exists():
            print(_check(ours_out, naive_out))
        print()
        print(table(rows, "streaming copy (floor)"))
        base_cpu = cpu_seconds.get("streaming copy (floor)")
        if base_cpu:
            print("CPU seconds (user+sys, all threads; steadier than wall time on a shared machine): "
                  + ", ".join(f"{n.split()[0]} {c:.2f} ({c / base_cpu:.1f}x)" for n, c in cpu_seconds.items()))
        by = {r.name: r for r in rows}
        ours = by.get("weightsmith merge")
        if ours:
            mecha = by.get("sd-mecha 1.1.8 weighted_sum")
            floor = by.get("streaming copy (floor)")
            print()
            print(f"weightsmith: peak RssAnon {ours.peak_anon / 2**30:.2f} GB (target <= 1 GB)"
                  + (f"; {mecha.seconds / ours.seconds:.1f}x faster than sd-mecha (target >= 4x)" if mecha else "")
                  + (f"; {ours.seconds / floor.seconds:.2f}x the streaming copy (target <= 2x)" if floor else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
