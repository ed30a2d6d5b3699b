"""Full-size benchmark suite (issue 20): every capability on real-size Flux files, each side by side in one run
with a plain streaming copy of the same bytes (the floor) and, where ComfyUI has a route, ComfyUI's own.

    make bench-full                                   # full size (19 double + 38 single blocks), then 2+2
    .venv/bin/python bench/bench_full.py --blocks 2+2 # the same suite on ~1 GB files (minutes)
    .venv/bin/python bench/bench_full.py --sizes full,2+2 --only merge,ties --cache /big/disk/wsbench

Inputs (cached between runs in --cache, default $WEIGHTSMITH_BENCH_CACHE or ~/.cache/weightsmith-bench-full;
written atomically, so an interrupted generation leaves no half file): Flux-dev-shaped ComfyUI scaled fp8
e4m3 A and B (the real key set and shapes, 11.9 GB each at full size), a Flux-schnell-shaped plain e4m3 C
(the mix's third input and the bake's model, when the disk budget allows), 4 rank-32 LoRAs (bake) and 4 rank-64 LoRAs (compose)
over every linear layer. A bf16 pair is not generated: at full size it needs 48 GB of inputs.

Per operation, in fresh forked processes: our wall and CPU time, peak RssAnon (sampled from /proc; file
pages of memory-mapped inputs don't count), the floor (`_util.stream_copy`: every input byte read, an output
of the named size written, fsync'd and renamed like ours), the ratio to the floor against the issue's
target, and ComfyUI's route under a hard RssAnon cap (--comfy-cap-gb, default 8): its time and memory, or
the failure and the memory it reached (a result, not a skip). The merge's output is checked bit for bit on
a sample of keys against an independent per-tensor reference (safetensors + torch's own fp8 decoding), and
the extraction's error against the optimum (exact truncated SVD) on a sample of layers. With two sizes,
a last section compares each operation's peak RssAnon across them (it must be flat in model size).

Disk: before generating, the suite checks that the cache stays within --max-data-gb (default 40) and that
at least --min-free-gb (default 15) stay free, and stops with a clear message otherwise; every output is
deleted as soon as it is measured. Timings are noisy on a shared machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _util import Measurement, free_bytes, measure, run_contender, stream_copy  # noqa: E402

from weightsmith.testmodels import FLUX_FULL, FluxConfig, flux_shapes  # noqa: E402

GB = 10**9
TARGETS = {  # operation -> (max ratio to the floor, max peak RssAnon in bytes)
    "merge weighted_sum": (1.2, 1 << 30),
    "merge ties": (1.2, 1 << 30),
    "mix 3->1": (1.3, 1 << 30),
    "extract rank 64": (None, 3 << 29),
    "extract energy": (None, 3 << 29),
    "bake 4 x r32": (1.3, 1 << 30),
    "compose exact": (None, None),
    "compose -> r64": (None, None),
}
OPERATIONS = ("merge", "ties", "mix", "extract", "energy", "bake", "compose")
CACHE_VERSION = "v1"  # part of every cached file name: bump when the generators change


def parse_blocks(text: str) -> FluxConfig:
    if text == "full":
        return FLUX_FULL
    d, _, s = text.partition("+")
    return FluxConfig(hidden=3072, depth=int(d), depth_single=int(s or 0), num_heads=24, context_in=4096, vec_in=768)


def size_label(cfg: FluxConfig) -> str:
    return "full" if cfg == FLUX_FULL else f"{cfg.depth}+{cfg.depth_single}"


def fp8_file_bytes(cfg: FluxConfig, variant: str) -> int:
    """The size of a generated fp8 file: Linear weights 1 byte per value, the rest bf16 (+ small scales)."""
    n = 0
    for k, s in flux_shapes(cfg, variant).items():
        numel = torch.Size(s).numel()
        n += numel if (k.endswith(".weight") and len(s) == 2) else 2 * numel
    return n


def lora_bytes(cfg: FluxConfig, rank: int, variant: str = "dev") -> int:
    return sum(2 * rank * (s[0] + s[1]) for k, s in flux_shapes(cfg, variant).items() if len(s) == 2)


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass
class Inputs:
    cfg: FluxConfig
    folder: Path
    a: Path = field(init=False)
    b: Path = field(init=False)
    c: Path = field(init=False)
    bake_loras: list[Path] = field(init=False)
    compose_loras: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        tag = f"{CACHE_VERSION}-{size_label(self.cfg)}"
        f = self.folder
        self.a = f / f"flux-dev-scaled-e4m3-{tag}-s1.safetensors"
        self.b = f / f"flux-dev-scaled-e4m3-{tag}-s2.safetensors"
        self.c = f / f"flux-schnell-e4m3-{tag}-s3.safetensors"
        self.bake_loras = [f / f"lora-r32-{tag}-{i}.safetensors" for i in range(4)]
        self.compose_loras = [f / f"lora-r64-{tag}-{i}.safetensors" for i in range(4)]

    def planned(self, ops: set[str]) -> dict[Path, int]:
        """The files the chosen operations need -> their expected size."""
        want: dict[Path, int] = {}
        if ops & {"merge", "ties", "mix", "extract", "energy", "bake"}:
            want[self.a] = fp8_file_bytes(self.cfg, "dev")
        if ops & {"merge", "ties", "mix", "extract", "energy"}:
            want[self.b] = fp8_file_bytes(self.cfg, "dev")
        if ops & {"mix", "bake"}:
            want[self.c] = fp8_file_bytes(self.cfg, "schnell")
        if "bake" in ops:
            want.update({p: lora_bytes(self.cfg, 32, "schnell") for p in self.bake_loras})
        if "compose" in ops:
            want.update({p: lora_bytes(self.cfg, 64) for p in self.compose_loras})
        return want


def _gen_model(path: str, cfg: FluxConfig, seed: int, variant: str, scaled: bool) -> None:
    from bench_quant import write_input

    write_input(Path(path), cfg, seed, variant=variant, scaled=scaled)


def _gen_lora(path: str, cfg: FluxConfig, rank: int, seed: int, variant: str = "dev") -> None:
    from weightsmith.lora.formats import save_lora
    from weightsmith.lora.testloras import random_lora

    save_lora(random_lora(flux_shapes(cfg, variant), "flux", rank=rank, seed=seed), path, dtype=torch.bfloat16)


class DiskBudget(SystemExit):
    pass


def cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def check_disk(folder: Path, need: int, what: str, max_data: int, min_free: int) -> None:
    """Stop, saying what and how much, when `need` more bytes would break the budget."""
    free, held = free_bytes(folder), cache_bytes(folder)
    if held + need > max_data:
        raise DiskBudget(f"bench-full: {what} needs {need / GB:.1f} GB more; the cache {folder} already holds "
                         f"{held / GB:.1f} GB and the budget is {max_data / GB:.0f} GB (--max-data-gb). Free space "
                         "in the cache, raise the budget, or choose fewer operations (--only)")
    if free - need < min_free:
        raise DiskBudget(f"bench-full: {what} needs {need / GB:.1f} GB, leaving {(free - need) / GB:.1f} GB free on "
                         f"{folder}'s disk (minimum {min_free / GB:.0f} GB, --min-free-gb). Choose another --cache disk, "
                         "free space, or run fewer operations (--only)")


def output_bytes(inp: Inputs, ops: set[str]) -> int:
    """The largest output the chosen operations write (each is deleted before the next runs)."""
    sizes = [0]
    if ops & {"merge", "ties", "mix", "bake"}:
        sizes.append(fp8_file_bytes(inp.cfg, "dev"))
    if "compose" in ops:
        sizes.append(4 * lora_bytes(inp.cfg, 64))
    return max(sizes)


def fit_to_disk(inp: Inputs, ops: set[str], max_data: int, min_free: int) -> set[str]:
    """The operations whose missing inputs and largest output fit the budget: the mix (a third model) is
    left out first, saying why; when even the rest does not fit, DiskBudget stops the suite."""
    def need(o: set[str]) -> int:
        return sum(n for p, n in inp.planned(o).items() if not p.exists()) + output_bytes(inp, o)

    if ops & {"mix", "bake"}:
        try:
            check_disk(inp.folder, need(ops), "the inputs and outputs of every operation", max_data, min_free)
            return ops
        except DiskBudget as e:
            print(f"[{size_label(inp.cfg)}] mix 3->1 and bake left out (their third model C does not fit): {e}")
            ops = ops - {"mix", "bake"}
    check_disk(inp.folder, need(ops), "the inputs and outputs", max_data, min_free)
    return ops


def ensure_inputs(inp: Inputs, ops: set[str]) -> float:
    """Generate the missing inputs (each in a child: torch's thread pool must not start here before the
    contenders fork); returns the seconds generation took (0 when all were cached)."""
    missing = [p for p in inp.planned(ops) if not p.exists()]
    t0 = time.perf_counter()
    for p in missing:
        t = time.perf_counter()
        if p == inp.a:
            measure("gen", _gen_model, str(p), inp.cfg, 1, "dev", True)
        elif p == inp.b:
            measure("gen", _gen_model, str(p), inp.cfg, 2, "dev", True)
        elif p == inp.c:
            measure("gen", _gen_model, str(p), inp.cfg, 3, "schnell", False)
        elif p in inp.bake_loras:
            measure("gen", _gen_lora, str(p), inp.cfg, 32, 10 + inp.bake_loras.index(p), "schnell")
        else:
            measure("gen", _gen_lora, str(p), inp.cfg, 64, 20 + inp.compose_loras.index(p))
        print(f"  generated {p.name}: {p.stat().st_size / GB:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    return time.perf_counter() - t0 if missing else 0.0


# --------------------------------------------------------------------------------------------------
# contenders (module level: they run in forked children)


def ours_merge(a: str, b: str, out: str, method: str) -> None:
    from weightsmith.merge import execute_merge, plan_merge

    execute_merge(plan_merge([a, b], method, [0.5, 0.5] if method == "weighted_sum" else None), out, dtype="keep")


def ours_mix(a: str, b: str, c: str, out: str) -> None:
    from weightsmith.mix import lossless_mix

    lossless_mix(a, b, c, out=out)


def ours_extract(a: str, b: str, out: str, rank_mode: str) -> None:
    from weightsmith.lora.extract import extract_lora
    from weightsmith.lora.formats import save_lora

    lora, _ = extract_lora(a, b, 64, rank_mode=rank_mode)
    save_lora(lora, out)


def ours_bake(model: str, loras: list[str], out: str) -> None:
    """Into the plain e4m3 model (bake writes plain dtypes; the output keeps fp8, the input's size)."""
    from weightsmith.bake import bake

    bake(model, [(p, 0.5) for p in loras], out)


def ours_compose(loras: list[str], out: str, rank: int | None) -> None:
    from weightsmith.cli import main

    args = ["compose", *[f"{p}:0.5" for p in loras], "-o", out]
    if rank:
        args += ["--rank", str(rank)]
    code = main(args)
    if code not in (0, None):
        raise SystemExit(f"compose failed (exit {code})")


def comfy_merge(a: str, b: str, out: str) -> None:
    from bench_quant import run_comfyui

    run_comfyui(a, b, out)


def comfy_extract(a: str, b: str, out: str) -> None:
    """ComfyUI's own extraction route: both models loaded, ModelMergeSubtract (tuned - base), LoraSave at
    rank 64 (its per-layer SVD), as the nodes run in a workflow."""
    from comfy_support import import_comfy

    import_comfy()
    import comfy.sd
    import folder_paths
    from comfy_extras.nodes_lora_extract import LoraSave
    from comfy_extras.nodes_model_merging import ModelSubtract

    folder_paths.set_output_directory(str(Path(out).parent))
    with torch.inference_mode():
        base = comfy.sd.load_diffusion_model(a)
        tuned = comfy.sd.load_diffusion_model(b)
        (diff,) = ModelSubtract().merge(tuned, base, 1.0)
        LoraSave.execute("comfy_extract", 64, "standard", False, model_diff=diff)


# --------------------------------------------------------------------------------------------------
# checks (run in children too)


def _merge_reference(a: str, b: str, out: str, report: str, sample: int = 8) -> None:
    """The merge output against an independent per-tensor reference on `sample` keys: the inputs read with
    safetensors and decoded with torch's own fp8 conversion (q.float() * scale), 0.5·a + 0.5·b in fp32, the
    fresh scale amax / 448 and torch's fp8 cast; payload and scale must be equal bit for bit."""
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb, safe_open(out, "pt") as fo:
        out_keys = {k.split("diffusion_model.")[-1]: k for k in fo.keys()}
        weights = [k for k in fa.keys() if k.endswith(".weight") and k[:-7] + ".scale_weight" in fa.keys()]
        plain = [k for k in fa.keys() if k.endswith(".bias")]
        step = max(1, len(weights) // sample)
        keys = weights[::step][:sample] + plain[:: max(1, len(plain) // 2)][:2]
        bad = []
        for k in keys:
            ya = fa.get_tensor(k).float()
            yb = fb.get_tensor(k).float()
            if k in weights:
                ya = ya * fa.get_tensor(k[:-7] + ".scale_weight").float()
                yb = yb * fb.get_tensor(k[:-7] + ".scale_weight").float()
            y = ya * 0.5
            y += yb * 0.5
            got = fo.get_tensor(out_keys[k])
            if k in weights:
                amax = float(y.abs().max())
                scale = torch.tensor(amax, dtype=torch.float32) / 448.0
                want = (y / scale).to(torch.float8_e4m3fn)
                got_scale = fo.get_tensor(out_keys[k][:-7] + ".scale_weight")
                ok = torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(got_scale, scale)
            else:
                ok = torch.equal(got, y.to(got.dtype))
            if not ok:
                bad.append(k)
    Path(report).write_text(f"{len(keys) - len(bad)}/{len(keys)} sampled keys bit-identical to an independent "
                            f"per-tensor reference" + (f"; DIFFER: {', '.join(bad)}" if bad else ""))


def _extract_error(a: str, b: str, lora_path: str, report: str, sample: int = 4) -> None:
    """Relative error ‖ΔW − up·down·scale‖/‖ΔW‖ of the extracted LoRA vs the exact truncated SVD at the
    same rank, on `sample` linear layers spread over the model."""
    from weightsmith.lora.formats import load_lora
    from weightsmith.sources import open_model

    lora = load_lora(lora_path)
    ratios = []
    with open_model(a) as sa, open_model(b) as sb:
        names = [m for m, d in lora.modules.items() if d.terms]
        for m in names[:: max(1, len(names) // sample)][:sample]:
            key = next(k for k in sa.keys() if k.endswith(m.split("diffusion_model.")[-1] + ".weight"))
            delta = sb.get(key).float() - sa.get(key).float()
            t = lora.modules[m].terms[0]
            approx = t.delta().reshape(delta.shape)
            err = float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))
            s = torch.linalg.svdvals(delta)
            r = t.rank
            opt = float(torch.sqrt((s[r:] ** 2).sum() / (s**2).sum()))
            ratios.append((m, r, err, opt))
    # where the optimum is ~0 (a delta of rank < the LoRA's) the ratio says nothing: the bf16 factors'
    # rounding is then the whole error, shown as is
    real = [e / o for _, _, e, o in ratios if o >= 0.01]
    Path(report).write_text(f"relative error ours/optimum on {len(ratios)} layers"
                            + (f" (worst ratio {max(real):.4f}x where the optimum is >= 0.01)" if real else "") + ": "
                            + ", ".join(f"{m.split('.')[-2]}.{m.split('.')[-1]} r{r} {e:.4f}/{o:.4f}"
                                        for m, r, e, o in ratios))


# --------------------------------------------------------------------------------------------------
# the suite


@dataclass
class Row:
    size: str
    op: str
    ours: Measurement | None
    floor: Measurement | None
    comfy: Measurement | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours and self.floor and not self.ours.failed and not self.floor.failed:
            return self.ours.seconds / self.floor.seconds
        return None


def _fmt_comfy(m: Measurement | None) -> str:
    if m is None:
        return "-"
    if m.failed:
        return f"FAILED at {m.peak_anon / 2**30:.1f} GB: {m.failed}"
    return f"{m.seconds:.1f} s, {m.peak_anon / 2**30:.2f} GB"


def _verdict(row: Row) -> str:
    ratio_max, mem_max = TARGETS.get(row.op, (None, None))
    parts = []
    if ratio_max is not None and row.ratio is not None:
        parts.append(f"{'ok' if row.ratio <= ratio_max else 'MISSED'} <= {ratio_max}x")
    if mem_max is not None and row.ours and not row.ours.failed:
        parts.append(f"{'ok' if row.ours.peak_anon <= mem_max else 'MISSED'} <= {mem_max / 2**30:.1f} GB")
    return ", ".join(parts)


def print_table(rows: list[Row]) -> None:
    head = (f"{'size':<5} {'operation':<19} {'ours s':>8} {'CPU s':>7} {'floor s':>8} {'ratio':>6} "
            f"{'peak RssAnon':>12}  {'targets':<28} ComfyUI (time, RssAnon) / note")
    print(head)
    print("-" * len(head))
    for r in rows:
        o = r.ours
        ours = "-" if o is None else ("FAILED" if o.failed else f"{o.seconds:8.1f}")
        cpu = "-" if o is None or o.failed else f"{o.cpu:7.1f}"
        floor = "-" if r.floor is None else f"{r.floor.seconds:8.1f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:5.2f}x"
        peak = "-" if o is None else f"{o.peak_anon / 2**30:9.2f} GB"
        tail = _fmt_comfy(r.comfy) if r.comfy else ""
        if r.note:
            tail = f"{tail}; {r.note}" if tail else r.note
        if o is not None and o.failed:
            tail = f"ours failed: {o.failed}; {tail}"
        print(f"{r.size:<5} {r.op:<19} {ours:>8} {cpu:>7} {floor:>8} {ratio:>6} {peak:>12}  {_verdict(r):<28} {tail}")


def copy_each(inputs: list[str], out: str) -> None:
    """The mix's floor (as bench_mix): every input streamed to an output of its own size, one after the
    other, each fsync'd and renamed over the one before (the bytes of three copies written, the disk
    holding one: at full size three 11.9 GB copies did not fit beside the inputs)."""
    for path in inputs:
        stream_copy([path], out)


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def run_size(cfg: FluxConfig, ops: set[str], args, cache: Path) -> list[Row]:
    label = size_label(cfg)
    inp = Inputs(cfg, cache)
    ops = fit_to_disk(inp, ops, int(args.max_data_gb * GB), int(args.min_free_gb * GB))
    secs = ensure_inputs(inp, ops)
    n_params = sum(torch.Size(s).numel() for s in flux_shapes(cfg, "dev").values())
    print(f"[{label}] inputs: {n_params / 1e9:.2f} B params, A/B {_size(inp.a) / GB:.2f} GB scaled fp8 e4m3 each"
          + (f", generated in {secs:.0f} s" if secs else " (cached)") + f"; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    out_dir = cache / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "out.safetensors"
    comfy_cap = int(args.comfy_cap_gb * 2**30)
    rows: list[Row] = []
    a, b = str(inp.a), str(inp.b)

    def clean() -> None:
        for f in out_dir.iterdir():
            f.unlink()

    def go(name, fn, fargs, warm, **kw) -> Measurement:
        clean()
        m = run_contender(name, fn, fargs, warm=warm, outputs=[out], repeat=args.repeat, **kw)
        print(f"  [{label}] {name}: " + (f"FAILED ({m.failed}), reached {m.peak_anon / 2**30:.2f} GB" if m.failed else
                                        f"{m.seconds:.1f} s wall, {m.cpu:.1f} s CPU, peak RssAnon "
                                        f"{m.peak_anon / 2**30:.2f} GB"), flush=True)
        return m

    if ops & {"merge", "ties"}:
        floor = go("floor: copy A+B -> 1", stream_copy, ([a, b], str(out)), [inp.a, inp.b])
        if "merge" in ops:
            m = go("merge weighted_sum", ours_merge, (a, b, str(out), "weighted_sum"), [inp.a, inp.b])
            note = ""
            if not m.failed:
                measure("check", _merge_reference, a, b, str(out), str(out_dir / "check.txt"))
                note = (out_dir / "check.txt").read_text()
            comfy = None
            if not args.skip_comfy:
                comfy = go("ComfyUI merge (ModelMergeSimple+save)", comfy_merge, (a, b, str(out)), [inp.a, inp.b],
                           cap_bytes=comfy_cap, timeout=args.comfy_timeout)
            rows.append(Row(label, "merge weighted_sum", m, floor, comfy, note))
        if "ties" in ops:
            rows.append(Row(label, "merge ties", go("merge ties", ours_merge, (a, b, str(out), "ties"),
                                                    [inp.a, inp.b]), floor))
    if "mix" in ops:
        trio = [inp.a, inp.b, inp.c]
        floor = go("floor: copy A, B, C -> 3", copy_each, ([str(p) for p in trio], str(out)), trio)
        rows.append(Row(label, "mix 3->1", go("mix 3->1", ours_mix, (a, b, str(inp.c), str(out)), trio), floor,
                        note="floor writes all three inputs' bytes (as bench_mix)"))
    if ops & {"extract", "energy"}:
        floor = go("floor: read A+B", stream_copy, ([a, b], str(out), 64 << 20), [inp.a, inp.b])
        for op, mode in (("extract", "fixed"), ("energy", "energy")):
            if op not in ops:
                continue
            name = "extract rank 64" if mode == "fixed" else "extract energy"
            m = go(name, ours_extract, (a, b, str(out), mode), [inp.a, inp.b])
            note = ""
            if not m.failed and out.exists():
                measure("check", _extract_error, a, b, str(out), str(out_dir / "check.txt"))
                note = (out_dir / "check.txt").read_text()
            comfy = None
            if mode == "fixed" and not args.skip_comfy:
                comfy = go("ComfyUI extraction (Subtract+LoraSave r64)", comfy_extract, (a, b, str(out)),
                           [inp.a, inp.b], cap_bytes=comfy_cap, timeout=args.comfy_timeout)
            rows.append(Row(label, name, m, floor, comfy, note))
    if "bake" in ops:
        loras = [str(p) for p in inp.bake_loras]
        floor = go("floor: copy model (+ read LoRAs)", stream_copy, ([str(inp.c), *loras], str(out), _size(inp.c)),
                   [inp.c, *inp.bake_loras])
        rows.append(Row(label, "bake 4 x r32", go("bake 4 x r32", ours_bake, (str(inp.c), loras, str(out)),
                                                  [inp.c, *inp.bake_loras]), floor,
                        note="into the plain e4m3 schnell-shaped model C"))
    if "compose" in ops:
        loras = [str(p) for p in inp.compose_loras]
        for name, rank in (("compose exact", None), ("compose -> r64", 64)):
            m = go(name, ours_compose, (loras, str(out), rank), inp.compose_loras)
            produced = _size(out)
            floor = go(f"floor: read 4 LoRAs, write {produced / GB:.2f} GB", stream_copy,
                       (loras, str(out), produced), inp.compose_loras)
            rows.append(Row(label, name, m, floor, note=f"output {produced / GB:.2f} GB"))
    clean()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="full,2+2",
                    help="model sizes to run, comma-separated: 'full' (19+38 blocks) or 'D+S' (default: full,2+2)")
    ap.add_argument("--blocks", default=None, help="one size only (same spelling as --sizes), e.g. 2+2")
    ap.add_argument("--only", default=",".join(OPERATIONS), help=f"operations: {','.join(OPERATIONS)}")
    ap.add_argument("--cache", default=os.environ.get("WEIGHTSMITH_BENCH_CACHE",
                                                      str(Path.home() / ".cache" / "weightsmith-bench-full")),
                    help="folder for the generated inputs, kept between runs (env WEIGHTSMITH_BENCH_CACHE)")
    ap.add_argument("--max-data-gb", type=float, default=40.0, help="most the cache + outputs may hold (default 40)")
    ap.add_argument("--min-free-gb", type=float, default=15.0, help="least free disk to leave (default 15)")
    ap.add_argument("--comfy-cap-gb", type=float, default=8.0, help="RssAnon at which ComfyUI's routes are killed")
    ap.add_argument("--comfy-timeout", type=float, default=1800.0, help="seconds before ComfyUI's routes are stopped")
    ap.add_argument("--skip-comfy", action="store_true", help="leave ComfyUI's routes out")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is kept")
    ap.add_argument("--delete-cache", action="store_true", help="delete the generated inputs at the end")
    args = ap.parse_args(argv)
    sizes = [parse_blocks(s.strip()) for s in (args.blocks or args.sizes).split(",") if s.strip()]
    ops = {o.strip() for o in args.only.split(",") if o.strip()}
    unknown = ops - set(OPERATIONS)
    if unknown:
        ap.error(f"unknown operations {sorted(unknown)}; choose from {','.join(OPERATIONS)}")
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    print(f"bench-full: cache {cache} ({free_bytes(cache) / GB:.0f} GB free), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows: list[Row] = []
    try:
        for cfg in sizes:
            rows += run_size(cfg, ops, args, cache)
    except DiskBudget as e:
        print(e)
        if rows:
            print_table(rows)
        return 2
    finally:
        if args.delete_cache:
            for p in cache.glob("*.safetensors"):
                p.unlink()
    print()
    print_table(rows)
    by_op: dict[str, list[Row]] = {}
    for r in rows:
        if r.ours and not r.ours.failed:
            by_op.setdefault(r.op, []).append(r)
    flat = [(op, rs) for op, rs in by_op.items() if len(rs) > 1]
    if flat:
        print("\npeak RssAnon by model size (flat = the same at every size):")
        for op, rs in flat:
            peaks = [r.ours.peak_anon for r in rs]
            print(f"  {op:<19} " + ", ".join(f"{r.size}: {r.ours.peak_anon / 2**30:.2f} GB" for r in rs)
                  + f"  (largest / smallest {max(peaks) / min(peaks):.2f})")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
