"""The work of each command as `KeyWork` items for `estimate.estimate`, from its plan (headers only),
with the engines' real pipeline parameters: chunk sizes, task sizes, workers and queue depths."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .estimate import Estimate, KeyWork, estimate, svd_flops
from .pipeline import TASK_ELEMS, default_workers

GGUF_BYTES_PER_ELEM = {"gguf-f32": 4.0, "gguf-f16": 2.0, "gguf-bf16": 2.0, "gguf-q8_0": 34 / 32,
                       "gguf-q6_k": 210 / 256, "gguf-q5_1": 24 / 32, "gguf-q5_0": 22 / 32, "gguf-q4_1": 20 / 32,
                       "gguf-q4_0": 18 / 32, "gguf-q5_k": 176 / 256, "gguf-q4_k": 144 / 256,
                       "gguf-q3_k": 110 / 256, "gguf-q2_k": 84 / 256}
FP8_NAMES = ("fp8", "fp8_scaled", "fp8_scaled_e5m2", "fp8_e4m3fn", "fp8_e5m2", "float8_e4m3fn", "float8_e5m2")
WEIGHTED_PASSES = 4  # per input element: copy to fp32, scale, add; the cast out (see calibration.py)
METHOD_COST = {"weighted_sum": 1.0, "add_difference": 1.0, "train_difference": 2.0, "slerp": 3.0}
HEAVY_METHOD_COST = 6.0  # TIES, DARE, DELLA… (sorting, masks, random draws per element)


def _elem_bytes(in_dtype: torch.dtype, dtype) -> float:
    """Bytes per element written for a float tensor of `in_dtype` under the output choice `dtype`."""
    if dtype is None or dtype == "keep":
        return in_dtype.itemsize
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    name = str(dtype).lower()
    if name in GGUF_BYTES_PER_ELEM:
        return GGUF_BYTES_PER_ELEM[name]
    if name in FP8_NAMES:
        return 1.0
    from .dtypes import parse_dtype

    try:
        parsed = parse_dtype(name)
    except ValueError:
        return in_dtype.itemsize
    return parsed.itemsize if parsed is not None else in_dtype.itemsize


def _encoded(src, raw: str) -> bool:
    enc = getattr(src, "encoding", None)
    try:
        return enc is not None and enc(raw) is not None
    except Exception:  # an estimate never fails a run: a source that cannot say is read as plain
        return False


def merge_estimate(plan, out: str | os.PathLike | None, dtype, device) -> Estimate:
    """A merge plan's estimate (merge/execute.py: row blocks of CPU_CHUNK_ELEMS per input, tasks of
    ~TASK_ELEMS elements, one worker per core, 2·workers+2 tasks in flight; whole-tensor methods on big
    keys run alone)."""
    from .merge.execute import ALONE_BYTES, CPU_CHUNK_ELEMS, CUDA_CHUNK_ELEMS
    from .merge.methods import METHODS

    dev = torch.device(device or "cpu")
    workers = default_workers(dev)
    chunk = CUDA_CHUNK_ELEMS if dev.type == "cuda" else CPU_CHUNK_ELEMS
    work = []
    for kp in plan.keys:
        if kp.action == "drop":
            continue
        numel = math.prod(kp.shape)
        out_b = numel * (_elem_bytes(kp.in_dtype, dtype) if kp.in_dtype.is_floating_point else kp.in_dtype.itemsize)
        infos = [plan.sources[i].info(raw) for i, raw in kp.reads]
        read = sum(i.nbytes for i in infos)
        decoded = sum(numel * 4 for (i, raw) in kp.reads if _encoded(plan.sources[i], raw))
        if kp.action == "take":
            work.append(KeyWork(read, int(out_b), numel * 2, 0, int(numel * kp.in_dtype.itemsize + decoded)))
            continue
        n = len(kp.reads)
        method = METHODS.get(kp.method)
        cost = METHOD_COST.get(kp.method, HEAVY_METHOD_COST)
        passes = numel * n * WEIGHTED_PASSES * cost
        rowwise = method is not None and method.chunkable and len(kp.shape) >= 2 and numel > chunk and kp.shape[0] > 1
        if rowwise:  # per worker: n fp32 input blocks + its staging task buffer
            per_worker = (n + 1) * chunk * 4 + min(numel, max(chunk, TASK_ELEMS)) * out_b / numel
            working = workers * per_worker + decoded
        else:
            whole = numel * 4 * (n + 2) + out_b  # fp32 inputs, result and a temporary, the cast
            alone = numel * 4 * n > ALONE_BYTES
            working = whole * (1 if alone else min(workers, 2)) + decoded
        work.append(KeyWork(read, int(out_b), passes, 0, int(working)))
    return estimate("merge", work, dev, out, inputs=plan.protect_paths(), workers=workers)


def mix_estimate(plan, sources, out: str | os.PathLike | None, device, out_dtype=None) -> Estimate:
    """A lossless-mix plan's estimate: every mixed key reads all models and compares per element."""
    from .mix import CPU_CHUNK, DEVICE_CHUNK

    dev = torch.device(device or "cpu")
    workers = default_workers(dev)
    chunk = CPU_CHUNK if dev.type == "cpu" else DEVICE_CHUNK
    a = sources[0]
    n = len(sources)
    work = []
    for kp in plan.keys:
        numel = math.prod(kp.shape)
        choice = out_dtype if out_dtype not in (None, "keep") else None
        out_b = numel * (_elem_bytes(kp.dtype, choice) if kp.dtype.is_floating_point else kp.dtype.itemsize)
        if kp.action != "mix":
            read = a.info(kp.key).nbytes
            work.append(KeyWork(read, int(out_b), numel * 2, 0, int(min(numel, TASK_ELEMS) * 4 * workers)))
            continue
        read = a.info(kp.key).nbytes + sum(s.info(r).nbytes for s, r in zip(sources[1:], kp.sources))
        passes = numel * n * 6  # distances, comparisons and the gather per candidate
        # per worker (mix.py): a staging buffer of one task in the output dtype, and three fp32 temporaries
        # of one cache-sized chunk
        working = workers * (min(numel, TASK_ELEMS) * out_b / max(numel, 1) + 3 * min(numel, chunk) * 4)
        work.append(KeyWork(read, int(out_b), passes, 0, int(working)))
    paths = [p for s in sources for p in s.paths()]
    return estimate("mix", work, dev, out, inputs=paths, workers=workers)


def bake_estimate(plan, out: str | os.PathLike | None, dtype, device) -> Estimate:
    """A bake plan's estimate: every key copied (cast), patched keys get their LoRAs' products added."""
    from .bake.execute import rowwise
    dev = torch.device(device or "cpu")
    workers = default_workers(dev)
    src = plan.source
    want = None if dtype in (None, "keep") else dtype
    work = []
    for key in src.keys():
        info = src.info(key)
        numel = info.numel
        out_b = numel * (_elem_bytes(info.dtype, want) if info.dtype.is_floating_point else info.dtype.itemsize)
        patches = plan.patches.get(key, [])
        flops = 0.0
        for p in patches:
            rank = sum(int(t.down.shape[0]) for t in getattr(p.delta, "terms", []))
            flops += 2.0 * numel * max(rank, 1)
        passes = numel * (2 + 3 * len(patches))
        if patches and rowwise(patches, tuple(info.shape)):  # row blocks in per-worker fp32 buffers (in, out)
            working = min(numel, TASK_ELEMS) * 4 * 2 * workers
        else:  # adapters take the key whole (weight and result in fp32); plain copies go in row blocks
            working = numel * 4 * (2 if patches else 0) + min(numel, TASK_ELEMS) * 4 * workers
        work.append(KeyWork(info.nbytes, int(out_b), passes, flops, int(working)))
    lora_bytes = sum(p.stat().st_size for p in plan.lora_paths if Path(p).exists())
    return estimate("bake", work, dev, out, inputs=list(src.paths()), workers=workers, held_bytes=lora_bytes)


def extract_estimate(pair, settings: dict, device, out: str | os.PathLike | None) -> Estimate:
    """An extraction's estimate, one layer at a time: ΔW in fp32 (plus the SVD's workspace) on the device,
    the LoRA held in memory until saved. Adaptive rank modes are estimated at their cap (an upper bound)."""
    from .lora.budget import initial_width
    from .lora.extract import ExtractOptions, _output_dtype, check_options, plan_extraction
    from .lora.svd import ADAPTIVE_START, POWER_ITERATIONS, oversampling, use_randomized

    dev = torch.device(device or "cpu")
    keys = {k: v for k, v in settings.items() if k in ExtractOptions.__dataclass_fields__}
    keys["dtype"] = _output_dtype(settings.get("dtype", "bf16"))
    keys["clamp_quantile"] = keys.get("clamp_quantile") or None
    opts = check_options(ExtractOptions(**keys))  # the errors extract_lora would give, before any estimate
    elem = opts.dtype.itemsize
    mode = opts.rank_mode
    plans = plan_extraction(pair, opts)
    shapes = {}
    for plan in plans:
        if plan.action == "lowrank":
            m = pair.info(plan.key).shape[0]
            n = pair.info(plan.key).numel // max(m, 1)
            shapes[plan.key] = (m, n, plan.policy.cap(min(m, n)))
    budget_rank = 0
    if mode == "budget" and opts.size:  # the allocation averages about the uniform rank of that size
        budget_rank = max(1, initial_width(list(shapes.values()), opts.size, elem, start=1) // 2)
    work = []
    factor_bytes = 0
    for plan in plans:
        info = pair.info(plan.key)
        numel = info.numel
        read = info.nbytes + pair.tuned.info(plan.key).nbytes
        if plan.action in ("diff", "diff_b"):
            work.append(KeyWork(read, numel * elem, numel * 4, 0, numel * 8))
            factor_bytes += numel * elem
            continue
        if plan.action != "lowrank":
            work.append(KeyWork(read, 0, numel * 4, 0, numel * 8))
            continue
        m, n, cap = shapes[plan.key]
        if mode == "budget":
            rank = min(cap, budget_rank)
        else:
            rank = cap if mode in ("fixed", "full") else min(cap, 2 * ADAPTIVE_START)
        exact = mode in ("full", "sv_cumulative") or opts.method == "exact" or (
            opts.method == "auto" and not use_randomized(m, n, rank))
        q = min(m, n) if exact else min(min(m, n), rank + oversampling(rank))
        flops = svd_flops(m, n, rank, "exact" if exact else "randomized") + 2.0 * m * n * rank
        # fp32 passes over the layer: the subtraction, two norms, the residual; the randomized range
        # finder's skinny products read the whole matrix each time (memory-bound, not flop-bound)
        passes = numel * (6 + (0 if exact else 2 + 2 * POWER_ITERATIONS))
        # ΔW and its converted input (bench: about twice the layer in fp32), or the exact SVD's U, Vᵀ and
        # workspace; the factors and the sketch
        working = numel * 4 * (3 if exact else 2) + (m + n) * q * 4 * 3
        out_b = (m + n) * rank * elem
        factor_bytes += out_b
        work.append(KeyWork(read, int(out_b), passes, flops, int(working)))
    notes = []
    if mode == "budget":
        for w in work:  # a first pass sketches every layer (at twice the rank): reads and passes twice
            w.read_bytes *= 2
            w.elem_passes *= 2
            w.flops *= 2.5
        notes.append("size budget: two passes over the models (spectra, then the allocated ranks)")
    size = opts.size if mode == "budget" and opts.size else sum(w.write_bytes for w in work)
    bound = mode not in ("fixed", "full", "budget")
    if bound:
        notes.append(f"rank mode {mode}: ranks depend on the spectra; the size is at most what the caps allow")
    return estimate("extract", work, dev, out, inputs=[*pair.base.paths(), *pair.tuned.paths()],
                    held_bytes=min(factor_bytes, size) if size else factor_bytes, output_bytes=size,
                    output_is_bound=bound, notes=notes)


def compose_estimate(loras, rank: int | None, energy: float | None, size: int | None, dtype: torch.dtype,
                     device, out: str | os.PathLike | None, inputs: list[Path], operation: str = "compose") -> Estimate:
    """Compose / rerank: the inputs are in memory already; per module the stacked factors, re-compressed
    through QR + an R×R SVD when a rank is asked for."""
    dev = torch.device(device or "cpu")
    elem = dtype.itemsize
    modules: dict[str, dict] = {}
    for lora in loras:
        for name, md in lora.modules.items():
            entry = modules.setdefault(name, {"rank": 0, "m": 0, "n": 0, "dense": 0})
            for t in md.terms:
                entry["rank"] += int(t.down.shape[0])
                entry["m"] = max(entry["m"], int(t.up.shape[0]))
                entry["n"] = max(entry["n"], int(t.down[0].numel()) if t.down.shape[0] else 0)
            for d in (md.diff, md.diff_b, md.set_weight):
                if d is not None:
                    entry["dense"] = max(entry["dense"], d.numel())
    work = []
    for e in modules.values():
        r_in, m, n = e["rank"], e["m"], e["n"]
        r_out = r_in if (rank is None and energy is None and size is None) else min(r_in, rank or r_in)
        recompress = r_out < r_in or energy is not None or size is not None
        flops = (4.0 * (m + n) * r_in * r_in + 22.0 * r_in**3) if recompress else 0.0
        out_b = (m + n) * r_out * elem + e["dense"] * elem
        work.append(KeyWork(0, int(out_b), (m + n) * r_in * 2 + e["dense"] * 2, flops,
                            int((m + n) * r_in * 8 * 2 + e["dense"] * 8)))
    held = sum(t.numel() * t.element_size() for lo in loras for md in lo.modules.values() for t in
               [*(x for term in md.terms for x in (term.up, term.down)),
                *(d for d in (md.diff, md.diff_b, md.set_weight) if d is not None)])
    total = size if size is not None else sum(w.write_bytes for w in work)
    return estimate(operation, work, dev, out, held_bytes=held + total, output_bytes=total,
                    output_is_bound=energy is not None)
