"""Lossless mix: element by element, keep whichever candidate model is nearest to (or farthest from) a
reference model, streaming key by key.

The rule, from the "losslessmix" script (`result = c·(|a − α·b| > |a − β·c|) + b·(|a − α·b| ≤ |a − β·c|)`):

* min ("nearest"): take c where b is strictly farther from a than c, else b — ties take b.
* max ("farthest", the script's --maxdiff): take b where b is strictly farther, else c — ties take c.
* α, β only bias the comparison; the value written is the unscaled element of b or c.

Dtype semantics (what "bit for bit" means here): the distances are computed in fp32 (fp64 if any input is
fp64) from the inputs' values, which every float dtype up to fp32 converts to exactly; the written element
is the picked input element converted to the output dtype. By default that dtype is the promotion of the
candidates' dtypes (fp16 + fp16 → fp16, fp16 + fp32 → fp32, fp16 + bf16 → fp32), so every picked element
is written exactly; the reference's dtype plays no part. Where the script's multiply-and-add form
differs from picking, picking is what is meant: −0.0 stays −0.0 (0·b + c would give +0.0) and an inf in
the element not taken cannot turn the result into NaN (0·inf). A NaN distance makes the strict comparison
false, so it counts as "not farther": min keeps b, max takes c.

N candidates (`pick_among`): the same comparison folded left to right — min gives the first nearest
candidate, max the last farthest; with two candidates it is exactly `pick_nearest`.

Planning (which keys are mixed, which are kept from a and why) is separate from execution; the executor
reads one tensor of each model at a time (memory-mapped), mixes it in small chunks on worker threads and
hands it to a writer thread feeding `StreamingWriter`, so memory stays at about two output tensors plus
a few fixed-size work chunks. The statistics and the report live in `mix_report`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .arch import arch_family, detect_arch
from .devices import resolve_device
from .dtypes import cast_for_output, dtype_name, itemsize
from .encodings import fp8_native
from .encodings.encode import KeyOutput, OutputLayout, finite_amax, parse_output, source_encoding, write_encoded
from .encodings.report import decoded_reads
from .engine import KeyJob, OutputKey, all_finite, run_keys
from .errors import BadFileError, MismatchError, OutputPathError, WeightsmithError
from .mix_native import EncodedPicks, native_input, native_mix_task, native_out_kind
from .mix_report import GROUPS, ChunkStats, MixReport, Totals, candidate_letters
from .pipeline import TASK_ELEMS, WorkerBuffers
from .progress import ProgressFn, no_progress
from .safetensors_io import StreamingWriter
from .sources import TensorSource, as_source, classify_keys, detect_diffusion_prefix, diffusion_layout

MODES = ("min", "max")
# CPU: the worker threads run torch single-threaded (pipeline.KeyPipeline), each on stripes of a tensor,
# so every op runs serially on its thread; 256K elements (1 MB of fp32 per work buffer) keep the
# temporaries in cache with few per-op overheads (CPU time per element, one thread: 32K 4.4 ns, 128K
# 2.9 ns, 256K 2.7 ns, 1M 3.5 ns).
CPU_CHUNK = 1 << 18
DEVICE_CHUNK = 1 << 25  # on an accelerator: large enough to keep it busy, small next to its memory


# ---------------------------------------------------------------------------------------------------
# Up-front checks: refuse what cannot be mixed before anything is read or written


def _mix_family(arch: str) -> str:
    """Models that can be mixed with each other: Flux dev/schnell and Chroma share their block layout (keys
    only one of them has are kept from the reference and reported); SD1.5 and SDXL do not; Flux.2 is not Flux."""
    family = arch_family(arch)
    return arch if family in ("sd", "unknown") else family


def check_same_architecture(models: Sequence[tuple[str, str]]) -> None:
    """Refuse (name, arch) pairs of different architectures, naming every model; 'unknown' matches anything
    (its keys are then matched by name and shape, and what does not match is reported)."""
    known = {_mix_family(arch) for _, arch in models if arch != "unknown"}
    if len(known) > 1:
        detail = ", ".join(f"{name}: {arch}" for name, arch in models)
        raise MismatchError(
            f"the models are different architectures ({detail}); a lossless mix compares the same weight of "
            "each model element by element: give a reference and candidates of one architecture")


def check_mixable(a: TensorSource, candidates: Sequence[TensorSource]) -> None:
    """From headers only: every model holds tensors, and all are of one architecture."""
    sources = [a, *candidates]
    for s in sources:
        if len(s) == 0:
            raise BadFileError(f"{s.name}: holds no tensors at all, so there is nothing to mix; give a model file "
                               "(the download may have failed: download it again)")
    labels = ["a", *candidate_letters(len(candidates))]
    check_same_architecture([(f"{x} {s.name}", detect_arch(s).arch) for x, s in zip(labels, sources)])


# ---------------------------------------------------------------------------------------------------
# Pure element-picking functions


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown lossless mix mode {mode!r}; choose 'min' (nearest) or 'max' (farthest)")
    return mode


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype distances are compared in: fp64 if any input is fp64, else fp32 (exact for fp8/fp16/bf16)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def output_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype that holds every candidate's elements exactly (torch promotion; fp8 pairs go to fp32)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        if d == out:
            continue
        try:
            out = torch.promote_types(out, d)
        except RuntimeError:  # torch defines no promotion between fp8 kinds
            out = torch.float32
    return out


_PROMOTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # fp8 has no mixed-dtype math


def _distance_into(buf: torch.Tensor, a: torch.Tensor, x: torch.Tensor | None, scale: float) -> torch.Tensor:
    """buf = |a − scale·x| in a's (compute) dtype, computed in place as |scale·x − a| (IEEE subtraction is
    sign-symmetric, so the bits equal the written-out formula's). x None: buf already holds x converted.
    With scale 1 (1·x is x exactly) the conversion happens inside the subtraction: one pass fewer."""
    if x is not None and scale == 1.0 and x.dtype in _PROMOTABLE:
        torch.sub(x, a, out=buf)  # x promotes to a's dtype exactly, then one rounding: same bits
    else:
        if x is not None:
            buf.copy_(x)
        if scale != 1.0:
            buf.mul_(scale)
        buf.sub_(a)
    return buf.abs_()


def _choose(a32: torch.Tensor, candidates: Sequence[torch.Tensor], scales: Sequence[float], mode: str,
            dist: torch.Tensor, best: torch.Tensor, stats: ChunkStats | None = None) -> torch.Tensor:
    """Which candidate each element takes: a bool mask (True = the second) for two candidates, else a
    uint8 index. `dist` and `best` are work buffers shaped like `a32` (flat, compute dtype)."""
    n = len(candidates)
    full = stats is not None and stats.full
    pair = full and n == 2  # b and c are needed side by side for b·c
    if full:  # the statistics need the candidates converted; the distances then work in place
        best.copy_(candidates[0])
        stats.reference(a32)
        stats.candidate(0, a32, best)
    if pair:
        dist.copy_(candidates[1])
        stats.candidate(1, a32, dist)
        stats.bc += float(torch.dot(best, dist))
    _distance_into(best, a32, None if full else candidates[0], scales[0])
    if stats is not None:
        stats.check(best)
    index = None
    for i in range(1, n):
        if full and not pair:
            dist.copy_(candidates[i])
            stats.candidate(i, a32, dist)
        _distance_into(dist, a32, None if full else candidates[i], scales[i])
        if stats is not None:
            stats.check(dist)
        take = torch.gt(best, dist)  # the best so far strictly farther (False on ties and NaN)
        if mode == "max":
            take.logical_not_()
        if n == 2:
            if full:
                stats.ties += int(torch.count_nonzero(torch.eq(best, dist)))
            return take
        if index is None:
            index = torch.zeros(a32.shape, dtype=torch.uint8, device=a32.device)
        index.masked_fill_(take, i)
        if i < n - 1:
            _select(take, dist, best, best)
    assert index is not None
    return index


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _select(take: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = if_true where `take`, else if_false: the same bits as torch.where (−0.0, NaN payloads kept),
    blended as integers (f ^ ((f ^ t) & −take)). torch.where on an unpredictable mask runs a branchy
    loop: measured 7-24 ns per element on one thread, the blend 0.3 ns, so it was most of a mix's time.
    All three tensors share one dtype; `out` may be `if_false` or `if_true` itself."""
    bits = _BITS.get(out.element_size())
    if bits is None or take.device.type != "cpu":
        return torch.where(take, if_true, if_false, out=out)
    t, f, o = (x.view(bits) for x in (if_true, if_false, out))
    mask = take.to(bits).neg_()  # 0 or all ones
    if o.data_ptr() == f.data_ptr():
        return out.view(bits).bitwise_xor_(torch.bitwise_xor(f, t).bitwise_and_(mask)).view(out.dtype)
    torch.bitwise_xor(f, t, out=o)
    o.bitwise_and_(mask).bitwise_xor_(f)
    return out


def _gather(choice: torch.Tensor, candidates: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out = the chosen candidate's element, converted to out's dtype."""
    xs = [x.to(out.dtype) for x in candidates]
    if choice.dtype == torch.bool:
        return _select(choice, xs[1], xs[0], out)
    out.copy_(xs[0])
    for i in range(1, len(xs)):
        _select(choice == i, xs[i], out, out)
    return out


def _check_same_shape(a: torch.Tensor, candidates: Sequence[torch.Tensor]) -> None:
    for i, x in enumerate(candidates):
        if x.shape != a.shape:
            raise MismatchError(f"candidate {i} has shape {tuple(x.shape)}, the reference {tuple(a.shape)}; "
                                "lossless mix never broadcasts")
        if not (x.is_floating_point() and a.is_floating_point()):
            raise MismatchError(f"lossless mix needs float tensors, got {a.dtype} and {x.dtype}")


@torch.no_grad()
def pick_index(a: torch.Tensor, candidates: Sequence[torch.Tensor], scales: Sequence[float] | None = None,
               mode: str = "min") -> torch.Tensor:
    """uint8 tensor shaped like `a`: the index of the candidate each element takes."""
    _check_mode(mode)
    if len(candidates) < 2:
        raise ValueError("lossless mix needs at least two candidates")
    if len(candidates) > 255:
        raise ValueError("at most 255 candidates")
    scales = [1.0] * len(candidates) if scales is None else [float(s) for s in scales]
    if len(scales) != len(candidates):
        raise ValueError(f"{len(scales)} scales for {len(candidates)} candidates")
    _check_same_shape(a, candidates)
    cd = compute_dtype(a.dtype, *(x.dtype for x in candidates))
    flat = [x.reshape(-1) for x in candidates]
    a32 = a.reshape(-1).to(cd)
    dist, best = torch.empty_like(a32), torch.empty_like(a32)
    choice = _choose(a32, flat, scales, mode, dist, best)
    return choice.to(torch.uint8).reshape(a.shape)


@torch.no_grad()
def pick_among(a: torch.Tensor, candidates: Sequence[torch.Tensor], scales: Sequence[float] | None = None,
               mode: str = "min", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per element, the candidate nearest to (min) or farthest from (max) `a`, compared as |a − s_i·x_i|.
    Ties: min takes the earliest nearest, max the latest farthest. The value is the unscaled candidate's."""
    index = pick_index(a, candidates, scales, mode)
    dt = out_dtype or output_dtype([x.dtype for x in candidates])
    out = torch.empty(a.shape, dtype=dt, device=a.device)
    choice = index.bool() if len(candidates) == 2 else index
    return _gather(choice, candidates, out)


def pick_nearest(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float = 1.0, beta: float = 1.0,
                 mode: str = "min", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The losslessmix rule: min → c where |a − α·b| > |a − β·c| else b; max → b there else c."""
    return pick_among(a, [b, c], [alpha, beta], mode, out_dtype)


# ---------------------------------------------------------------------------------------------------
# Planning: what happens to each key of the reference


@dataclass
class KeyPlan:
    key: str  # a's key, also the output key
    group: str  # unet / te / vae / other
    block: str  # report row, e.g. double_blocks.3, input_blocks.4, te
    action: str  # "mix" or "copy"
    reason: str = ""  # for copies: outside scope / missing / mismatch / not float
    detail: str = ""
    sources: list[str] = field(default_factory=list)  # the key in each candidate (mix only)
    dtype: torch.dtype = torch.float32  # output dtype
    shape: tuple[int, ...] = ()


@dataclass
class MixPlan:
    keys: list[KeyPlan]
    names: list[str]  # a, then each candidate
    extra: dict[str, list[str]]  # candidate name -> its keys with no counterpart in a

    def mixed(self) -> list[KeyPlan]:
        return [k for k in self.keys if k.action == "mix"]

    def copied(self, reason: str) -> list[KeyPlan]:
        return [k for k in self.keys if k.action == "copy" and k.reason == reason]

    def output_specs(self, mode: str = "min") -> list[OutputKey]:
        """Every output key in the engine's one shape (input 0 the reference, 1… the candidates): a mixed
        key is the merge method lossless_<mode> over all inputs, any other key a copy of the reference's."""
        return [OutputKey(k.key, tuple(k.shape), k.dtype,
                          ((0, k.key), *enumerate(k.sources, 1)) if k.action == "mix" else ((0, k.key),),
                          f"lossless_{mode}" if k.action == "mix" else "copy") for k in self.keys]


def _canonical(source: TensorSource) -> tuple[dict[str, str], dict[str, str]]:
    """(canonical name -> raw key, raw key -> group). Diffusion-model keys lose their prefix so that a full
    checkpoint (`model.diffusion_model.x`) lines up with a bare diffusion-model file (`x`)."""
    keys = source.keys()
    groups = classify_keys(keys)
    layout = diffusion_layout(keys)
    layout.check(source.name)
    model = {raw: name for name, raw in layout.names.items()}
    canon: dict[str, str] = {}
    for k in keys:
        g = groups[k]
        canon[f"{g}:{model[k] if g == 'unet' else k}"] = k
    return canon, groups


def _block(group: str, canon: str) -> str:
    if group != "unet":
        return group
    parts = canon.split(":", 1)[1].split(".")
    if len(parts) > 2 and parts[0].endswith("blocks") and parts[1].isdigit():  # double_blocks.3, input_blocks.4
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def plan_mix(a: TensorSource, candidates: Sequence[TensorSource], include: Sequence[str] = ("unet",),
             on_mismatch: str = "keep_a", out_dtype: torch.dtype | None = None) -> MixPlan:
    """Decide, from headers only, what happens to each of a's keys. Raises MismatchError (on_mismatch
    'error') before anything is read or written."""
    bad = set(include) - set(GROUPS)
    if bad:
        raise WeightsmithError(f"unknown key group(s) {sorted(bad)} in include; choose from {', '.join(GROUPS)}")
    if on_mismatch not in ("keep_a", "error"):
        raise WeightsmithError(f"on_mismatch must be 'keep_a' or 'error', not {on_mismatch!r}")
    a_canon, a_groups = _canonical(a)
    cands = [_canonical(c)[0] for c in candidates]
    names = [a.name] + [c.name for c in candidates]
    for name, c in zip(names[1:], cands):
        if c and a_canon and c.keys().isdisjoint(a_canon):  # under another container or prefix: nothing lines up
            raise MismatchError(f"{name}: none of its {len(c)} keys is in the reference {names[0]} (e.g. "
                                f"{min(c).split(':', 1)[1]!r} vs {min(a_canon).split(':', 1)[1]!r}); it would "
                                "contribute nothing to the mix. Give models of one architecture saved with the same "
                                "key names (`weightsmith inspect` shows a file's layout)")
    plans: list[KeyPlan] = []
    for canon, key in a_canon.items():
        info = a.info(key)
        group = a_groups[key]
        kp = KeyPlan(key, group, _block(group, canon), "copy", dtype=out_dtype or info.dtype, shape=info.shape)
        plans.append(kp)
        if not info.dtype.is_floating_point:
            kp.reason, kp.dtype = "not float", info.dtype
            continue
        if info.numel == 0:  # no element to pick: copied as it is (shape kept)
            kp.reason = "no elements"
            continue
        if group not in include:
            kp.reason = "outside scope"
            continue
        missing = [names[i + 1] for i, c in enumerate(cands) if canon not in c]
        if missing:
            kp.reason, kp.detail = "missing", "absent from " + ", ".join(missing)
            continue
        raw = [c[canon] for c in cands]
        infos = [src.info(r) for src, r in zip(candidates, raw)]
        problems = [f"{names[i + 1]} has {tuple(x.shape)} {dtype_name(x.dtype)}" for i, x in enumerate(infos)
                    if x.shape != info.shape or not x.dtype.is_floating_point]
        if problems:
            kp.reason = "mismatch"
            kp.detail = f"{names[0]} has {tuple(info.shape)} {dtype_name(info.dtype)}; " + "; ".join(problems)
            if on_mismatch == "error":
                raise MismatchError(f"tensor {key!r}: {kp.detail} (never broadcast; pass on_mismatch='keep_a' "
                                    "to keep the reference's tensor and report it)")
            continue
        kp.action, kp.sources = "mix", raw
        kp.dtype = out_dtype or output_dtype([x.dtype for x in infos])
    a_set = set(a_canon)
    extra = {names[i + 1]: sorted(c[k] for k in c if k not in a_set) for i, c in enumerate(cands)}
    return MixPlan(plans, names, {k: v for k, v in extra.items() if v})


# ---------------------------------------------------------------------------------------------------
# Execution


@torch.no_grad()
def _mix_range(a: torch.Tensor, xs: Sequence[torch.Tensor], scales: Sequence[float], mode: str, cd: torch.dtype,
               out_dtype: torch.dtype, device: torch.device, chunk: int, lo: int, hi: int, out: torch.Tensor | None,
               stats: ChunkStats, buffers: WorkerBuffers | None = None) -> None:
    """Mix elements lo:hi of flat tensors chunk by chunk on `device` (picks into `out` when given); on a CPU
    the work buffers are this thread's own when `buffers` is given (no fresh pages per task)."""
    size = min(chunk, hi - lo)
    if buffers is not None and device.type == "cpu":
        a32, dist, best = (buffers.get(slot, size, cd) for slot in ("a32", "dist", "best"))
    else:
        a32, dist, best = (torch.empty(size, dtype=cd, device=device) for _ in range(3))
    on_cpu = device.type == "cpu"
    direct = on_cpu and out is not None  # picks land straight in the output tensor
    piece = None if direct else torch.empty(size, dtype=out_dtype, device=device)
    for start in range(lo, hi, chunk):
        m = min(chunk, hi - start)
        sl = slice(start, start + m)
        a_c = a32[:m].copy_(a[sl])
        cands = [x[sl] if on_cpu else x[sl].to(device) for x in xs]
        choice = _choose(a_c, cands, scales, mode, dist[:m], best[:m], stats)
        target = out[sl] if direct else piece[:m]
        _gather(choice, cands, target)
        if choice.dtype == torch.bool:
            nc = int(torch.count_nonzero(choice))
            stats.taken[0] += m - nc
            stats.taken[1] += nc
        else:
            for i, cnt in enumerate(torch.bincount(choice.to(torch.int64), minlength=len(xs)).tolist()):
                stats.taken[i] += cnt
        if not stats.full:
            stats.elements += m
        else:
            stats.abs_change += float(dist[:m].copy_(target).sub_(a_c).abs_().sum(dtype=torch.float64))
        if out is not None and not direct:
            out[sl].copy_(target)


def _copy_task(t: torch.Tensor, dtype: torch.dtype, key: str, writer: StreamingWriter) -> None:
    writer.write(key, t if t.dtype == dtype else cast_for_output(t, dtype))


def _mix_task(flat: Sequence[torch.Tensor], scales: Sequence[float], mode: str, cd: torch.dtype,
              out_dtype: torch.dtype, device: torch.device, chunk: int, lo: int, hi: int, key: str,
              writer: StreamingWriter | None, buffers: WorkerBuffers, full: bool,
              dest: torch.Tensor | None = None) -> ChunkStats:
    """Mix elements lo:hi of one key into this thread's staging buffer and write them to their place (or,
    for a key written encoded, into `dest`: the whole key's fp32 picks, quantized once all are in)."""
    stats = ChunkStats(len(flat) - 1, full)
    if dest is not None:
        out = dest[lo:hi]
    else:
        out = buffers.get("out", hi - lo, out_dtype) if writer is not None else None
    _mix_range(flat[0][lo:hi], [x[lo:hi] for x in flat[1:]], scales, mode, cd, out_dtype, device, chunk, 0, hi - lo,
               out, stats, buffers)
    if dest is not None:
        stats.amax = finite_amax(out)  # the key is quantized with the amax of all its picks (EncodedPicks)
    elif writer is not None:
        writer.write_at(key, lo * itemsize(out_dtype), out)
    return stats


def _encode_copy_task(t: torch.Tensor, ko: KeyOutput, writer: StreamingWriter) -> None:
    write_encoded(writer, ko, t.float())


def mix_layout(plan: MixPlan, a: TensorSource, choice=None) -> OutputLayout:
    """How every output key is written: `keep` keeps the reference's encoding of the key (its keys and
    layout make the output); explicit choices as for merge. Errors come before anything is read."""
    prefix = detect_diffusion_prefix(a.keys())
    layout = OutputLayout(choice, prefix)
    for kp in plan.keys:
        name = kp.key[len(prefix):] if kp.group == "unet" and kp.key.startswith(prefix) else None
        layout.add(kp.key, kp.shape, kp.dtype, name, source_encoding(a, kp.key), a, kp.key, f"a ({a.name})")
    layout.check()
    return layout


def execute_mix(plan: MixPlan, a: TensorSource, candidates: Sequence[TensorSource], scales: Sequence[float],
                mode: str = "min", out: str | os.PathLike | None = None, dry_run: bool = False,
                device: str | torch.device = "cpu", progress: ProgressFn | None = None, stats: bool | None = None,
                overwrite: bool = False, chunk: int | None = None, metadata: Mapping[str, str] | None = None,
                layout: OutputLayout | None = None) -> MixReport:
    """Run a plan: stream every key of a (mixed or copied) into `out`, or only analyse when dry_run.
    `stats`: True for cosines and mean |change| besides the shares taken (default on dry runs only); a dry
    run with stats False computes nothing and reports the plan. `layout` (mix_layout): keys written
    encoded; default: every key plain in its plan dtype."""
    _check_mode(mode)
    layout = layout or mix_layout(plan, a)
    full = dry_run if stats is None else bool(stats)
    device = resolve_device(device)
    chunk = chunk or (CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK)
    progress = progress or no_progress
    letters = candidate_letters(len(candidates))
    t0 = time.perf_counter()
    totals: dict[str, Totals] = {}
    nonfinite: dict[str, list[str]] = {}
    # A dry run without statistics has nothing to compute: its report is the plan's key counts.
    steps = (plan.mixed() if full else []) if dry_run else plan.keys
    writer = None
    if not dry_run:
        if out is None:
            raise OutputPathError("no output path given; name an output file or ask for a dry run")
        protect = [p for s in (a, *candidates) for p in s.paths()]
        writer = StreamingWriter(out, layout.writer_plan(), layout.metadata(metadata), protect=protect,
                                 overwrite=overwrite)
    buffers = WorkerBuffers()
    task_elems = max(TASK_ELEMS, chunk)

    def finisher(kp: KeyPlan, inputs: list[torch.Tensor] | None):
        def finish(results: list) -> None:
            if kp.action == "mix":
                s = ChunkStats(len(candidates), full)
                for part in results:  # in element order: the sums do not depend on thread timing
                    s.merge(part)
                if s.nonfinite:  # rare: find out which inputs hold the NaN/Inf, for the report
                    held = inputs if inputs is not None else [a.get(kp.key)] + [c.get(k) for c, k in zip(candidates, kp.sources)]
                    for src, key, x in zip((a, *candidates), [kp.key, *kp.sources], held):
                        if not all_finite(x):
                            nonfinite.setdefault(src.name, []).append(key)
                for label in dict.fromkeys((kp.group, kp.block)):  # te/vae keys are their own block
                    totals.setdefault(label, Totals(len(candidates))).add(s)
        return finish

    def native_job(kp: KeyPlan) -> KeyJob | None:
        """The key's tasks in native passes (mix_native.py), where they give the torch route's bytes."""
        if device.type != "cpu" or full or fp8_native.library() is None or not 2 <= len(candidates) <= 8:
            return None
        srcs = [(a, kp.key)] + list(zip(candidates, kp.sources))
        if compute_dtype(*(s.info(k).dtype for s, k in srcs)) != torch.float32:
            return None
        encoded = layout.keys[kp.key].fmt is not None
        dtype = torch.float32 if encoded else kp.dtype
        ins = [native_input(s, k) for s, k in srcs]
        if any(x is None for x in ins):
            return None
        out_kind = native_out_kind(ins, dtype)
        n = ins[0].flat.numel()
        if out_kind is None or any(x.flat.numel() != n for x in ins):
            return None
        dest = torch.empty(n, dtype=torch.float32) if encoded and writer is not None else None
        return mixed_job(kp, None, dest, [partial(native_mix_task, ins, list(scales), mode, out_kind, dtype, lo,
                                                  min(n, lo + task_elems), kp.key, writer, buffers, dest)
                                          for lo in range(0, n, task_elems)])

    def mixed_job(kp: KeyPlan, inputs: list[torch.Tensor] | None, dest: torch.Tensor | None, tasks: list) -> KeyJob:
        """A mixed key's job: its tasks write their picks, or, for a key written encoded, gather them in
        `dest`, quantized by the workers once all are in (EncodedPicks) and the scale written at finish."""
        stats_of = finisher(kp, inputs)
        if dest is None:
            return KeyJob(tasks, stats_of)
        picks = EncodedPicks(layout.keys[kp.key], dest, writer, buffers, task_elems)

        def finish(results: list) -> None:
            picks.finish()
            stats_of(results)
        return KeyJob(tasks, finish, then=picks.tasks)

    def job(kp: KeyPlan) -> KeyJob:
        if kp.action == "mix" and (native := native_job(kp)) is not None:
            return native
        if kp.action == "mix":
            # inputs are read here, on the calling thread: sources need not be thread-safe
            inputs = [a.get(kp.key)] + [c.get(k) for c, k in zip(candidates, kp.sources)]
            flat = [t.reshape(-1) for t in inputs]
            cd = compute_dtype(*(t.dtype for t in inputs))
            n = flat[0].numel()
            encoded = layout.keys[kp.key].fmt is not None
            # an encoded key's picks (decoded values) gather in fp32 and are quantized when all are in
            dest = torch.empty(n, dtype=torch.float32) if encoded and writer is not None else None
            dtype = torch.float32 if encoded else kp.dtype
            return mixed_job(kp, inputs, dest, [partial(_mix_task, flat, scales, mode, cd, dtype, device, chunk, lo,
                                                        min(n, lo + task_elems), kp.key, writer, buffers, full, dest)
                                                for lo in range(0, n, task_elems)])
        if writer is not None and layout.keys[kp.key].fmt is not None:
            return KeyJob([partial(_encode_copy_task, a.get(kp.key), layout.keys[kp.key], writer)], finisher(kp, []))
        return KeyJob([partial(_copy_task, a.get(kp.key), kp.dtype, kp.key, writer)] if writer is not None else [],
                      finisher(kp, []))

    run_keys(map(job, steps), len(steps), writer=writer, device=device, progress=progress,
             before=layout.write_extras)
    if not steps:
        for kp in plan.mixed():
            for label in dict.fromkeys((kp.group, kp.block)):
                totals.setdefault(label, Totals(len(candidates))).add(None)
    rows = [tot.row(label, letters) for label, tot in totals.items() if label in GROUPS]
    rows += [tot.row(label, letters) for label, tot in totals.items() if label not in GROUPS]
    copied = {r: [k.key for k in plan.copied(r)] for r in ("outside scope", "missing", "mismatch", "not float", "no elements")}
    dtypes = layout.summary()
    sources = {"a": a, **dict(zip(letters, candidates))}
    reads = [("a", k.key) for k in plan.keys] + [(x, key) for k in plan.mixed() for x, key in zip(letters, k.sources)]
    return MixReport(mode, [float(s) for s in scales], plan.names, None if dry_run else Path(out), dry_run,
                     str(device), rows, len(plan.mixed()), {r: v for r, v in copied.items() if v},
                     {k.key: k.detail for k in plan.keys if k.detail}, plan.extra, dtypes,
                     time.perf_counter() - t0, nonfinite, decoded_reads(sources, reads))


def lossless_mix(a, b=None, c=None, *, candidates: Sequence | None = None, alpha: float = 1.0, beta: float = 1.0,
                 scales: Sequence[float] | None = None, mode: str = "min", out: str | os.PathLike | None = None,
                 include: Sequence[str] = ("unet",), on_mismatch: str = "keep_a", dry_run: bool = False,
                 device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                 out_dtype: torch.dtype | str | None = None, stats: bool | None = None, overwrite: bool = False,
                 chunk: int | None = None) -> MixReport:
    """Mix models file to file (paths, dicts or TensorSources; .safetensors, sharded, or .ckpt via
    weights_only): per element of every float key in the `include` groups, the candidate nearest to (mode
    'min') or farthest from ('max') the reference `a`. Keys outside the scope, non-float keys, keys missing
    from a candidate and mismatching keys keep a's tensor and are reported. `candidates` replaces b, c for
    N-model mixes, with `scales` (default [alpha, beta, 1, …]). Nothing is written on a dry run.
    `stats` (default: on dry runs) adds cosine similarities and mean |change| to the report's shares.
    `out_dtype`: None/'keep' (plain keys: the dtype holding every candidate exactly; keys the reference
    stores scaled-fp8 or mixed precision: that encoding again, with a fresh scale over the picked decoded
    values, so an element is then its model's value within fp8 rounding), a dtype, or 'fp8_scaled[_e5m2]'."""
    _check_mode(mode)
    choice = parse_output(out_dtype)
    cand_in = list(candidates) if candidates is not None else [x for x in (b, c) if x is not None]
    if len(cand_in) < 2:
        raise WeightsmithError("lossless mix needs a reference and at least two candidates (a, b, c)")
    if scales is None:
        scales = [alpha, beta] + [1.0] * (len(cand_in) - 2)
    if len(scales) != len(cand_in):
        raise WeightsmithError(f"{len(scales)} scales given for {len(cand_in)} candidates")
    device = resolve_device(device)
    opened: list[TensorSource] = []

    def src(x) -> TensorSource:
        s = as_source(x)
        if s is not x:
            opened.append(s)
            # NaN/Inf in mixed tensors are found by the mix itself at a fraction of a per-read isfinite pass;
            # a strict ("error") source keeps its per-read check so it refuses before anything is written
            if s.nonfinite == "report":
                s.set_nonfinite_policy("ignore")
        return s

    try:
        a_src = src(a)
        c_src = [src(x) for x in cand_in]
        check_mixable(a_src, c_src)
        plan = plan_mix(a_src, c_src, include, on_mismatch, choice.dtype)
        layout = mix_layout(plan, a_src, choice)
        if not plan.mixed():
            others = ", ".join(s.name for s in c_src)
            raise MismatchError(
                f"nothing to mix: no float tensor of {a_src.name} in the group(s) {', '.join(include)} has a "
                f"same-shaped counterpart in every candidate ({others}); give models of one architecture that "
                "hold these groups, or choose other groups to mix (include / --include unet,te,vae)")
        meta = {}
        if not dry_run:  # what A's metadata said about A is not carried over (provenance.inherited)
            from .arch import detect_arch
            from .provenance import stamp

            info = detect_arch(a_src)
            meta = stamp(a_src.metadata, output=out, operation="mix", arch=info.arch, details=info.details,
                         sources=[a_src, *c_src], merged=True, naming=info.naming,
                         summary={"mode": mode, "scales": list(scales), "include": list(include)})
        meta["weightsmith.mix"] = json.dumps({"mode": mode, "scales": [float(s) for s in scales],
                                              "reference": Path(a_src.name).name,
                                              "candidates": [Path(s.name).name for s in c_src]})
        report = execute_mix(plan, a_src, c_src, scales, mode, out, dry_run, device, progress, stats, overwrite,
                             chunk, meta, layout)
        report.notes = [f"{Path(s.name).name}: {n}" for s in (a_src, *c_src) for n in s.notes]
        report.notes += [f"{Path(s.name).name}: {n}" for s in (a_src, *c_src)
                         if (n := diffusion_layout(s.keys()).note())]
        return report
    finally:
        for s in opened:
            s.close()
