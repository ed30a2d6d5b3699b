"""Benchmark: merging two Flux-shaped ComfyUI scaled-fp8 models 0.5/0.5 to scaled fp8, side by side in one run.

Contenders (each in a fresh forked process; wall time and peak RssAnon, so memory-mapped file pages
don't count):
  * streaming copy (floor)  read both fp8 inputs, write one output of the same bytes, no arithmetic
  * weightsmith             plan_merge + execute_merge(dtype="keep"): decode, fp32 math, fresh scales
  * weightsmith --no-hash   the same without the output's SHA-256 (modelspec.hash_sha256)
  * ComfyUI                 both models loaded as scaled fp8 -> ModelMergeSimple -> the ModelSave path

    .venv/bin/python bench/bench_quant.py            # 2 x ~1.03 GB fp8 (hidden 3072, 2 double + 2 single blocks)
    .venv/bin/python bench/bench_quant.py --quick    # 2 x ~0.39 GB (1 double block): a faster check

Targets: weightsmith <= 1.5x the streaming copy, peak RssAnon <= 1 GB. Correctness is printed too: each
output decoded (W = q * scale) against the fp32 merge of the decoded inputs, relative to each tensor's
amax (fp8 e4m3 rounding alone allows 1/28 = 0.036 there). Inputs and outputs live in a temporary folder
deleted at the end.
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

from _util import measure, run_contender, table  # noqa: E402

from weightsmith.safetensors_io import StreamingWriter, read_header  # noqa: E402
from weightsmith.testmodels import FluxConfig, flux_shapes  # noqa: E402

FULL = FluxConfig(hidden=3072, depth=2, depth_single=2, num_heads=24, context_in=4096, vec_in=768)
QUICK = FluxConfig(hidden=3072, depth=1, depth_single=0, num_heads=24, context_in=4096, vec_in=768)
FP8 = torch.float8_e4m3fn


def write_input(path: Path, cfg: FluxConfig, seed: int, variant: str = "dev", scaled: bool = True) -> None:
    """A ComfyUI scaled-fp8 Flux file (marker, fp8 Linear weights + scale_weight, bf16 rest), written
    fast: payloads tile a block of random fp8 codes holding ±448 (as ComfyUI's quantizer leaves them),
    shifted per key and seed, each with its own scale. `scaled=False`: a plain e4m3fn file (fp8 Linear
    weights, no marker, no scales)."""
    shapes = flux_shapes(cfg, variant)
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(1 << 16, generator=gen) * 100).clamp(-448, 448)
    base[:2] = torch.tensor([448.0, -448.0])
    codes = base.to(FP8).view(torch.uint8)
    plan = {"scaled_fp8": ((2,), FP8)} if scaled else {}
    for k, s in shapes.items():
        quant = k.endswith(".weight") and len(s) == 2
        plan[k] = (s, FP8 if quant else torch.bfloat16)
        if quant and scaled:
            plan[k[:-7] + ".scale_weight"] = ((), torch.float32)
    with StreamingWriter(path, plan) as w:
        if scaled:
            w.write("scaled_fp8", torch.zeros(2, dtype=FP8))
        for i, (k, s) in enumerate(shapes.items()):
            n = torch.Size(s).numel()
            tiled = codes.roll(7 * i + 13 * seed).repeat(n // codes.numel() + 1)[:n]
            if plan[k][1] == FP8:
                w.write(k, tiled.view(FP8).reshape(s))
                if scaled:
                    w.write(k[:-7] + ".scale_weight",
                            torch.tensor(1e-4 * (1 + i % 7 + 3 * seed), dtype=torch.float32))
            else:
                w.write(k, (tiled.view(FP8).float() / 448).to(torch.bfloat16).reshape(s))


def _write_inputs(a: Path, b: Path, cfg: FluxConfig) -> None:
    write_input(a, cfg, 1)
    write_input(b, cfg, 2)


def open_decoded(path: str):
    """The package's own decoding source when it has one (issue 14's decode side), else the tests' minimal
    reader of the two ComfyUI layouts; returns (source, which)."""
    from weightsmith.sources import open_model

    src = open_model(path)
    if getattr(src, "encoding", None) is not None and any(src.encoding(k) is not None for k in src.keys()):
        return src, "weightsmith.sources.open_model"
    src.close()
    from quant_support import DecodedSource

    return DecodedSource(path), "tests/quant_support.DecodedSource (the package's decoding is not merged yet)"


def _package_decodes(path: Path) -> bool:
    """Whether open_model decodes scaled fp8 (headers only: nothing here may start torch's thread pool)."""
    from weightsmith.sources import open_model

    with open_model(path) as src:
        return getattr(src, "encoding", None) is not None and "scaled_fp8" not in src.keys()


# --------------------------------------------------------------------------------------------------
# contenders (module level: they run in forked children)


def run_weightsmith(a: str, b: str, out: str) -> None:
    from weightsmith.merge import execute_merge, plan_merge

    plan = plan_merge([open_decoded(a)[0], open_decoded(b)[0]], "weighted_sum", [0.5, 0.5])
    execute_merge(plan, out, dtype="keep")


def run_weightsmith_no_hash(a: str, b: str, out: str) -> None:
    """The same merge without modelspec.hash_sha256 (`weightsmith --no-hash`): the SHA-256 of the output
    is ~0.6 CPU-s per GB, which the streaming copy does not compute."""
    from weightsmith.provenance import without_output_hash

    with without_output_hash():
        run_weightsmith(a, b, out)


def run_copy(a: str, b: str, out: str) -> None:
    """The floor: every byte of both inputs read, one output of the same layout written, no arithmetic."""
    from weightsmith.sources import SafetensorsSource

    src = SafetensorsSource([Path(a)])
    src.nonfinite = "ignore"
    hb = read_header(b)
    buf = bytearray(max(i.nbytes for i in hb.tensors.values()))
    view = memoryview(buf)
    with open(b, "rb", buffering=0) as fb, StreamingWriter(out, {k: (src.info(k).shape, src.info(k).dtype)
                                                                 for k in src.keys()}) as w:
        for k in src.keys():
            start, end = hb.offsets[k]
            fb.seek(start)
            fb.readinto(view[: end - start])
            w.write(k, src.get(k))


def run_comfyui(a: str, b: str, out: str) -> None:
    from comfy_support import import_comfy

    import_comfy()
    import comfy.sd
    from comfy_extras.nodes_model_merging import ModelMergeSimple, save_checkpoint

    with torch.inference_mode():  # as ComfyUI's executor runs every node
        m1 = comfy.sd.load_diffusion_model(a)  # detected as scaled fp8: fp8 weights + scale_weight
        m2 = comfy.sd.load_diffusion_model(b)
        (merged,) = ModelMergeSimple().merge(m1, m2, 0.5)
        save_checkpoint(merged, filename_prefix="merged", output_dir=str(Path(out).parent))


CONTENDERS = [
    ("streaming copy (floor)", run_copy),
    ("weightsmith merge (keep: scaled fp8)", run_weightsmith),
    ("weightsmith merge, --no-hash", run_weightsmith_no_hash),
    ("ComfyUI ModelMergeSimple+save", run_comfyui),
]


def _write_error(out: Path, a: Path, b: Path, dest: Path) -> None:
    dest.write_text(_error(out, a, b))


def _error(out: Path, a: Path, b: Path) -> str:
    """Worst |decoded output - fp32 merge of the decoded inputs| / amax of that merge, over all tensors;
    and whether the output carries ComfyUI's marker."""
    from quant_support import DecodedSource
    from safetensors import safe_open

    worst = 0.0
    with DecodedSource(a) as sa, DecodedSource(b) as sb, DecodedSource(out) as so:
        prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.") if any(k.startswith(p) for k in so.keys())), "")
        for k in sa.keys():
            want = 0.5 * sa.get(k).float() + 0.5 * sb.get(k).float()
            got = so.get(prefix + k).float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
        n_enc = sum(so.encoding(k) is not None for k in so.keys())
    with safe_open(str(out), "pt") as f:
        marker = any(k.endswith("scaled_fp8") for k in f.keys())
    return f"max |decoded - fp32 merge| / amax = {worst:.4f}; {n_enc} fp8 tensors, marker {'yes' if marker else 'no'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (~0.39 GB each) for a faster check")
    ap.add_argument("--workdir", default=None, help="where to put the temporary inputs/outputs (default: a temp dir)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: comfy")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is kept")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = Path(tempfile.mkdtemp(prefix="ws-bench-quant-", dir=args.workdir))
    ok = True
    try:
        a, b = work / "a.safetensors", work / "b.safetensors"
        t0 = time.perf_counter()
        measure("generate inputs", _write_inputs, a, b, cfg)  # in a child: no OpenMP pool before the forks
        size = a.stat().st_size
        n_params = sum(i.numel for i in read_header(a).tensors.values())
        print(f"inputs: 2 x {size / 1e9:.2f} GB scaled fp8 e4m3fn ({n_params / 1e9:.3f} B params, hidden {cfg.hidden}, "
              f"{cfg.depth} double + {cfg.depth_single} single blocks), generated in {time.perf_counter() - t0:.1f} s; "
              f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
        print("weightsmith reads the inputs through " + ("weightsmith.sources.open_model" if _package_decodes(a)
                                                          else "tests/quant_support.DecodedSource (the package's "
                                                               "decoding is not merged yet)"))
        rows = []
        cpu_seconds: dict[str, float] = {}
        for name, fn in CONTENDERS:
            if "comfy" in skip and "ComfyUI" in name:
                continue
            out_dir = work / name.split()[0].lower().replace(",", "") / str(len(rows))
            out_dir.mkdir(parents=True)
            out = out_dir / "out.safetensors"
            m = run_contender(name, fn, (str(a), str(b), str(out)), warm=[a, b], outputs=[out_dir], repeat=args.repeat)
            if m.failed:
                print(f"{name}: FAILED ({m.failed})")
                ok = False
                continue
            cpu = cpu_seconds[name] = m.cpu
            produced = list(out_dir.glob("*.safetensors"))
            print(f"  {name}: {m.seconds:.2f} s wall, {cpu:.2f} s CPU, peak RssAnon {m.peak_anon / 2**20:.0f} MB"
                  + ("" if produced else "  (no output file!)"))
            if produced and "copy" not in name:
                # checked in a child too: torch's thread pool must not start in this process (see above)
                measure("check", _write_error, produced[0], a, b, out_dir / "check.txt")
                print(f"    {(out_dir / 'check.txt').read_text()}")
            rows.append(m)
            for f in produced:
                f.unlink()
        print()
        print(table(rows, "streaming copy (floor)"))
        base_cpu = cpu_seconds.get("streaming copy (floor)")
        if base_cpu:
            print("CPU seconds (user+sys, all threads; steadier than wall time on a shared machine): "
                  + ", ".join(f"{n.split()[0]} {c:.2f} ({c / base_cpu:.1f}x)" for n, c in cpu_seconds.items()))
        by = {r.name: r for r in rows}
        ours, floor = by.get("weightsmith merge (keep: scaled fp8)"), by.get("streaming copy (floor)")
        if ours and floor:
            ratio = ours.seconds / floor.seconds
            print(f"\nweightsmith: {ratio:.2f}x the streaming copy (target <= 1.5x), peak RssAnon "
                  f"{ours.peak_anon / 2**30:.2f} GB (target <= 1 GB)")
            bare = by.get("weightsmith merge, --no-hash")
            if bare:
                print(f"without the output hash: {bare.seconds / floor.seconds:.2f}x the streaming copy")
            comfy = by.get("ComfyUI ModelMergeSimple+save")
            if comfy:
                print(f"ComfyUI: {comfy.seconds / ours.seconds:.1f}x weightsmith's time, "
                      f"{comfy.peak_anon / max(1, ours.peak_anon):.1f}x its peak RssAnon")
            ok = ok and ratio <= 1.5 and ours.peak_anon <= 1 << 30
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
