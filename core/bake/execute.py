"""Executing a bake plan: the model streamed key by key into a new file, LoRAs applied on the way.

A patched key is read once, widened to fp32 on the compute device, patched by every LoRA that targets it
in chain order — exactly the order and the arithmetic of ComfyUI's LoraLoaderModelOnly chain
(`calculate_weight`: low-rank terms and full diffs add `strength · ΔW`, LoKr/LoHa add their product, a
DoRA adapter re-normalises the weight it is given, a replacement sets it), cast once to the output dtype
and written. An unpatched key is written as it is (the bytes of the memory-mapped input) or cast.
Peak memory: the keys in flight (one fp32 copy each) plus the LoRAs' factors, never the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..devices import resolve_device
from ..dtypes import FP8_DTYPES, cast_for_output, dtype_name, parse_dtype
from ..encodings.encode import WRITABLE, KeyOutput, OutputLayout, source_encoding, write_encoded
from ..encodings.fp8 import decode_fp8, fast_decodable
from ..engine import KeyJob, run_keys, written_finite
from ..errors import WeightsmithError
from ..lora.model import ModuleDelta
from ..pipeline import TASK_ELEMS, WorkerBuffers, row_ranges
from ..progress import ProgressFn
from ..safetensors_io import StreamingWriter
from ..sources import detect_diffusion_prefix, diffusion_layout
from .plan import BakePlan, Patch

PLAIN_DTYPES = ("keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")  # plain casts: no scale tensors
DECODED_ALONE_BYTES = 64 << 20  # a decoded (fresh fp32) key larger than this is the only one in flight


def keep_layout(plan: BakePlan) -> OutputLayout:
    """`keep` for a quantized model: every key as the model stores it (encoded keys in their encoding, with
    their activation scales and marker); raises before any work for an encoding weightsmith cannot write."""
    src = plan.source
    names = {raw: name for name, raw in diffusion_layout(src.keys()).names.items()}
    layout = OutputLayout("keep", detect_diffusion_prefix(src.keys()))
    for k in src.keys():
        info = src.info(k)
        enc = source_encoding(src, k)
        if enc is not None and (enc.format, enc.stored_dtype) not in WRITABLE:
            raise WeightsmithError(f"{plan.model_name}: {k!r} is stored as {enc.format} ({dtype_name(enc.stored_dtype)}); "
                                   "bake cannot write that encoding back, so the output dtype 'keep' cannot keep it: "
                                   "choose bf16, fp16 or fp32 (quantize the baked file afterwards, e.g. `weightsmith "
                                   "convert`). Nothing was written")
        layout.add(k, tuple(info.shape), info.dtype, names.get(k), source_encoding(src, k), src, k, plan.model_name)
    layout.check()
    return layout


def apply_module(w: torch.Tensor, mod: ModuleDelta, strength: float) -> None:
    """Patch `w` (fp32, contiguous, on the compute device) in place with one module at `strength`, as
    ComfyUI's `calculate_weight` does for that module's patches: terms and diffs add, adapters patch their
    rows in order, a replacement sets the weight (strength does not scale it, as in ComfyUI)."""
    dev = w.device
    if mod.set_weight is not None:
        w.copy_(mod.set_weight.to(dev, torch.float32).reshape(w.shape))
        return
    if mod.diff_b is not None:
        w.add_(mod.diff_b.to(dev, torch.float32).reshape(w.shape), alpha=strength)
    flat = w.view(w.shape[0], -1)
    for t in mod.terms:  # addmm: no dense ΔW temporary, the weight itself is the accumulator
        s, n = t.rows if t.rows is not None else (0, w.shape[0])
        flat[s : s + n].addmm_(t.up.to(dev, torch.float32).flatten(1), t.down.to(dev, torch.float32).flatten(1),
                               alpha=t.scale * strength)
    if mod.diff is not None:
        w.add_(mod.diff.to(dev, torch.float32).reshape(w.shape), alpha=strength)
    for a in mod.adapters:
        s, n = a.rows if a.rows is not None else (0, w.shape[0])
        w[s : s + n] = a.apply(w[s : s + n], strength)


def rowwise(patches: list[Patch], shape: tuple[int, ...]) -> bool:
    """Whether a key can be patched in row blocks: only low-rank terms and full diffs (each row of the result
    depends on the same row of the weight alone); adapters (DoRA norms, Kronecker products) take it whole."""
    return len(shape) >= 2 and shape[0] > 1 and all(
        p.rows is None and not p.bias and not p.delta.adapters and p.delta.set_weight is None for p in patches)


@dataclass
class _RowOps:
    """A row-wise key's patches, factors widened to fp32 on the device once: ("mm", start row, up, down, scale)
    and ("add", diff, strength), in chain order. One addmm per term, as ComfyUI adds one product per patch
    (joining the factors into one product measured no faster: the products are compute-bound)."""

    ops: list[tuple]

    @classmethod
    def of(cls, patches: list[Patch], rows: int, dev: torch.device) -> _RowOps:
        ops: list[tuple] = []
        for p in patches:
            for t in p.delta.terms:
                s = t.rows[0] if t.rows is not None else 0
                ops.append(("mm", s, t.up.to(dev, torch.float32).flatten(1), t.down.to(dev, torch.float32).flatten(1),
                            t.scale * p.strength))
            if p.delta.diff is not None:
                ops.append(("add", p.delta.diff.to(dev, torch.float32).reshape(rows, -1), p.strength))
        return cls(ops)

    def apply(self, block: torch.Tensor, r0: int) -> None:
        """Patch rows [r0, r0 + len(block)) of the weight, `block` fp32 [rows, cols], in place."""
        r1 = r0 + block.shape[0]
        for op in self.ops:
            if op[0] == "mm":
                _, s, up, down, alpha = op
                a, b = max(r0, s), min(r1, s + up.shape[0])
                if a < b:
                    block[a - r0 : b - r0].addmm_(up[a - s : b - s], down, alpha=alpha)
            else:
                block.add_(op[1][r0:r1], alpha=op[2])


def apply_patches(w: torch.Tensor, patches: list[Patch]) -> torch.Tensor:
    for p in patches:
        target = w if p.rows is None else w[p.rows[0] : p.rows[0] + p.rows[1]]
        apply_module(target, p.delta, p.strength)
    return w


@dataclass
class BakeReport:
    plan: BakePlan
    out_path: Path | None
    dtype: str
    device: str
    seconds: float
    bytes_written: int
    patched: list[str] = field(default_factory=list)
    copied: int = 0
    cast: int = 0
    encodings: dict[str, int] = field(default_factory=dict)  # written tensors per encoding (keep on a quantized model)

    def to_dict(self) -> dict:
        return {
            "output": str(self.out_path) if self.out_path else None,
            "dtype": self.dtype,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "bytes_written": self.bytes_written,
            "patched_keys": len(self.patched),
            "copied_keys": self.copied,
            "cast_keys": self.cast,
            **({"encodings": self.encodings} if self.encodings else {}),
            "plan": self.plan.summary(),
        }

    def table(self) -> str:
        from ..report import format_table

        p = self.plan
        rows = [{"#": i + 1, "lora": info.label, "arch": info.arch, "format": info.format, "strength": info.strength,
                 "types": info.types, "modules": info.modules, "matched": info.matched, "unmatched": len(info.unmatched)}
                for i, info in enumerate(p.loras)]
        lines = [f"bake {len(p.loras)} LoRA(s) into {p.model_name} ({p.arch.arch})",
                 format_table(rows, title="LoRAs, applied in this order (as a LoraLoaderModelOnly chain)")]
        if p.rules or any(i.rules for i in p.loras):
            rules = [{"rule": r.text, "keys": p.rule_hits.get(r.text, 0)} for i in p.loras for r in i.rules]
            rules += [{"rule": r.text, "keys": p.rule_hits.get(r.text, 0)} for r in p.rules]
            lines.append(format_table(rules, title="strength rules (first match wins)"))
        lines.append(f"{len(self.patched)} keys patched, {self.copied} copied as they are, {self.cast} cast; "
                     f"output dtype {self.dtype}, device {self.device}, {self.seconds:.1f} s")
        lines += [f"note: {n}" for n in p.notes]
        lines.append(f"wrote {self.out_path} ({self.bytes_written / 1e9:.2f} GB)" if self.out_path
                     else "dry run: nothing written")
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike) -> Path:
        from ..report import write_json

        return write_json(path, self.to_dict())


def _out_dtype(src_dtype: torch.dtype, want: torch.dtype | None) -> torch.dtype:
    """The output dtype of a key: `want` for float keys (None: keep), non-float keys always kept."""
    return src_dtype if want is None or not src_dtype.is_floating_point else want


def _nonfinite_error(plan: BakePlan, key: str, patches: list[Patch], input_finite: bool, dtype: torch.dtype | None) -> WeightsmithError:
    who = ", ".join(dict.fromkeys(f"{plan.loras[p.lora].label} ({p.module}, strength {p.strength:g})" for p in patches))
    if not input_finite:
        why = f"the model's own {key!r} already holds NaN/Inf (a corrupt file?)"
    elif dtype is not None:
        why = f"the baked values of {key!r} exceed {dtype_name(dtype)}'s range; use a wider --dtype (bf16 or fp32) or a lower strength"
    else:
        why = f"the baked values of {key!r} are NaN/Inf; lower the strength of {who}"
    return WeightsmithError(f"{why} (patched by {who}). Nothing was written")


def execute_bake(
    plan: BakePlan,
    out_path: str | os.PathLike | None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    task_elems: int = TASK_ELEMS,
) -> BakeReport:
    """Write `out_path` (None: a dry run that computes every patched key and writes nothing). Keys patched
    by low-rank terms and full diffs alone go in row blocks of about `task_elems` elements (bounded memory,
    every core busy); keys with adapters whole."""
    if isinstance(dtype, str) and dtype.strip().lower() not in (*PLAIN_DTYPES, "same", "auto", ""):
        raise WeightsmithError(f"bake output dtype {dtype!r}: choose one of {', '.join(PLAIN_DTYPES)} (explicit "
                               "quantized outputs are not supported by bake yet; `keep` on a quantized model keeps "
                               "its encoding, with fresh scales)")
    try:
        want = parse_dtype(dtype)
    except ValueError as e:
        raise WeightsmithError(str(e)) from None
    dev = resolve_device(device or "cpu")
    src = plan.source
    keys = src.keys()
    # `keep` on a quantized model (ComfyUI scaled fp8, mixed precision): every key in the model's own
    # encoding, a baked weight quantized with a fresh scale from its baked values (refused, before any
    # work, for an encoding that cannot be written back)
    encoded = any(src.encoding(k) is not None for k in keys) if want is None else False
    enc_layout = keep_layout(plan) if encoded else None
    layout = {k: (src.info(k).shape, _out_dtype(src.info(k).dtype, want)) for k in keys}
    if enc_layout is not None:
        layout = {k: (ko.shape, ko.dtype) for k, ko in enc_layout.keys.items()}
    meta = {}
    if out_path is not None:
        from ..provenance import stamp

        meta = stamp(src.metadata, output=out_path, operation="bake", arch=plan.arch.arch, details=plan.arch.details,
                     sources=[src, *plan.lora_paths], merged=True, naming=plan.arch.naming,
                     summary={"dtype": dtype_name(want) if want is not None else "keep",
                              "strengths": [i.strength for i in plan.loras], "rules": [r.text for r in plan.rules]})
    meta["weightsmith.bake"] = json.dumps({"model": plan.model_name, "loras": [
        {"lora": Path(i.name).name, "strength": i.strength, "rules": [r.text for r in i.rules]} for i in plan.loras],
        "rules": [r.text for r in plan.rules], "dtype": "keep" if want is None else dtype_name(want)})
    writer = None
    if out_path is not None:
        if enc_layout is not None:
            writer = StreamingWriter(out_path, enc_layout.writer_plan(), enc_layout.metadata(meta),
                                     protect=plan.protect_paths(), overwrite=overwrite)
        else:
            writer = StreamingWriter(out_path, layout, meta, protect=plan.protect_paths(), overwrite=overwrite)
    report = BakeReport(plan, Path(out_path) if out_path is not None else None,
                        "keep" if want is None else dtype_name(want), str(dev), 0.0, 0,
                        encodings=enc_layout.summary() if enc_layout is not None else {})
    buffers = WorkerBuffers()
    on_cpu = dev.type == "cpu"

    def check_written(key: str, out: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
        """The values as written must be finite: a cheap sum over them, the exact passes only when it fails
        (then the fp32 result `w` and the input `t` say whose fault it is)."""
        if written_finite(out):
            return
        patches = plan.patches[key]
        if not written_finite(w):
            raise _nonfinite_error(plan, key, patches, written_finite(t), None)
        raise _nonfinite_error(plan, key, patches, True, out.dtype)

    def patch_task(key: str, t: torch.Tensor) -> None:
        w = apply_patches(t.to(dev, torch.float32, copy=True), plan.patches[key])
        out = cast_for_output(w, layout[key][1])
        check_written(key, out, w, t)
        del w
        if writer is not None:
            writer.write(key, out.cpu())

    def rows_task(key: str, t: torch.Tensor, ops: _RowOps, r0: int, r1: int) -> None:
        """Rows [r0, r1) of a key: widened into this thread's fp32 buffer, patched in place, stored into its
        staging buffer in the output dtype and written to their place (no fresh allocation per block)."""
        out_dtype = layout[key][1]
        rows = t[r0:r1].reshape(r1 - r0, -1)
        if on_cpu:
            block = buffers.get("w", rows.numel(), torch.float32).view(rows.shape)
            if fast_decodable(rows):  # torch converts fp8 one element at a time; the same values, vectorised
                decode_fp8(rows.contiguous(), out=block)
            else:
                block.copy_(rows)
        else:
            block = rows.to(dev, torch.float32, copy=True)
        ops.apply(block, r0)
        if out_dtype == torch.float32:
            out = block
        elif on_cpu:
            out = buffers.get("out", rows.numel(), out_dtype).view(rows.shape)
            out.copy_(cast_for_output(block, out_dtype) if out_dtype in FP8_DTYPES else block)
        else:
            out = cast_for_output(block, out_dtype)
        check_written(key, out, block, rows)
        if writer is not None:
            writer.write_at(key, r0 * rows.shape[1] * out.element_size(), out.cpu())

    def encoded_task(key: str, t: torch.Tensor, ko: KeyOutput) -> None:
        """A key written encoded: its decoded value (patched when a LoRA targets it) quantized with the fresh
        scale amax / fp8 max of the values written (an unpatched key of a ComfyUI-made file comes back as
        it was)."""
        w = t.to(dev, torch.float32, copy=True)
        if key in plan.patches:
            apply_patches(w, plan.patches[key])
            if not written_finite(w):
                raise _nonfinite_error(plan, key, plan.patches[key], written_finite(t), None)
        if writer is not None:
            write_encoded(writer, ko, w.cpu())

    def copy_task(key: str, t: torch.Tensor) -> None:
        out_dtype = layout[key][1]
        if t.dtype != out_dtype:
            out = cast_for_output(t.float(), out_dtype)
            if not written_finite(out) and written_finite(t):
                raise WeightsmithError(f"{key!r} of {plan.model_name} exceeds {dtype_name(out_dtype)}'s range; use a "
                                       "wider --dtype (bf16 or fp32). Nothing was written")
            t = out
        if writer is not None:
            writer.write(key, t)

    def jobs():
        for key in keys:
            t = src.get(key)
            ko = enc_layout.keys[key] if enc_layout is not None else None
            if ko is not None and ko.fmt is not None:
                if key in plan.patches:
                    report.patched.append(key)
                else:
                    report.copied += 1  # re-encoded as it was
                # decoded whole into fresh memory: a big one alone in flight
                yield KeyJob([partial(encoded_task, key, t, ko)], drain=t.numel() * 4 > DECODED_ALONE_BYTES)
            elif key in plan.patches and rowwise(plan.patches[key], tuple(t.shape)):
                report.patched.append(key)
                ops = _RowOps.of(plan.patches[key], t.shape[0], dev)
                yield KeyJob([partial(rows_task, key, t, ops, r0, r1)
                              for r0, r1 in row_ranges(t.shape[0], t[0].numel(), 1, task_elems)])
            elif key in plan.patches:
                report.patched.append(key)
                yield KeyJob([partial(patch_task, key, t)])
            else:
                report.copied += t.dtype == layout[key][1]
                report.cast += t.dtype != layout[key][1]
                yield KeyJob([partial(copy_task, key, t)])
            del t

    t0 = time.perf_counter()
    run_keys(jobs(), len(keys), writer=writer, sources=[src], device=dev, threads=threads, progress=progress,
             before=enc_layout.write_extras if enc_layout is not None else None)
    report.seconds = time.perf_counter() - t0
    report.bytes_written = writer.total_bytes if writer is not None else 0
    return report


def bake(
    model,
    loras,
    out: str | os.PathLike | None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    rules=None,
    strict: bool = False,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> BakeReport:
    """Plan and execute in one call: `bake("flux.safetensors", [("style.safetensors", 0.8)], "out.safetensors")`."""
    from .plan import plan_bake

    plan = plan_bake(model, loras, rules, strict)
    return execute_bake(plan, out, dtype, device, progress, overwrite)
