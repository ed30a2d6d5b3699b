"""Reading `.ckpt`/`.pt`/`.bin` checkpoints without trusting them.

`torch.load(weights_only=True)` runs no pickled code, but it still believes what the pickle says about
sizes: memory-mapped, a storage that declares more bytes than its zip record holds is read past the
record's end (the neighbouring tensors' bytes, or the zip directory) without a word, and a tensor may be
a stride-0 view whose shape asks for 10^12 elements of a one-element storage. Every storage is therefore
checked against its record before the load, and every tensor against its storage after it, from the
metadata only (nothing is allocated or read).

Trainers rarely save a bare state dict: the tensors sit under `state_dict` (Lightning), `model`,
`module`, `ema`, … sometimes twice nested. `unwrap_state_dict` finds them and says where it found them.
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dtypes import TORCH_TO_SAFETENSORS
from .errors import BadFileError, UnsafePickleError
from .safetensors_io import REFETCH

# Entries trainers keep the weights under, in the order one is picked when several are present (the
# training weights before an EMA copy, as most loaders do; the others are named in the note).
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "generator",
                  "params", "weights", "ema", "model_ema", "ema_model", "ema_state_dict", "params_ema")
MAX_DEPTH = 4  # containers nested deeper than this are not looked into
DATA_PARALLEL = "module."  # torch.nn.DataParallel / DDP prefix every key of a wrapped model's state dict


@dataclass
class Unwrapped:
    tensors: dict[str, torch.Tensor]
    where: list[str] = field(default_factory=list)  # container keys followed, outermost first
    alternatives: list[str] = field(default_factory=list)  # other containers of tensors not read
    stripped: str = ""  # a prefix removed from every key (DataParallel's 'module.')
    skipped: list[str] = field(default_factory=list)  # non-tensor entries of the state dict

    def note(self) -> str | None:
        """One line saying where the tensors came from, or None for a plain state dict."""
        parts = []
        if self.where:
            parts.append("tensors read from the checkpoint entry " + "".join(f"[{k!r}]" for k in self.where))
        if self.stripped:
            parts.append(f"the prefix {self.stripped!r} (DataParallel) removed from every key")
        if self.alternatives:
            parts.append("not read: " + ", ".join(self.alternatives))
        return "; ".join(parts) or None


def _n_tensors(obj: object) -> int:
    return sum(isinstance(v, torch.Tensor) for v in obj.values()) if isinstance(obj, dict) else 0


def _n_tensors_deep(obj: object, depth: int = 0) -> int:
    """Tensors in a dict and the dicts inside it (to MAX_DEPTH)."""
    if not isinstance(obj, dict) or depth > MAX_DEPTH:
        return 0
    return _n_tensors(obj) + sum(_n_tensors_deep(v, depth + 1) for v in obj.values() if isinstance(v, dict))


def _holds_tensors(obj: object) -> bool:
    return _n_tensors_deep(obj) > 0


def unwrap_state_dict(obj: object, path: Path) -> Unwrapped:
    """The state dict inside a loaded checkpoint: the object itself when it holds tensors, else the first
    container entry (CONTAINER_KEYS order, then any single dict entry) that holds tensors, descending."""
    where: list[str] = []
    alternatives: list[str] = []
    for _ in range(MAX_DEPTH + 1):
        if not isinstance(obj, dict):
            break
        containers = [k for k in CONTAINER_KEYS if _holds_tensors(obj.get(k))]
        if not containers:
            dicts = [k for k, v in obj.items() if isinstance(k, str) and _holds_tensors(v)]
            containers = dicts if len(dicts) == 1 and not _n_tensors(obj) else []
        # A level holding tensors is the state dict, unless a container holds more of them (a Lightning
        # checkpoint with a stray tensor such as `global_step` beside its `state_dict`).
        prefix = "".join(f"[{k!r}]" for k in where)
        if not containers or _n_tensors(obj) >= _n_tensors_deep(obj[containers[0]]):
            alternatives += [prefix + f"[{k!r}]" for k in containers]  # tensors of their own, left unread
            break
        key = containers[0]
        alternatives += [prefix + f"[{k!r}]" for k in containers[1:]]
        where.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        raise BadFileError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; convert it to "
                           ".safetensors in a trusted environment")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    skipped = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    stripped = ""
    if tensors and all(k.startswith(DATA_PARALLEL) for k in tensors):
        stripped = DATA_PARALLEL
        tensors = {k[len(DATA_PARALLEL):]: v for k, v in tensors.items()}
    return Unwrapped(tensors, where, alternatives, stripped, skipped)


# --- the zip container: declared storage sizes against the records that hold them -------------------

_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}
_GET_OPS = {"BINGET", "LONG_BINGET", "GET"}


def declared_storages(data_pkl: bytes) -> dict[str, tuple[str, int, str]] | None:
    """storage key -> (storage type name, declared numel, the tensor key first using it), read from the
    pickle's opcodes without running it (torch writes each storage as a persistent id
    `('storage', <type>, key, location, numel)`, right after the state-dict key of its first tensor).
    None where the pickle is built in a way this reader does not follow (the caller then loads without
    memory mapping, where torch checks every record's size itself)."""
    memo: dict[object, object] = {}
    marks: list[tuple[list[object], str]] = []  # items since each open MARK, and the last string before it
    last: object = None
    last_string = ""
    found: dict[str, tuple[str, int, str]] = {}
    try:
        for op, arg, _ in pickletools.genops(data_pkl):
            name = op.name
            value: object = None
            if name == "MARK":
                marks.append(([], last_string))
                last = None
                continue
            if name in _STRING_OPS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            elif name in _INT_OPS:
                value = arg
            elif name == "GLOBAL":
                value = ("global", str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL" and marks and len(marks[-1][0]) >= 2:
                mod, qual = marks[-1][0][-2:]
                del marks[-1][0][-2:]
                value = ("global", f"{mod}.{qual}")
            elif name in _GET_OPS:
                value = memo.get(arg)
            elif name in _PUT_OPS:
                memo[arg] = last
                continue
            elif name == "MEMOIZE":
                memo[len(memo)] = last
                continue
            elif name == "TUPLE" and marks:
                items, before = marks.pop()
                value = (tuple(items), before)
            elif name == "BINPERSID":
                pid, tensor = last if isinstance(last, tuple) and len(last) == 2 else (None, "")
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    return None
                _, kind, key, _, numel = pid
                if not (isinstance(kind, tuple) and isinstance(key, str) and isinstance(numel, int)):
                    return None
                found.setdefault(key, (kind[1].rsplit(".", 1)[-1], numel, tensor))
                last = None
                continue
            elif name == "PERSID":
                return None
            else:
                if name in ("DICT", "LIST", "FROZENSET", "OBJ", "INST", "APPENDS", "SETITEMS", "ADDITEMS") and marks:
                    marks.pop()
                last = None
                continue
            if isinstance(value, str):
                last_string = value
            if marks:
                marks[-1][0].append(value[0] if name == "TUPLE" else value)
            last = value
    except Exception:  # a malformed pickle: torch.load will say so in its own words
        return None
    return found


_QUANTIZED_SIZES = {torch.qint8: 1, torch.quint8: 1, torch.qint32: 4, torch.quint4x2: 1, torch.quint2x4: 1}


def _element_size(storage_type: str) -> int | None:
    """Bytes per element of a storage type named in a checkpoint (None: unknown, do not memory-map)."""
    if storage_type == "UntypedStorage":
        return 1
    try:
        names = torch.storage._dtype_to_storage_type_map()  # torch's own table of the legacy storage names
    except AttributeError:
        return None
    for dtype, name in names.items():
        if name == storage_type:
            return _QUANTIZED_SIZES.get(dtype) or torch.empty((), dtype=dtype).element_size()
    return None


def check_zip_storages(path: Path) -> bool:
    """Refuse a torch zip whose pickle declares a storage larger than the record holding its bytes (a
    memory-mapped load would read past the record). True when every storage was checked, False when the
    file is not a zip or its pickle could not be followed (load it without memory mapping then)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkl) != 1 or pkl[0].file_size > 1 << 30:
                return False
            root = pkl[0].filename[: -len("data.pkl")]
            data = z.read(pkl[0])
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
        return False
    records = {i.filename[len(root) + len("data/"):]: i for i in infos if i.filename.startswith(root + "data/")}
    storages = declared_storages(data)
    if storages is None:
        return False
    for key, (kind, numel, tensor) in storages.items():
        where = f"{path}: tensor {tensor!r} (storage {key!r})" if tensor else f"{path}: storage {key!r}"
        rec = records.get(key)
        if rec is None:
            raise BadFileError(f"{where} has no data record in the archive: the file is damaged; {REFETCH}")
        size = _element_size(kind)
        if size is None:
            return False
        if numel < 0 or numel * size > rec.file_size:
            raise BadFileError(f"{where} declares {numel} × {size} bytes but its record holds {rec.file_size}: "
                               f"reading it would take the bytes of other tensors; the file is damaged or crafted: "
                               f"{REFETCH}")
        if rec.compress_type != zipfile.ZIP_STORED:
            return False
    return True


_DAMAGED_PICKLE = ("invalid load key", "pickle data was truncated", "Ran out of input")
# Globals a plain tensor checkpoint names; anything else in a refused pickle is code it asks to run.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                   "builtins.bytearray")


def _pickle_globals(path: Path) -> list[str] | None:
    """The globals (module.name) the checkpoint's pickle names, read with pickletools, which parses opcodes
    and never executes anything; None when it is no pickle at all (corrupt or truncated)."""
    import io

    names: list[str] = []
    strings: list[str] = []
    try:
        if zipfile.is_zipfile(path):  # torch.save's zip: the pickle is its data.pkl
            with zipfile.ZipFile(path) as z:
                stream = io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
        else:
            with open(path, "rb") as f:  # a legacy file: its first pickles are small
                stream = io.BytesIO(f.read(1 << 20))
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001  (any failure to parse or find it means: not a pickle)
        return None
    return names


def _pickle_refusal(path: Path, error: Exception) -> BadFileError:
    """Why torch's weights-only loader refused the file, said plainly: damaged bytes, pickle features it
    lacks (a plain tensor checkpoint saved with pickle protocol 4+), or code the pickle asks to run."""
    message = str(error)
    names = None if any(m in message for m in _DAMAGED_PICKLE) else _pickle_globals(path)
    if names is None:
        return BadFileError(f"{path}: damaged torch checkpoint: not a valid pickle; {REFETCH}")
    code = sorted({n for n in names if not n.startswith(_TENSOR_GLOBALS)})
    if not code and "Unsupported operand" in message:
        opcode = (message.split("Unsupported operand", 1)[1].split() or ["?"])[0]
        return BadFileError(f"{path}: holds only tensors, but stored with pickle features torch's safe loader cannot "
                            f"read (opcode {opcode}: pickle protocol 4 or later); nothing was run. Re-save it with "
                            "torch.save's default protocol, or convert it to .safetensors")
    named = re.findall(r"GLOBAL ([\w.]+)", message)  # the global torch's loader stopped at
    code = sorted(set(code) | {n for n in named if not n.startswith(_TENSOR_GLOBALS)})
    if not code and named:  # a torch name it does not allow: cut short by truncation, or a whole pickled module
        return BadFileError(f"{path}: torch's safe loader refuses the global {named[0]} it names: the file is "
                            f"damaged (truncated?) or holds objects other than tensors; {REFETCH}, or convert it "
                            "to .safetensors in a trusted environment")
    why = f"it calls {', '.join(code[:3])}" if code else re.sub(r"\x1b\[[0-9;]*m", "", message.splitlines()[0])[:200]
    return UnsafePickleError(
        f"{path}: refused: loading it would run pickled code ({why}). "
        "Only plain tensor checkpoints are accepted; convert it to .safetensors in a trusted environment."
    )


def load_checkpoint(path: Path) -> object:
    """`torch.load(weights_only=True)`, memory-mapped when every storage was checked against its record."""
    mmaps = (True, False) if check_zip_storages(path) else (False,)
    last: Exception | None = None
    for mmap in mmaps:  # mmap needs the zip format; legacy files fall back to a plain load
        try:
            with warnings.catch_warnings():  # torch's notes on the pickle protocol would precede our message
                warnings.filterwarnings("ignore", category=UserWarning)
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise _pickle_refusal(path, e) from None
        except RuntimeError as e:
            last = e
            continue
        except Exception as e:
            last = e
            break
    why = str(last)[:300] or type(last).__name__ + " (truncated?)"
    raise BadFileError(f"{path}: cannot read as a torch checkpoint: {why}; {REFETCH}")


# --- tensors: what a weight file may hold -------------------------------------------------------------


def check_tensor(path: Path, key: str, t: torch.Tensor) -> None:
    """Refuse, from the tensor's metadata alone, what no command can read as a weight: sparse, quantized
    or nested tensors, dtypes safetensors cannot store, and views whose shape needs more bytes than their
    storage holds (a stride-0 expansion to 10^12 elements would be allocated by the first copy)."""
    where = f"{path}: tensor {key!r}"
    convert = "convert it to a dense float tensor (e.g. .to_dense() / .dequantize()) and save it as .safetensors"
    if t.layout != torch.strided or t.is_sparse:
        raise BadFileError(f"{where} is a sparse tensor ({t.layout}); {convert}")
    if t.is_quantized:
        raise BadFileError(f"{where} is a quantized tensor ({str(t.dtype).replace('torch.', '')}); {convert}")
    if getattr(t, "is_nested", False):
        raise BadFileError(f"{where} is a nested tensor; {convert}")
    if t.dtype not in TORCH_TO_SAFETENSORS:
        raise BadFileError(f"{where}: dtype {str(t.dtype).replace('torch.', '')} is not a weight dtype this tool "
                           f"reads or writes; convert it to one of fp32, fp16, bf16, fp8 or an integer type")
    need = math.prod(t.shape) * t.element_size()
    have = t.untyped_storage().nbytes()
    if need > have:
        raise BadFileError(f"{where}: shape {list(t.shape)} needs {need} bytes but its storage holds {have} "
                           f"(a stride-0 or overlapping view); refused before anything is allocated: save the "
                           f"tensor itself ({key}.contiguous()) or {REFETCH}")
