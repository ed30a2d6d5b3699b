"""Writing GGUF files in the layout ComfyUI-GGUF loads, streaming and atomically.

The header (architecture, quantization version, file type, `comfy.gguf.orig_shape.*`, the inputs'
metadata, tensor infos) is laid out by the `gguf` package's GGUFWriter from the planned keys before any
data exists; each tensor's bytes then go straight to their offset as the tensor (or a block of its rows)
is produced, so peak memory follows the largest tensor. Everything else is the safetensors writer's:
a temp file beside the target, renamed at the end with no clobbering, never over an input.

Which tensors stay unquantized follows ComfyUI-GGUF's tools (convert.py and the llama.cpp patch that
quantizes its files): 1-D tensors, tensors of at most 1024 values and the architecture's high-precision
keys are F32; the architecture's embedders and final layers stay F16 (BF16 in a BF16 file); rows that
are not a whole number of blocks fall back to F16. SD UNets store tensors whose last dimension is not a
multiple of 256 as rows of 256 with their original shape in `comfy.gguf.orig_shape.<name>`.
The `gguf` package quantizes Q8_0, Q5_0/1, Q4_0/1, F16 and BF16; it has no K-quant or IQ encoder, so
those outputs are refused with what to do instead.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsmithError
from ..provenance import HASH_KEY, HASH_PENDING
from ..safetensors_io import StreamingWriter, TensorInfo
from ..sources import TensorSource, classify_keys, detect_diffusion_prefix
from .gguf import ORIG_SHAPE_PREFIX, gguf_module
from .gguf_quants import BLOCK_LAYOUT

# user spelling (--dtype, node widget) -> GGML type written for the quantized tensors
GGUF_OUTPUT_TYPES: dict[str, str] = {
    "gguf-q8_0": "Q8_0",
    "gguf-q5_1": "Q5_1",
    "gguf-q5_0": "Q5_0",
    "gguf-q4_1": "Q4_1",
    "gguf-q4_0": "Q4_0",
    "gguf-f16": "F16",
    "gguf-bf16": "BF16",
}
_NOT_ENCODABLE = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k", "iq4_nl", "iq4_xs", "q4_k_m", "q4_k_s",
                  "q5_k_m", "q5_k_s", "q3_k_m", "q3_k_s", "q3_k_l")
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q5_1": "MOSTLY_Q5_1", "Q5_0": "MOSTLY_Q5_0", "Q4_1": "MOSTLY_Q4_1",
               "Q4_0": "MOSTLY_Q4_0", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
_INT_TYPES = {torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64"}

QUANTIZATION_THRESHOLD = 1024  # ComfyUI-GGUF convert.py: tensors this small stay F32
REARRANGE_THRESHOLD = 512
MAX_TENSOR_NAME_LENGTH = 127
MAX_TENSOR_DIMS = 4
ALIGNMENT = 32  # GGUF's default data alignment


def gguf_output_type(dtype: object) -> str | None:
    """'gguf-q8_0' -> 'Q8_0'; None for anything that is not a GGUF output spelling."""
    if not isinstance(dtype, str) or not dtype.strip().lower().startswith("gguf"):
        return None
    key = dtype.strip().lower().replace("gguf_", "gguf-")
    if key in GGUF_OUTPUT_TYPES:
        return GGUF_OUTPUT_TYPES[key]
    if key.removeprefix("gguf-") in _NOT_ENCODABLE:
        raise WeightsmithError(
            f"{dtype}: the gguf package can decode K-quant and IQ files but cannot encode them, so Weightsmith cannot "
            f"write them; write gguf-q8_0, gguf-q5_1, gguf-q4_1 (or gguf-f16 / gguf-bf16 and quantize that file with "
            "llama-quantize as ComfyUI-GGUF's tools/README describes)")
    raise WeightsmithError(f"unknown GGUF output type {dtype!r}; choose one of {', '.join(GGUF_OUTPUT_TYPES)}")


@dataclass(frozen=True)
class ArchRules:
    """One architecture's GGUF conventions (ComfyUI-GGUF tools/convert.py and tools/lcpp.patch)."""

    arch: str
    detect: tuple[tuple[str, ...], ...]  # any of these key sets, all present
    keep: tuple[str, ...] = ()  # substrings of keys never quantized (stay F16/BF16)
    hiprec: tuple[str, ...] = ()  # substrings of keys stored F32
    shape_fix: bool = False  # SD UNets: reshape to rows of 256 (orig_shape kept in the metadata)


_FLUX_KEEP = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
ARCH_RULES: tuple[ArchRules, ...] = (
    ArchRules("hyvid", (("double_blocks.0.img_attn_proj.weight",
                         "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"),), keep=_FLUX_KEEP),
    ArchRules("flux", (("double_blocks.0.img_attn.proj.weight",), ("double_blocks.0.img_attn.qkv.weight",),
                       ("single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight", "img_in.weight")),
              keep=_FLUX_KEEP),
    ArchRules("sd3", (("joint_blocks.0.x_block.attn.qkv.weight",),),
              keep=("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.",
                    "x_embedder.", "pos_embed")),
    ArchRules("hidream", (("caption_projection.0.linear.weight",
                           "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight"),),
              keep=("p_embedder.", "t_embedder.", "x_embedder.", "final_layer.", "caption_projection."),
              hiprec=(".ff_i.gate.weight", "img_emb.emb_pos")),
    ArchRules("wan", (("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"),),
              keep=("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
                    "img_emb.", "head."), hiprec=(".modulation",)),
    ArchRules("ltxv", (("adaln_single.emb.timestep_embedder.linear_2.weight", "caption_projection.linear_2.weight"),),
              keep=("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out.", "scale_shift_table"),
              hiprec=("scale_shift_table",)),
    ArchRules("lumina2", (("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight"),),
              keep=("t_embedder.", "x_embedder.")),
    ArchRules("sdxl", (("label_emb.0.0.weight", "input_blocks.0.0.weight"),), shape_fix=True,
              keep=("time_embed.", "label_emb.", "input_blocks.0.0.weight", "out.2.weight")),
    ArchRules("sd1", (("input_blocks.0.0.weight", "time_embed.0.weight"),), shape_fix=True,
              keep=("time_embed.", "input_blocks.0.0.weight", "out.2.weight")),
)


def detect_gguf_arch(keys: Iterable[str]) -> ArchRules:
    """The ComfyUI-GGUF architecture of a diffusion model's (prefix-free) keys."""
    keys = set(keys)
    for rules in ARCH_RULES:
        if any(all(k in keys for k in group) for group in rules.detect):
            return rules
    raise WeightsmithError("GGUF output: cannot tell the model's architecture from its keys (ComfyUI-GGUF loads "
                           f"{', '.join(r.arch for r in ARCH_RULES)} with ComfyUI key names); write safetensors "
                           "instead, or convert the model to ComfyUI's key names first")


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # the GGUF tensor name (ComfyUI key, no checkpoint prefix)
    qtype: str  # GGML type written
    stored: tuple[int, ...]  # torch-order shape as stored (rows of 256 after a shape fix)
    orig: tuple[int, ...] | None  # the logical shape, when it differs from `stored`

    @property
    def block(self) -> tuple[int, int]:
        if self.qtype in BLOCK_LAYOUT:
            return BLOCK_LAYOUT[self.qtype]
        return 1, {"F32": 4, "F16": 2, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F64": 8}[self.qtype]

    @property
    def row(self) -> int:
        """Values per stored row: quantization blocks never cross one."""
        return self.stored[-1] if self.stored else 1

    @property
    def nbytes(self) -> int:
        block, size = self.block
        return math.prod(self.stored) // block * size


def plan_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, qtype: str, rules: ArchRules) -> PlannedTensor:
    """What one tensor is stored as: ComfyUI-GGUF's rules (see the module docstring)."""
    if len(shape) > MAX_TENSOR_DIMS:
        raise WeightsmithError(f"GGUF output: tensor {key!r} has {len(shape)} dimensions; GGUF holds at most "
                               f"{MAX_TENSOR_DIMS}. Write safetensors for this model")
    if dtype in _INT_TYPES:
        return PlannedTensor(key, _INT_TYPES[dtype], shape, None)
    if not dtype.is_floating_point:
        raise WeightsmithError(f"GGUF output: tensor {key!r} is {dtype}, which GGUF cannot store")
    n = math.prod(shape)
    if len(shape) <= 1 or n <= QUANTIZATION_THRESHOLD or any(h in key for h in rules.hiprec):
        return PlannedTensor(key, "F32", shape, None)
    stored, orig = shape, None
    if rules.shape_fix and n >= REARRANGE_THRESHOLD and n % 256 == 0 and shape[-1] % 256 != 0:
        stored, orig = (n // 256, 256), shape
    plain = "BF16" if qtype == "BF16" else "F16"
    if qtype in ("F16", "BF16") or any(k in key for k in rules.keep) or stored[-1] % BLOCK_LAYOUT[qtype][0]:
        return PlannedTensor(key, plain, stored, orig)
    return PlannedTensor(key, qtype, stored, orig)


def _gguf_names(keys: Iterable[str]) -> dict[str, str]:
    """key -> GGUF tensor name: the diffusion model's keys without their checkpoint prefix. Anything outside
    the diffusion model is refused: ComfyUI-GGUF's loader reads a diffusion model only."""
    keys = list(keys)
    groups = classify_keys(keys)
    others = [k for k, g in groups.items() if g != "unet"]
    if others:
        raise WeightsmithError(
            f"GGUF output holds the diffusion model only (ComfyUI-GGUF's Unet loader reads nothing else), but "
            f"{len(others)} keys lie outside it (text encoders, VAE…), e.g. {others[:3]}; leave them out with "
            "--others drop (node: other_keys = drop), or write safetensors")
    prefix = detect_diffusion_prefix(keys)
    names = {k: k[len(prefix):] if prefix and k.startswith(prefix) else k for k in keys}
    long = [n for n in names.values() if len(n.encode()) > MAX_TENSOR_NAME_LENGTH]
    if long:
        raise WeightsmithError(f"GGUF output: tensor names are limited to {MAX_TENSOR_NAME_LENGTH} bytes; too long: "
                               f"{long[:3]}")
    return names


def _header_bytes(arch: str, qtype: str, tensors: list[PlannedTensor], metadata: Mapping[str, str]) -> bytes:
    """The GGUF header, KV data and tensor infos as the gguf package lays them out."""
    gguf = gguf_module("writing a GGUF file")
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype])))
    for k, v in metadata.items():
        if not k.startswith(("general.", "GGUF.", "comfy.gguf.")):
            w.add_string(str(k), str(v))
    for t in tensors:
        if t.orig is not None:
            w.add_array(ORIG_SHAPE_PREFIX + t.name, [int(d) for d in t.orig])
    for t in tensors:
        w.add_tensor_info(t.name, tuple(t.stored), np.dtype(np.float32), t.nbytes, raw_dtype=T[t.qtype])
    with tempfile.TemporaryDirectory() as d:  # GGUFWriter writes to a path; the header is a few KB
        p = Path(d) / "header.gguf"
        w.write_header_to_file(path=p)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return p.read_bytes()


def _encode(x: torch.Tensor, qtype: str) -> np.ndarray:
    """Rows of values (fp32, or the integer dtype planned) -> the bytes GGUF stores for them."""
    x = x.detach().to("cpu")
    if qtype == "F32":
        return x.float().contiguous().numpy()
    if qtype == "F16":
        return x.half().contiguous().numpy()
    if qtype in ("I8", "I16", "I32", "I64", "F64"):
        return x.contiguous().numpy()
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(x.float().contiguous().numpy(), GGMLQuantizationType[qtype])


class GGUFStreamWriter(StreamingWriter):
    """Write a ComfyUI-GGUF file tensor by tensor, atomically: the StreamingWriter's interface and guarantees,
    fed the logical tensors (fp32 for floats) named by `plan`, each quantized as it arrives.

    `write_at(key, byte_offset, part)` takes row blocks as the merge produces them (offsets in bytes of the
    planned dtype); blocks that start and end on a quantization row are encoded at once, others are gathered
    until the tensor is complete (then memory holds that one tensor)."""

    def __init__(
        self,
        path: str | os.PathLike,
        plan: Mapping[str, tuple[Iterable[int], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
        protect: Iterable[str | os.PathLike] = (),
        overwrite: bool = False,
        qtype: str = "Q8_0",
        arch: str | None = None,
    ):
        # The base class's state is set here field by field (its __init__ lays out a safetensors header);
        # its target checks, temp file, positioned writes, commit and abort are used as they are.
        self.path = Path(path)
        self.overwrite = overwrite
        self._protect = [Path(p) for p in protect]
        self._check_target()
        if qtype not in _FILE_TYPES:
            raise WeightsmithError(f"GGUF output type {qtype!r}: choose one of {', '.join(_FILE_TYPES)}")
        self.infos = {k: TensorInfo(tuple(int(s) for s in shape), dtype) for k, (shape, dtype) in plan.items()}
        names = _gguf_names(self.infos)
        rules = detect_gguf_arch(names.values())
        if arch is not None:
            rules = next((r for r in ARCH_RULES if r.arch == arch), None) or ArchRules(arch, ())
        self.arch = rules.arch
        self.tensors = {k: plan_tensor(names[k], info.shape, info.dtype, qtype, rules) for k, info in self.infos.items()}
        header = _header_bytes(rules.arch, qtype, list(self.tensors.values()), metadata or {})
        self._data_start = -(-len(header) // ALIGNMENT) * ALIGNMENT
        self._header = header + b"\0" * (self._data_start - len(header))
        self._offsets = {}
        pos = 0
        for k, t in self.tensors.items():
            self._offsets[k] = pos
            pos += -(-t.nbytes // ALIGNMENT) * ALIGNMENT
        self.total_bytes = self._data_start + pos
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}
        # modelspec.hash_sha256 of the data section (from the first tensor's aligned start), as for safetensors
        at = header.find(HASH_PENDING.encode()) if (metadata or {}).get(HASH_KEY) == HASH_PENDING else -1
        self.sha256, self._hash_at = None, (at if at >= 0 else None)
        self._follower = None  # made on entering (StreamingWriter.__enter__)
        self._gather: dict[str, torch.Tensor] = {}  # row blocks of reshaped tensors, until complete
        self._gathered: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fd = None
        self._tmp = None

    def __enter__(self) -> GGUFStreamWriter:
        super().__enter__()
        try:
            os.ftruncate(self._fd, self.total_bytes)  # the padding between tensors reads as zeros
        except OSError as e:
            self._abort()
            raise WeightsmithError(f"could not write {self.path}: {e}; free disk space and retry") from e
        if self._follower is not None:  # the padding is in the file already: followed when its tensor comes
            for k, t in self.tensors.items():
                end = self._data_start + self._offsets[k] + t.nbytes
                self._follower.written(end, end + (-t.nbytes % ALIGNMENT))
        return self

    def qtype_counts(self) -> dict[str, int]:
        """GGML type -> number of tensors planned in it."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.qtype] = out.get(t.qtype, 0) + 1
        return out

    def _encode_rows(self, key: str, first: int, values: torch.Tensor) -> None:
        """Encode whole blocks of values starting at element `first` of the stored tensor and write them."""
        t = self.tensors[key]
        block, size = t.block
        rows = values.reshape(-1, t.row)
        data = _encode(rows, t.qtype)
        if t.qtype == "F16" and not np.isfinite(data).all() and bool(torch.isfinite(values).all()):
            raise WeightsmithError(f"{self.path}: tensor {key!r} has values beyond fp16's range (±65504), which this "
                                   "GGUF type stores in F16; write gguf-bf16 instead")
        self._put(key, memoryview(data.reshape(-1).view(np.uint8)), first // block * size)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        info = self._info(key)
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"{self.path}: tensor {key!r} is {tuple(tensor.shape)}, planned {info.shape}")
        with self._lock:
            if key in self._written or key in self._filled:
                raise KeyError(f"{self.path}: tensor {key!r} written twice")
            self._written.add(key)
        self._encode_rows(key, 0, tensor)

    def write_at(self, key: str, byte_offset: int, part: torch.Tensor) -> None:
        info = self._info(key)
        if part.dtype != info.dtype:
            raise ValueError(f"{self.path}: part of tensor {key!r} is {part.dtype}, planned {info.dtype}")
        item = part.element_size()
        first, count = byte_offset // item, part.numel()
        if byte_offset % item or first < 0 or first + count > info.numel:
            raise ValueError(f"{self.path}: bytes {byte_offset}..{byte_offset + count * item} lie outside tensor "
                             f"{key!r} ({info.nbytes} bytes)")
        t = self.tensors[key]
        gathered = t.orig is not None  # reshaped to rows of 256: a row block of the logical tensor may split one
        if not gathered and (first % t.row or count % t.row):
            raise ValueError(f"{self.path}: part of tensor {key!r} at element {first} is not whole rows of {t.row}")
        with self._lock:
            filled = self._filled.get(key, 0) + count * item
            if key in self._written or filled > info.nbytes:
                raise KeyError(f"{self.path}: tensor {key!r} written twice")
            self._filled[key] = filled
            buf = self._gather.setdefault(key, torch.empty(info.numel, dtype=info.dtype)) if gathered else None
        if buf is None:
            self._encode_rows(key, first, part.reshape(-1))
            return
        buf[first:first + count].copy_(part.reshape(-1))
        with self._lock:  # the thread that completes the tensor encodes it
            self._gathered[key] = self._gathered.get(key, 0) + count
            done = self._gathered[key] == info.numel
        if done:
            self._encode_rows(key, 0, self._gather.pop(key))


def write_gguf(
    path: str | os.PathLike,
    tensors: TensorSource | Mapping[str, torch.Tensor],
    qtype: str = "Q8_0",
    metadata: Mapping[str, str] | None = None,
    protect: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    arch: str | None = None,
) -> GGUFStreamWriter:
    """Write a model (a source read one tensor at a time, or a dict) as a ComfyUI-GGUF file; `qtype` is a
    GGML type (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, F16, BF16) or a `gguf-…` spelling. Returns the writer (its
    `tensors` say what each key was stored as)."""
    qtype = gguf_output_type(qtype) or qtype
    infos = {k: tensors.info(k) for k in tensors.keys()} if isinstance(tensors, TensorSource) else \
        {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in tensors.items()}
    plan = {k: (i.shape, torch.float32 if i.dtype.is_floating_point and i.dtype != torch.float64 else i.dtype)
            for k, i in infos.items()}
    if isinstance(tensors, TensorSource):
        protect = [*protect, *tensors.paths()]
        metadata = {**tensors.metadata, **(metadata or {})}
    w = GGUFStreamWriter(path, plan, metadata, protect=protect, overwrite=overwrite, qtype=qtype, arch=arch)
    with w:
        for k, (_, dtype) in plan.items():
            w.write(k, tensors[k].to(dtype) if isinstance(tensors, Mapping) else tensors.get(k).to(dtype))
    return w
