"""GGUF files as ComfyUI-GGUF writes and reads them, opened as a lazy `TensorSource`.

Layout (city96/ComfyUI-GGUF loader.py): `general.architecture` names the model family (flux, sd1, sdxl,
…); tensor names are ComfyUI's diffusion-model keys; GGUF stores dimensions innermost first, so a torch
shape is the reversed GGUF shape, unless `comfy.gguf.orig_shape.<name>` (an INT32 array) gives it (SD
UNets store some tensors reshaped to rows of 256 for the K-quants). The file is memory-mapped by the
`gguf` package's reader and only headers are parsed at open; `get` decodes one tensor at a time in torch
(gguf_quants) on the source's device, with the package's numpy decoder only for formats without a torch
kernel. F32/F16/BF16 tensors come back in their own dtype, every quantized one as fp32.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import BadFileError
from ..safetensors_io import REFETCH, TensorInfo
from ..sources import TensorSource
from . import gguf_quants
from .base import KeyEncoding

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
INSTALL_HINT = "install the `gguf` package (pip install gguf, or pip install weightsmith[gguf])"

# GGML types stored as a plain torch dtype: read as that dtype, nothing to decode
PLAIN_TYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def gguf_module(what: str):
    """The `gguf` package, or a clear error saying what needs it and how to install it."""
    try:
        import gguf
    except ImportError:
        raise BadFileError(f"{what} needs the `gguf` package, which is not installed; {INSTALL_HINT}") from None
    return gguf


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether a file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _numpy_decodable(qtype: str) -> bool:
    """Whether the `gguf` package has a (numpy) decoder for a format we have no torch kernel for."""
    from gguf import quants

    return any(getattr(cls, "qtype", None) is not None and cls.qtype.name == qtype
               for cls in getattr(quants, "_type_traits", {}).values())


# --- header scan (for error messages only) ---------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def scan_tensor_types(path: Path) -> list[tuple[str, int]]:
    """(name, raw GGML type id) of every tensor, read straight from the header. The `gguf` reader refuses a
    file holding a type id it does not know without naming the tensor; this names it."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # headers of real models are far smaller
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0]

    def skip_string() -> str:
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == _STRING:
            skip_string()
        elif vtype == _ARRAY:
            sub, count = take("I"), take("Q")
            if sub in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[sub] * count
            else:
                for _ in range(count):
                    skip_value(sub)
        else:
            pos += _SCALAR_SIZES[vtype]

    pos = 8
    n_tensors, n_kv = take("Q"), take("Q")
    for _ in range(n_kv):
        skip_string()
        skip_value(take("I"))
    out = []
    for _ in range(n_tensors):
        name = skip_string()
        n_dims = take("I")
        pos += 8 * n_dims
        out.append((name, take("I")))
        pos += 8
    return out


def _unknown_type_error(path: Path, err: Exception) -> BadFileError:
    from gguf import GGMLQuantizationType

    known = {int(t) for t in GGMLQuantizationType}
    try:
        bad = [(n, t) for n, t in scan_tensor_types(path) if t not in known]
    except (struct.error, KeyError, IndexError, ValueError):
        bad = []
    if bad:
        name, t = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        return BadFileError(f"{path}: tensor {name!r} is stored in GGML type {t}, which the installed gguf package "
                            f"does not know{more}; update the gguf package (pip install -U gguf) or re-export the "
                            "model in a common GGUF type (Q8_0, Q4_K, F16…)")
    return BadFileError(f"{path}: not a readable GGUF file ({err}); {REFETCH}")


def _unreadable_error(path: Path, err: Exception) -> BadFileError:
    """Say whether the header itself is cut short (the usual interrupted download) or something else is wrong."""
    try:
        scan_tensor_types(path)
    except (struct.error, KeyError, UnicodeDecodeError):
        return BadFileError(f"{path}: the GGUF header ends early or is corrupt: the file is truncated or damaged; "
                            f"{REFETCH}")
    if "cannot reshape" in str(err):  # the reader maps each tensor's data: a short map cannot take its shape
        return BadFileError(f"{path}: the tensor data ends before the last tensor does: the file is truncated; "
                            f"{REFETCH}")
    return BadFileError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}); the file is truncated "
                        f"or corrupt; {REFETCH}")


# --- the source --------------------------------------------------------------------------------------------


def _field_value(field):
    """A metadata field as a plain Python value (str, number, bool, or a list of those)."""
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _orig_shape(reader, path: Path, name: str) -> tuple[int, ...] | None:
    from gguf import GGUFValueType

    field = reader.get_field(ORIG_SHAPE_PREFIX + name)
    if field is None:
        return None
    if list(field.types) != [GGUFValueType.ARRAY, GGUFValueType.INT32]:
        raise BadFileError(f"{path}: metadata {ORIG_SHAPE_PREFIX + name} should be an array of INT32 (the tensor's "
                           f"original shape) but holds {[t.name for t in field.types]}; {REFETCH}")
    return tuple(int(field.parts[i][0]) for i in field.data)


class GGUFSource(TensorSource):
    """A .gguf model file (ComfyUI-GGUF layout), memory-mapped; `device`: where quantized tensors are decoded
    (and returned). Every tensor's type is checked at open: a type nothing here can decode is refused then,
    naming file, tensor and type, before any work starts."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__()
        gguf = gguf_module(f"{path}: reading a GGUF file")
        self.path = Path(path)
        self.name = str(path)
        self.device = torch.device(device)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise BadFileError(f"{path}: cannot read: {e}; check the path") from None
        if size < 24:
            raise BadFileError(f"{path}: file is {size} bytes, too short to be GGUF (truncated or empty download?); "
                               f"{REFETCH}")
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except ValueError as e:
            if "GGMLQuantizationType" in str(e):
                raise _unknown_type_error(self.path, e) from None
            raise _unreadable_error(self.path, e) from None
        except Exception as e:  # the reader indexes a memory map: a cut header fails in many ways
            raise _unreadable_error(self.path, e) from None
        if self._reader.byte_order != "I":
            raise BadFileError(f"{path}: a big-endian GGUF file; convert it to little-endian (gguf-convert-endian)")
        self.metadata = self._read_metadata()
        self._tensors = {}
        self._qtypes: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for t in self._reader.tensors:
            self._add_tensor(t, size)

    def _read_metadata(self) -> dict[str, str]:
        """Every key/value field except the reader's own bookkeeping, as strings (lists as JSON); long
        arrays (tokenizer vocabularies) are summarised."""
        meta: dict[str, str] = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                value = _field_value(field)
            except Exception:  # a field the package cannot render: note its presence, never fail the open
                meta[name] = "<unreadable>"
                continue
            if isinstance(value, list):
                meta[name] = json.dumps(value) if len(value) <= 64 else f"<array of {len(value)} items>"
            else:
                meta[name] = str(value)
        return meta

    def _add_tensor(self, t, file_size: int) -> None:
        name, qtype = t.name, t.tensor_type.name
        where = f"{self.path}: tensor {name!r}"
        if qtype not in PLAIN_TYPES and qtype not in gguf_quants.DECODERS and not _numpy_decodable(qtype):
            raise BadFileError(f"{where} is stored as GGUF {qtype}, which neither Weightsmith nor the gguf package "
                               "can decode; re-quantize the model to a supported type (Q8_0, Q5_1, Q4_K, …) "
                               "or use an F16/BF16 file")
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        shape = _orig_shape(self._reader, self.path, name) or stored
        if math.prod(shape) != int(t.n_elements):
            raise BadFileError(f"{where}: original shape {list(shape)} holds {math.prod(shape)} values but the tensor "
                               f"stores {int(t.n_elements)}; {REFETCH}")
        if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
            raise BadFileError(f"{where}: data ends at byte {t.data_offset + t.n_bytes} but the file has {file_size} "
                               f"bytes: the file is truncated; {REFETCH}")
        self._tensors[name] = t
        self._qtypes[name] = qtype
        self._shapes[name] = stored
        self._infos[name] = TensorInfo(shape, PLAIN_TYPES.get(qtype, torch.float32))

    def qtype(self, key: str) -> str:
        """The GGML type a key is stored in (F32, F16, BF16, Q8_0, Q4_K, …)."""
        self.info(key)
        return self._qtypes[key]

    def encoding(self, key: str) -> KeyEncoding | None:
        """How a quantized key is stored (None for plain F32/F16/BF16/integer tensors)."""
        qtype = self.qtype(key)
        if qtype in PLAIN_TYPES:
            return None
        t = self._tensors[key]
        return KeyEncoding(f"gguf:{qtype}", torch.uint8, tuple(int(d) for d in t.data.shape), {})

    def encodings_summary(self) -> dict[str, int]:
        """'gguf Q8_0' -> number of tensors stored in that type, in file order of first appearance."""
        out: dict[str, int] = {}
        for q in self._qtypes.values():
            out[f"gguf {q}"] = out.get(f"gguf {q}", 0) + 1
        return out

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def _raw(self, key: str) -> torch.Tensor:
        with warnings.catch_warnings():  # the map is read-only; nothing here writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self._tensors[key].data)

    def _load(self, key: str) -> torch.Tensor:
        qtype, shape = self._qtypes[key], self._infos[key].shape
        try:
            raw = self._raw(key)
            if qtype in PLAIN_TYPES:
                # a copy: the map is read-only, and a caller writing in place must not fault
                return raw.view(PLAIN_TYPES[qtype]).reshape(shape).to(self.device, copy=True)
            if qtype in gguf_quants.DECODERS:
                return gguf_quants.dequantize(raw.to(self.device), qtype, shape)
            from gguf import GGMLQuantizationType, quants

            values = quants.dequantize(np.asarray(self._tensors[key].data), GGMLQuantizationType[qtype])
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape).to(self.device)
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a page of the map that cannot be read
            raise BadFileError(f"{self.path}: cannot decode tensor {key!r} ({qtype}): {e}; {REFETCH}") from e

    def paths(self) -> list[Path]:
        return [self.path]
