"""Benchmark: baking 4 rank-32 LoRAs into a Flux-shaped bf16 model, side by side in one run.

Contenders (each in a fresh forked process; wall time and peak RssAnon, so memory-mapped file pages
don't count):
  * streaming copy (floor)  read the model, write it unchanged (no arithmetic)
  * weightsmith bake        plan_bake + execute_bake (streaming, fp32 math, bf16 out)
  * ComfyUI                 UNET loads (bf16, as on a GPU) -> LoraLoaderModelOnly x4
                            (comfy.sd.load_lora_for_models) -> the ModelSave path (save_checkpoint)

Targets: weightsmith <= 1.3x the streaming copy, peak RssAnon <= 1 GB.

    .venv/bin/python bench/bench_bake.py            # ~2.05 GB model (hidden 3072, 2 double + 2 single blocks)
    .venv/bin/python bench/bench_bake.py --quick    # ~0.77 GB (1 double block): a faster check
    .venv/bin/python bench/bench_bake.py --device cuda

The 4 LoRAs cover every linear of the blocks and heads (rank 32, bf16 factors, kohya/comfy/diffusers
namings mixed). Inputs are generated into a temporary folder and deleted at the end (as are all outputs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _util import estimate_line, in_child, measure, run_contender, table  # noqa: E402
from bench_merge import FULL, QUICK, write_input  # noqa: E402

from weightsmith.safetensors_io import StreamingWriter, read_header  # noqa: E402
from weightsmith.testmodels import FluxConfig, flux_shapes  # noqa: E402

N_LORAS, RANK = 4, 32
STRENGTHS = (0.8, 0.6, -0.5, 1.0)
FORMATS = ("comfy", "kohya", "diffusers", "comfy")


def _write_inputs(model: Path, loras: list[Path], cfg: FluxConfig) -> None:
    from weightsmith.lora.formats import save_lora
    from weightsmith.lora.testloras import random_lora

    write_input(model, cfg, 1)
    for i, (path, fmt) in enumerate(zip(loras, FORMATS)):
        lora = random_lora(flux_shapes(cfg, "dev"), "flux", rank=RANK, seed=10 + i, scale=0.02)
        save_lora(lora, path, fmt=fmt, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# contenders (module level: they run in forked children)


def run_copy(model: str, loras: list[str], out: str, device: str) -> None:
    """The floor: every byte of the model read, one output written, no arithmetic."""
    from weightsmith.sources import open_model

    src = open_model(model)
    src.nonfinite = "ignore"
    with StreamingWriter(out, {k: (src.info(k).shape, src.info(k).dtype) for k in src.keys()}) as w:
        for k in src.keys():
            w.write(k, src.get(k))


def run_weightsmith(model: str, loras: list[str], out: str, device: str) -> None:
    from weightsmith.bake import bake

    bake(model, list(zip(loras, STRENGTHS)), out, device=device)


def estimate_weightsmith(model: str, loras: list[str], out: str, device: str) -> dict:
    """The pre-run estimate `weightsmith bake` prints for this run (headers + calibration only)."""
    from weightsmith.bake import plan_bake
    from weightsmith.estimate_work import bake_estimate

    return bake_estimate(plan_bake(model, list(zip(loras, STRENGTHS))), out, None, device).to_dict()


def run_comfyui(model: str, loras: list[str], out: str, device: str) -> None:
    from comfy_support import import_comfy

    import_comfy()
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_model_merging import save_checkpoint

    m = comfy.sd.load_diffusion_model(model, model_options={"dtype": torch.bfloat16})
    for path, s in zip(loras, STRENGTHS):  # what LoraLoaderModelOnly does
        m, _ = comfy.sd.load_lora_for_models(m, None, comfy.utils.load_torch_file(path, safe_load=True), s, 0)
    save_checkpoint(m, filename_prefix="baked", output_dir=str(Path(out).parent))


CONTENDERS = [
    ("streaming copy (floor)", run_copy),
    ("weightsmith bake", run_weightsmith),
    ("ComfyUI LoraLoaderModelOnly x4+save", run_comfyui),
]


def _check(ours: Path, comfy_dir: Path) -> str:
    """Ours and ComfyUI's saved output: same fp32 math, one bf16 rounding each (differences: 1 ulp at most)."""
    from safetensors import safe_open

    files = list(comfy_dir.glob("*.safetensors"))
    if not files:
        return "ComfyUI wrote no file to compare"
    worst, rel = 0.0, 0.0
    with safe_open(str(ours), "pt") as fa, safe_open(str(files[0]), "pt") as fb:
        theirs = {k.removeprefix("model.diffusion_model."): k for k in fb.keys()}
        for k in fa.keys():
            a, b = fa.get_tensor(k).float(), fb.get_tensor(theirs[k]).float()
            d = float((a - b).abs().max())
            worst = max(worst, d)
            rel = max(rel, d / max(float(b.abs().max()), 1e-12))
    return f"max |weightsmith - ComfyUI| = {worst:g} (relative to the tensor's max: {rel:.2g}; bf16 ulp = 0.0078)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model (~0.77 GB) for a faster check")
    ap.add_argument("--workdir", default=None, help="where to put the temporary inputs/outputs (default: a temp dir)")
    ap.add_argument("--device", default="cpu", help="compute device of the bake (cpu, cuda)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: comfy")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is kept")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = Path(tempfile.mkdtemp(prefix="ws-bench-bake-", dir=args.workdir))
    try:
        model = work / "model.safetensors"
        loras = [work / f"lora{i}.safetensors" for i in range(N_LORAS)]
        t0 = time.perf_counter()
        measure("generate inputs", _write_inputs, model, loras, cfg)  # in a child: see bench_merge
        size = model.stat().st_size
        n_params = sum(i.numel for i in read_header(model).tensors.values())
        lora_mb = sum(p.stat().st_size for p in loras) / 2**20
        print(f"model: {size / 1e9:.2f} GB bf16 ({n_params / 1e9:.3f} B params, hidden {cfg.hidden}, {cfg.depth} double + "
              f"{cfg.depth_single} single blocks); {N_LORAS} LoRAs rank {RANK} ({lora_mb:.0f} MB in all), generated in "
              f"{time.perf_counter() - t0:.1f} s; device {args.device}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        rows, cpu_seconds, estimates = [], {}, {}
        for name, fn in CONTENDERS:
            if "comfy" in skip and "ComfyUI" in name:
                continue
            out_dir = work / name.split()[0].lower()
            out_dir.mkdir()
            out = out_dir / "out.safetensors"
            fargs = (str(model), [str(p) for p in loras], str(out), args.device)
            if name.startswith("weightsmith"):
                estimates[name] = in_child(estimate_weightsmith, *fargs)
            m = run_contender(name, fn, fargs, warm=[model, *loras], outputs=[out_dir], repeat=args.repeat)
            if m.failed:
                print(f"{name}: FAILED ({m.failed})")
                continue
            cpu = cpu_seconds[name] = m.cpu
            print(f"  {name}: {m.seconds:.2f} s wall, {cpu:.2f} s CPU, peak RssAnon {m.peak_anon / 2**20:.0f} MB")
            if name in estimates:
                print("  " + estimate_line(estimates[name], m))
            rows.append(m)
            if name.startswith("streaming"):
                out.unlink(missing_ok=True)
        ours_out = work / "weightsmith" / "out.safetensors"
        if ours_out.exists() and (work / "comfyui").exists():
            print(_check(ours_out, work / "comfyui"))
        print()
        print(table(rows, "streaming copy (floor)"))
        base_cpu = cpu_seconds.get("streaming copy (floor)")
        if base_cpu:
            print("CPU seconds (user+sys, all threads): "
                  + ", ".join(f"{n.split()[0]} {c:.2f} ({c / base_cpu:.1f}x)" for n, c in cpu_seconds.items()))
        by = {r.name: r for r in rows}
        ours, floor, comfy = by.get("weightsmith bake"), by.get("streaming copy (floor)"), \
            by.get("ComfyUI LoraLoaderModelOnly x4+save")
        ok = True
        if ours and floor:
            ratio = ours.seconds / floor.seconds
            ok = ratio <= 1.3 and ours.peak_anon <= 1 << 30
            print(f"\nweightsmith bake: {ratio:.2f}x the streaming copy (target <= 1.3x), peak RssAnon "
                  f"{ours.peak_anon / 2**30:.2f} GB (target <= 1 GB)"
                  + (f"; ComfyUI: {comfy.seconds / ours.seconds:.1f}x our time, {comfy.peak_anon / 2**30:.2f} GB peak"
                     if comfy else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
