"""LoRA extraction per layer: Weightsmith vs ComfyUI's own `extract_lora` (comfy_extras/nodes_lora_extract.py,
imported from the real ComfyUI) vs the exact truncated SVD (the optimum), on Flux-width linears and an
SDXL-width 3x3 conv, at rank 64.

Deltas are realistic: a decaying spectrum (σ_i ∝ 1/i over 256 directions) plus a full-rank noise floor,
like a fine-tune's ΔW, not pure noise. Every contender runs in a fresh spawned process, at least twice
(up to 5 runs within 3 s): best and median wall time, CPU time, peak RssAnon of that process; speed-ups
use the best runs. Its error ‖ΔW − up·down‖/‖ΔW‖ is measured after the clock stops. `--model` adds a whole-file extraction (streaming, peak memory).

    .venv/bin/python bench/bench_extract.py [--quick | --all] [--model] [--rank 64] [--json out.json]

Targets (issue 4): ≥ 40× faster than ComfyUI's at rank 64, with error ≤ 1.01× the optimum.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _util import Measurement, PeakSampler, estimate_line, rss_anon_bytes  # noqa: E402

from weightsmith.lora.extract import ExtractOptions, LayerPlan, extract_layer  # noqa: E402
from weightsmith.lora.model import LoRA  # noqa: E402
from weightsmith.lora.svd import RankPolicy, low_rank  # noqa: E402

DEFAULT_SHAPES = [
    ("proj 3072x3072", (3072, 3072)),
    ("mlp.0 12288x3072", (12288, 3072)),
    ("SDXL conv 1280x1280x3x3", (1280, 1280, 3, 3)),
]
MORE_SHAPES = [  # --all: ComfyUI's full-matrices SVD takes minutes on these under load
    ("qkv 9216x3072", (9216, 3072)),
    ("mlp.2 3072x12288", (3072, 12288)),
]
QUICK_SHAPES = [
    ("proj 3072x3072", (3072, 3072)),
    ("SD conv 640x640x3x3", (640, 640, 3, 3)),
]


def realistic_delta(shape: tuple[int, ...], seed: int = 0, directions: int = 256, noise: float = 0.05) -> torch.Tensor:
    """Low rank with a 1/i spectrum plus a noise floor holding `noise` of the norm."""
    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    s = 1.0 / torch.arange(1, directions + 1, dtype=torch.float32)
    left = torch.randn(m, directions, generator=g) / m**0.5
    right = torch.randn(directions, n, generator=g) / n**0.5
    d = (left * s) @ right
    floor = torch.randn(m, n, generator=g)
    d += floor * (noise * d.norm() / floor.norm())
    return d.reshape(shape)


# --- contenders: each returns (up, down) as 2-D fp32 factors ----------------------------------------


def comfyui(delta: torch.Tensor, rank: int):
    from comfy_extras.nodes_lora_extract import extract_lora

    up, down = extract_lora(delta, rank)
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def exact(delta: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def weightsmith(delta: torch.Tensor, rank: int):
    lr = low_rank(delta.reshape(delta.shape[0], -1), RankPolicy("fixed", rank=rank))
    return lr.up, lr.down


def weightsmith_layer(delta: torch.Tensor, rank: int):
    """The whole per-layer step of `extract_lora`: factorise, cast to bf16, measure the stored error."""
    key = "layer.weight"
    kind = "linear" if delta.ndim == 2 else "conv"
    plan = LayerPlan(key, "diffusion_model.layer", kind, "lowrank", RankPolicy("fixed", rank=rank))
    lora = LoRA()
    extract_layer(plan, delta, float(delta.norm()), ExtractOptions(rank=rank), lora)
    (term,) = lora.modules["diffusion_model.layer"].terms
    return term.up.float().reshape(term.up.shape[0], -1), term.down.float().reshape(term.down.shape[0], -1)


CONTENDERS = {
    "ComfyUI extract_lora": comfyui,
    "exact truncated SVD": exact,
    "weightsmith low_rank": weightsmith,
    "weightsmith layer (+bf16, report)": weightsmith_layer,
}


def _child(job, args, q) -> None:
    q.put(job(*args))


def spawn(job, *args):
    """job(*args) in a fresh spawned interpreter. OpenMP/MKL thread pools do not survive fork(): a forked
    child of a process that already ran parallel torch code can hang, a spawned one starts clean."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(job, args, q))
    p.start()
    try:
        result = q.get()
    finally:
        p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{job.__name__}{args} failed in its subprocess (exit {p.exitcode})")
    return result


def _timed(fn, *args, min_runs: int = 2, max_runs: int = 5, budget: float = 3.0):
    """Best (and median) wall time of fn(*args): at least `min_runs` runs, more (up to `max_runs`) while
    under `budget` seconds in all. The best run is the least disturbed by other processes on a shared
    machine; every contender gets at least two."""
    gc.collect()
    base = rss_anon_bytes()
    walls, cpus = [], []
    with PeakSampler() as sampler:
        while len(walls) < min_runs or (len(walls) < max_runs and sum(walls) < budget):
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn(*args)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return out, {"seconds": min(walls), "median_seconds": statistics.median(walls), "cpu_seconds": min(cpus),
                 "runs": len(walls), "peak_mb": sampler.peak / 2**20, "extra_mb": (sampler.peak - base) / 2**20}


def layer_job(contender: str, shape: tuple[int, ...], rank: int) -> dict:
    if contender == "ComfyUI extract_lora":
        from comfy_support import import_comfy

        import_comfy()
    _warm_up()
    delta = realistic_delta(shape)
    (up, down), stats = _timed(CONTENDERS[contender], delta, rank)
    mat = delta.reshape(delta.shape[0], -1)
    stats["error"] = float(torch.linalg.vector_norm(torch.addmm(mat, up, down, alpha=-1.0)) / torch.linalg.vector_norm(mat))
    return stats


# --- whole model: streaming from files ----------------------------------------------------------------


def write_pair_job(folder: str) -> tuple[str, str]:
    """A Flux file pair at full width (hidden 3072, 1 double + 1 single block, bf16, ~1.06 GB each): the
    tuned one gets a rank-16 change plus a 5% noise floor on every matrix."""
    from weightsmith.testmodels import FLUX_E2E, finetune, flux_shapes, write_model

    shapes = flux_shapes(FLUX_E2E, "dev")
    base, tuned = Path(folder) / "base.safetensors", Path(folder) / "tuned.safetensors"
    write_model(base, shapes, seed=21, dtype=torch.bfloat16)

    def tune(key: str, t: torch.Tensor) -> torch.Tensor:
        return finetune({key: t}, seed=len(key), rank=16, scale=0.05, noise=0.05 * 0.05)[key]

    write_model(tuned, shapes, seed=21, dtype=torch.bfloat16, transform=tune)
    return str(base), str(tuned)


def extract_files_job(base: str, tuned: str, rank: int) -> dict:
    from weightsmith.lora.extract import extract_lora

    _warm_up()
    (lora, report), stats = _timed(extract_lora, base, tuned, rank, min_runs=1, budget=0.0)
    s = report.summary()
    stats.update({k: s[k] for k in ("changed", "lowrank", "diff", "error_global", "optimal_global")})
    stats["methods"] = s["methods"]
    stats["model_mb"] = Path(base).stat().st_size / 2**20
    return stats


def estimate_files_job(base: str, tuned: str, rank: int) -> dict:
    """The pre-run estimate `weightsmith extract` prints for this run (headers + calibration only)."""
    from weightsmith.estimate_work import extract_estimate
    from weightsmith.lora.validate import pair_models

    return extract_estimate(pair_models(base, tuned), {"rank": rank}, "cpu", None).to_dict()


def _warm_up() -> None:
    """First calls into MKL/LAPACK pay one-off setup; keep that out of every contender's clock."""
    a = torch.randn(256, 200)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.svd(a)
    torch.linalg.qr(a)
    low_rank(a, RankPolicy("fixed", rank=8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one Flux linear and a smaller conv (well under a minute)")
    ap.add_argument("--all", action="store_true", help="add qkv 9216x3072 and mlp.2 3072x12288 (several minutes more)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--model", action="store_true",
                    help="also extract from a full-width Flux file pair (writes ~2 GB to a temp folder, then deletes it)")
    args = ap.parse_args(argv)

    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES + (MORE_SHAPES if args.all else [])
    rows = []
    print(f"rank {args.rank}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
          f"(timings on a shared machine vary with it), shapes: {', '.join(n for n, _ in shapes)}", flush=True)
    for name, shape in shapes:
        results = {c: spawn(layer_job, c, shape, args.rank) for c in CONTENDERS}
        comfy_s = results["ComfyUI extract_lora"]["seconds"]
        optimum = results["exact truncated SVD"]["error"]
        for c, r in results.items():
            rows.append({"layer": name, "method": c, **r, "speedup_vs_comfy": comfy_s / r["seconds"],
                         "error_vs_optimal": r["error"] / optimum})
        _print_rows([r for r in rows if r["layer"] == name])
    ours = [r for r in rows if r["method"] == "weightsmith low_rank"]
    worst_speed = min(r["speedup_vs_comfy"] for r in ours)
    worst_ratio = max(r["error_vs_optimal"] for r in ours)
    ok = worst_speed >= 40 and worst_ratio <= 1.01
    print(f"\nload average now {os.getloadavg()[0]:.1f}")
    print(f"weightsmith low_rank vs ComfyUI: speed-up {worst_speed:.1f}x at worst (target >= 40x), error "
          f"{worst_ratio:.4f}x the optimum at worst (target <= 1.01x): {'MET' if ok else 'NOT MET'}")
    result = {"rank": args.rank, "rows": rows}
    if args.model:
        result["model"] = _bench_model(args.rank)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _bench_model(rank: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ws_bench_extract_") as folder:
        base, tuned = spawn(write_pair_job, folder)
        est = spawn(estimate_files_job, base, tuned, rank)
        r = spawn(extract_files_job, base, tuned, rank)
    print(f"\nwhole model (Flux hidden 3072, 1 double + 1 single block, bf16, {r['model_mb']:.0f} MB per file), rank {rank}:")
    print(f"  {r['seconds']:.1f} s, peak RssAnon {r['peak_mb']:.0f} MB (+{r['extra_mb']:.0f} MB over start; the files "
          f"are memory-mapped), {r['changed']} changed tensors: {r['lowrank']} low-rank {r['methods']}, {r['diff']} "
          f"diffs; error {r['error_global']:.4f} vs optimal {r['optimal_global']:.4f}")
    peak = int(r["peak_mb"] * 2**20)
    print("  " + estimate_line(est, Measurement("weightsmith extract", r["seconds"], peak,
                                                peak - int(r["extra_mb"] * 2**20))))
    return r


def _print_rows(rows: list[dict]) -> None:
    print(f"\n{rows[0]['layer']}")
    print(f"  {'method':<34} {'best s':>8} {'median s':>8} {'cpu s':>7} {'runs':>4} {'x faster':>9} {'rel error':>10} "
          f"{'x optimal':>10} {'peak MB':>8} {'+MB':>7}")
    for r in rows:
        print(f"  {r['method']:<34} {r['seconds']:8.3f} {r['median_seconds']:8.3f} {r['cpu_seconds']:7.3f} {r['runs']:4d} "
              f"{r['speedup_vs_comfy']:9.1f} {r['error']:10.5f} "
              f"{r['error_vs_optimal']:10.5f} {r['peak_mb']:8.0f} {r['extra_mb']:7.0f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
