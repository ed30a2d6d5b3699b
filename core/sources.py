"""Lazy, one-tensor-at-a-time access to model weights wherever they live.

A `TensorSource` is what every algorithm reads from: a single .safetensors file (memory-mapped), a
sharded folder or `*.safetensors.index.json`, a `.ckpt`/`.pt` loaded with `weights_only=True`, an
in-memory dict, or (inside ComfyUI) a ModelPatcher. Algorithms match keys by name, so shard layout and
split points never matter. `diffusion_view()` strips the checkpoint prefix (`model.diffusion_model.`,
`diffusion_model.`, diffusers `transformer.`) so that models saved in different layouts line up.
"""

from __future__ import annotations

import functools
import json
import mmap as _mmap
import os
import stat
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .dtypes import all_finite, dtype_name, itemsize
from .errors import BadFileError
from .safetensors_io import REFETCH, SafetensorsHeader, TensorInfo, not_regular_kind, read_header
from .signals import hold_read_lease, release_lease
from .torchfile import check_tensor, load_checkpoint, unwrap_state_dict

if TYPE_CHECKING:
    from .encodings.base import KeyEncoding

SAFETENSORS_EXTS = (".safetensors", ".sft")
TORCH_EXTS = (".ckpt", ".pt", ".pth", ".bin")

# Checked in order: the longest, most specific prefix first.
DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "transformer.", "unet.")


NONFINITE_POLICIES = ("report", "error", "ignore")
CHANGE_CHECK_SECONDS = 0.005  # how often an input without a lease is checked for having changed


class TensorSource(ABC):
    """Read-only mapping of key -> tensor, loaded lazily. Subclasses fill `_infos` and implement `_load`.

    Every float tensor read is checked for NaN/Inf (a corrupt download or a diverged fine-tune would
    otherwise poison a merge silently): with `nonfinite="report"` (default) the keys are collected in
    `nonfinite_keys` for the caller's report, with "error" the read fails naming file and key."""

    name: str = "<tensors>"
    metadata: dict[str, str]
    nonfinite: str = "report"

    def __init__(self) -> None:
        self._infos: dict[str, TensorInfo] = {}
        self.metadata = {}
        self.nonfinite_keys: list[str] = []
        self.notes: list[str] = []  # how the file was read, where that is not plain (reports show these)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.name}: no tensor {key!r}") from None

    def get(self, key: str) -> torch.Tensor:
        """The tensor in its stored dtype, on the CPU. Memory-mapped where the format allows."""
        self.info(key)
        t = self._load(key)
        if self.nonfinite != "ignore" and t.is_floating_point() and not all_finite(t):
            if self.nonfinite == "error":
                raise BadFileError(
                    f"{self.name}: tensor {key!r} contains NaN or Inf values; the file is corrupt or the model diverged: "
                    "use an intact copy of the model"
                )
            if key not in self.nonfinite_keys:
                self.nonfinite_keys.append(key)
        return t

    def encoding(self, key: str) -> KeyEncoding | None:
        """How `key` is stored when it is an encoded (quantized) weight that `get` decodes; None for a plain
        stored tensor (`core.encodings.DecodedSource` answers for encoded files)."""
        self.info(key)
        return None

    def encodings_summary(self) -> dict[str, int]:
        """label -> number of keys: each encoding's label ("fp8 scaled (legacy) e4m3fn"), plain keys per
        stored dtype ("plain bf16")."""
        out: dict[str, int] = {}
        for k in self.keys():
            e = self.encoding(k)
            label = e.label if e is not None else f"plain {dtype_name(self.info(k).dtype)}"
            out[label] = out.get(label, 0) + 1
        return out

    def side_tensor(self, raw_key: str) -> torch.Tensor:
        """A tensor a `KeyEncoding.side` names (an activation scale, a marker…), by its key in the raw file.
        A plain source has no hidden tensors: its side tensors are its own keys."""
        return self.get(raw_key)

    def set_nonfinite_policy(self, policy: str) -> TensorSource:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite policy must be one of {NONFINITE_POLICIES}, not {policy!r}")
        self.nonfinite = policy
        return self

    @abstractmethod
    def _load(self, key: str) -> torch.Tensor:
        """The stored tensor for a key known to exist."""

    def paths(self) -> list[Path]:
        """Files this source reads (an output must never replace one of them)."""
        return []

    def prefetch(self, key: str) -> None:  # noqa: B027  (only file-backed sources read ahead)
        """Ask the operating system to start reading `key`'s bytes now (asynchronously), for a caller that
        will read it soon: an input larger than the page cache is then read while earlier keys compute,
        instead of page fault by page fault when its tensor is touched."""

    def close(self) -> None:  # noqa: B027  (sources without open handles have nothing to close)
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())


class DictSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<in-memory>", metadata=None):
        super().__init__()
        self.name = name
        self._tensors = dict(tensors)
        self._infos = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in self._tensors.items()}
        self.metadata = dict(metadata or {})

    def _load(self, key: str) -> torch.Tensor:
        return self._tensors[key]


@functools.lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


class _InputGuard:
    """An input file held open while it is read: a read lease where the CLI can take one (another program
    opening it for writing stops the run cleanly, see signals.py), else a size check before each read, so
    a file that shrank is an error naming it rather than a SIGBUS from its memory map."""

    def __init__(self, path: Path):
        self.path = path
        # O_NONBLOCK: a FIFO given as a model must not hang here (regular files read as usual)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        st = os.fstat(self.fd)
        self.size, self.mtime = st.st_size, st.st_mtime_ns
        self.leased = hold_read_lease(self.fd, path)
        self._checked = 0.0
        self._finalizer = weakref.finalize(self, _close_guarded, self.fd)

    def check(self, key: str) -> None:
        """Before reading `key`: the file is still the one whose header was read (one fstat, at most every
        few milliseconds so 10^5 tiny tensors do not pay one each; none under a lease, which stops the run
        before any change). Best effort: a truncation between this check and the read still faults."""
        if self.leased:
            return
        now = time.monotonic()
        if now - self._checked < CHANGE_CHECK_SECONDS:
            return
        self._checked = now
        st = os.fstat(self.fd)
        if st.st_size != self.size or st.st_mtime_ns != self.mtime:
            raise BadFileError(f"{self.path}: the file changed while it was being read (tensor {key!r}; size "
                               f"{self.size} -> {st.st_size} bytes): another program truncated or rewrote it; nothing "
                               "was written: wait until it has finished, check the file, and run again")

    def close(self) -> None:
        self._finalizer()


def _close_guarded(fd: int) -> None:
    release_lease(fd)
    try:
        os.close(fd)
    except OSError:
        pass


class SafetensorsSource(TensorSource):
    """One or more safetensors files (shards); the header is validated before anything is read. Tensors
    are views of the file's memory map (nothing is copied; a key costs one strided view, not a library
    call, and a few dict entries of memory: headers can list 10^5 tensors)."""

    def __init__(self, files: list[Path], name: str | None = None, index: Path | None = None,
                 folder: Path | None = None):
        super().__init__()
        self.name = name or str(files[0])
        self._files = files
        # a sharded model is its index and its folder too: an output must replace neither nor land among the shards
        self._container = [p for p in (index, folder) if p is not None]
        self._start: dict[str, int] = {}  # key -> first byte in its file
        self._key_file: dict[str, int] = {}  # key -> index of its file, for shards only (else all 0)
        self._guards: dict[int, _InputGuard | None] = {}
        self._maps: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # (file, dtype) -> the file as that dtype
        for i, f in enumerate(files):
            # held from before the header is read: a lease (or the size check) covers the whole run
            self._guards[i] = _InputGuard(f) if f.is_file() else None
            h: SafetensorsHeader = read_header(f)
            for k, info in h.tensors.items():
                if k in self._infos:
                    raise BadFileError(f"{f}: tensor {k!r} also appears in {files[self._file_of(k)]}; shards overlap: "
                                       "remove the stray shard from the folder")
                self._infos[k] = info
                self._start[k] = h.offsets[k][0]
                if i:
                    self._key_file[k] = i
            if i == 0:
                self.metadata = dict(h.metadata)
            del h

    def _file_of(self, key: str) -> int:
        return self._key_file.get(key, 0)

    def _map(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """File `i` memory-mapped, as a flat tensor of `dtype` (uint8 for unaligned reads)."""
        m = self._maps.get((i, dtype))
        if m is None:
            raw = self._maps.get((i, torch.uint8))
            if raw is None:
                guard = self._guards.get(i)
                if guard is None:  # closed before, read again
                    guard = self._guards[i] = _InputGuard(self._files[i])
                try:
                    # ACCESS_COPY: a private, writable map (pages stay shared with the page cache unless
                    # written), which torch wraps without a read-only warning; sources never write to it
                    mm = _mmap.mmap(guard.fd, 0, access=_mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:
                    raise BadFileError(f"{self._files[i]}: cannot open: {e}; {REFETCH}") from e
                raw = self._maps[(i, torch.uint8)] = torch.frombuffer(mm, dtype=torch.uint8)
            size = itemsize(dtype)
            m = self._maps[(i, dtype)] = raw[:raw.numel() // size * size].view(dtype)
        return m

    def _load(self, key: str) -> torch.Tensor:
        i = self._key_file.get(key, 0) if self._key_file else 0
        start = self._start[key]
        info = self._infos[key]
        guard = self._guards.get(i)
        if guard is not None:
            guard.check(key)
        size = itemsize(info.dtype)
        if start % size:  # a writer that did not align its tensors: copy the bytes rather than view them
            raw = self._map(i, torch.uint8)[start:start + info.nbytes]
            return raw.clone().view(info.dtype).view(info.shape)
        m = self._map(i, info.dtype)
        if start + info.nbytes > m.numel() * size:
            raise BadFileError(f"{self._files[i]}: tensor {key!r} ends at byte {start + info.nbytes} but the file "
                               f"now holds {m.numel() * size}: it was truncated; {REFETCH}")
        return torch.as_strided(m, info.shape, _contiguous_strides(info.shape), start // size)

    def prefetch(self, key: str) -> None:
        guard = self._guards.get(self._key_file.get(key, 0) if self._key_file else 0)
        info = self._infos.get(key)
        if guard is None or info is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            os.posix_fadvise(guard.fd, self._start[key], info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # a hint: a file system that does not take it reads on demand as before
            pass

    def paths(self) -> list[Path]:
        return [*self._files, *self._container]

    def close(self) -> None:
        self._maps.clear()  # the maps go when the last tensor viewing them does
        for g in self._guards.values():
            if g is not None:
                g.close()
        self._guards.clear()


class TorchFileSource(TensorSource):
    """A .ckpt/.pt/.bin file, loaded only with `torch.load(weights_only=True)`: no pickle code ever runs.
    Storages are checked against their records and tensors against their storages (core/torchfile.py);
    tensors nested under a trainer's container (`state_dict`, `model`, `ema`, …) are found and `container`
    says where (also in `notes`)."""

    def __init__(self, path: Path):
        super().__init__()
        self.name = str(path)
        self._path = path
        self._guard = _InputGuard(path)  # the checkpoint is memory-mapped too (load_checkpoint)
        found = unwrap_state_dict(load_checkpoint(path), path)
        for key, t in found.tensors.items():
            check_tensor(path, key, t)
        self._tensors = found.tensors
        self.skipped = found.skipped
        self.container = "".join(f"[{k!r}]" for k in found.where)
        note = found.note()
        if note:
            self.notes.append(note)
        self._infos = {k: TensorInfo(tuple(t.shape), t.dtype) for k, t in self._tensors.items()}

    def _load(self, key: str) -> torch.Tensor:
        self._guard.check(key)
        return self._tensors[key]

    def paths(self) -> list[Path]:
        return [self._path]

    def close(self) -> None:
        self._guard.close()


class KeyMapView(TensorSource):
    """Some keys of `base` under other names: `names` maps each name shown to the raw key in `base`."""

    def __init__(self, base: TensorSource, names: Mapping[str, str]):
        super().__init__()
        self.base = base
        self.name = base.name
        self.metadata = base.metadata
        self.nonfinite = base.nonfinite
        self.nonfinite_keys = base.nonfinite_keys  # shared: a report on the base sees what the view read
        self.notes = base.notes
        self._raw = dict(names)
        self._infos = {k: base.info(raw) for k, raw in self._raw.items()}

    def _load(self, key: str) -> torch.Tensor:
        return self.base._load(self._raw[key])

    def encoding(self, key: str) -> KeyEncoding | None:
        self.info(key)
        return self.base.encoding(self._raw[key])

    def side_tensor(self, raw_key: str) -> torch.Tensor:
        return self.base.side_tensor(raw_key)

    def paths(self) -> list[Path]:
        return self.base.paths()

    def close(self) -> None:
        self.base.close()


class PrefixView(KeyMapView):
    """The keys of `base` that start with `prefix`, with the prefix removed."""

    def __init__(self, base: TensorSource, prefix: str):
        n = len(prefix)
        super().__init__(base, {k[n:]: k for k in base.keys() if k.startswith(prefix)})
        self.prefix = prefix


def _weight_map(index: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor key -> shard file name), checked: a JSON object of strings to
    non-empty strings, naming at least one tensor."""
    bad = f"{index}: not a valid safetensors index"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except RecursionError:
        raise BadFileError(f"{bad} (JSON nested too deeply); {REFETCH}") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadFileError(f"{bad} ({e}); {REFETCH}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        raise BadFileError(f"{bad}: it needs a \"weight_map\" object mapping tensor names to shard files, found "
                           f"{type(wm).__name__ if wm is not None else 'none'}; {REFETCH}")
    if not wm:
        raise BadFileError(f"{index}: the index lists no tensors (empty \"weight_map\"); {REFETCH}")
    for key, f in wm.items():
        if not isinstance(f, str) or not f.strip() or f.strip() in (".", ".."):
            raise BadFileError(f"{bad}: tensor {key!r} maps to {f!r}, not a shard file name; {REFETCH}")
    return wm


def _index_source(index: Path, name: str | None = None, folder: Path | None = None) -> SafetensorsSource:
    """The shards an index names, each tensor of its `weight_map` checked to be in the shard it names."""
    wm = _weight_map(index)
    files = sorted(set(wm.values()))
    folder = index.parent.resolve()
    paths = []
    for f in files:
        p = (index.parent / f).resolve()
        if folder not in p.parents:
            raise BadFileError(f"{index}: shard {f!r} lies outside the index's folder; keep the shards beside the index")
        if p == index.resolve():
            raise BadFileError(f"{index}: the index names itself as a shard; {REFETCH}")
        if not p.exists():
            raise BadFileError(f"{index}: shard {f} is missing; download every shard the index lists")
        if not p.is_file():
            raise BadFileError(f"{index}: shard {f} is not a regular file; download every shard the index lists")
        paths.append(p)
    source = SafetensorsSource(paths, name=name or str(index), index=index, folder=folder or index.parent)
    by_name = dict(zip(files, paths))
    for key, f in wm.items():
        if key not in source or source._files[source._file_of(key)] != by_name[f]:
            raise BadFileError(f"{index}: the index puts tensor {key!r} in {f}, but "
                               + ("that shard does not hold it" if key not in source else "another shard holds it")
                               + "; the index and the shards do not match: download them again together")
    return source


_default_nonfinite = "report"


def set_default_nonfinite(policy: str) -> None:
    """The policy `open_model` uses when none is given (the CLI's global `--nonfinite`)."""
    global _default_nonfinite
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite policy must be one of {NONFINITE_POLICIES}, not {policy!r}")
    _default_nonfinite = policy


def open_model(path: str | os.PathLike, nonfinite: str | None = None) -> TensorSource:
    """Open a model or LoRA from a file, a sharded folder, or an index file; reads headers only.
    `nonfinite`: what a NaN/Inf tensor does when read — 'report' (collect in `nonfinite_keys`), 'error', 'ignore';
    None: the process default ('report' unless `set_default_nonfinite` changed it).
    Quantized files (scaled fp8, ComfyUI mixed precision, …) come back decoded (`core.encodings`): encoded
    weights read as fp32 in their logical shape, scale tensors are not keys; an encoding that cannot be
    decoded exactly is refused here, naming file, layer and format."""
    from .encodings import decode_source

    return decode_source(_open_model(path)).set_nonfinite_policy(nonfinite or _default_nonfinite)


def sniff(path: Path) -> tuple[str, bytes]:
    """(what a file holds, its first bytes): 'gguf' (its magic), 'safetensors' (a little-endian header length
    within the file, then '{'), 'zip' (torch.save's format), 'pickle' (the legacy torch.save format: pickle
    protocol 2+), or 'unknown'. Suffixes lie (a safetensors file renamed .bin); the content decides what
    reads it."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf", head
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors", head
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip", head
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle", head
    return "unknown", head


def _open_model(path: str | os.PathLike) -> TensorSource:
    p = Path(path)
    if not p.exists():
        raise BadFileError(f"{p}: no such file or folder; check the path")
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise BadFileError(f"{p}: several index files ({', '.join(i.name for i in indexes)}); name one")
        if indexes:
            return _index_source(indexes[0], name=str(p), folder=p)
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise BadFileError(f"{p}: folder holds no .safetensors files; give a model file or a folder of .safetensors shards")
        return SafetensorsSource(files, name=str(p), folder=p)
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):  # a FIFO or socket would block the first read forever
        raise BadFileError(f"{p}: is {not_regular_kind(mode)}, not a regular file; give the path of a model file")
    name = p.name.lower()
    if name.endswith(".index.json"):
        return _index_source(p)
    if name.endswith(SAFETENSORS_EXTS):
        return SafetensorsSource([p])
    kind, head = sniff(p)
    if kind == "gguf" or name.endswith(".gguf"):  # before the safetensors test: a GGUF is never "not a model"
        from .encodings.gguf import GGUFSource

        return GGUFSource(p)
    if kind == "safetensors":  # also under a torch suffix: read as what it is, never unpickled
        return SafetensorsSource([p])
    if kind == "unknown":
        size = p.stat().st_size
        raise BadFileError(
            f"{p}: not a model file: " + ("it is empty" if not size else
            f"its first bytes ({head[:8].hex(' ')}) are neither safetensors nor a torch checkpoint "
            "(zip or pickle)") + f"; {REFETCH}")
    return TorchFileSource(p)


def as_source(obj: TensorSource | Mapping[str, torch.Tensor] | str | os.PathLike) -> TensorSource:
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, Mapping):
        from .encodings import decode_source

        return decode_source(DictSource(obj))
    return open_model(obj)


# Bare keys of full checkpoints that are not diffusion-model weights: the EMA copy SD checkpoints keep
# beside the model, sampler buffers (their names have no dot: `alphas_cumprod`, `betas`).
_NOT_MODEL_PREFIXES = ("model_ema.", "denoiser.")


@dataclass(frozen=True)
class DiffusionLayout:
    """Where a file's diffusion-model weights are: `prefix` ('' for a bare diffusion-model file) and
    `names` (name with the prefix stripped -> raw key). Keys under another diffusion prefix beside the
    model (`unet.x` in a bare file) are `strays`, folded into `names`; a layer present under two names
    (`x` and `unet.x`) is a `twins` pair, and such a file is refused by `check`."""

    prefix: str
    names: dict[str, str]
    strays: dict[str, str] = field(default_factory=dict)  # raw key -> name
    twins: list[tuple[str, str]] = field(default_factory=list)

    def check(self, where: str) -> None:
        if self.twins:
            shown = ", ".join(f"{a!r} and {b!r}" for a, b in self.twins[:3])
            more = f" (and {len(self.twins) - 3} more pairs)" if len(self.twins) > 3 else ""
            raise BadFileError(f"{where}: holds the same layer under two names: {shown}{more} (with and without "
                               "a prefix); which one is the model's weight cannot be told: remove one of each pair "
                               "(re-export the model with one key prefix)")

    def note(self) -> str | None:
        if not self.strays:
            return None
        shown = ", ".join(f"{raw} -> {name}" for raw, name in list(self.strays.items())[:5])
        more = f", … ({len(self.strays)} in all)" if len(self.strays) > 5 else ""
        return (f"{len(self.strays)} key(s) under another prefix than the model's "
                f"({self.prefix or 'no prefix'!r}) read as the model's own: {shown}{more}")


def _diffusion_prefix_of(key: str) -> str | None:
    for prefix in DIFFUSION_PREFIXES:
        if key.startswith(prefix):
            return prefix
    return None


def diffusion_layout(keys: list[str]) -> DiffusionLayout:
    """The namespace that covers the diffusion model: the diffusion prefix with the most keys, unless
    the bare weights outnumber it (a bare model with a stray `unet.x` key is a bare model)."""
    counts = dict.fromkeys(DIFFUSION_PREFIXES, 0)
    bare_weights = 0
    for k in keys:
        p = _diffusion_prefix_of(k)
        if p is not None:
            counts[p] += 1
        elif "." in k and key_group(k) == "other" and not k.startswith(_NOT_MODEL_PREFIXES):
            bare_weights += 1
    prefix = max(DIFFUSION_PREFIXES, key=lambda p: counts[p])  # ties: the most specific prefix
    if counts[prefix] == 0 or counts[prefix] < bare_weights:
        prefix = ""
    names: dict[str, str] = {}
    if prefix:
        names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    else:
        names = {k: k for k in keys if key_group(k) == "other"}
    strays: dict[str, str] = {}
    twins: list[tuple[str, str]] = []
    for k in keys:
        p = _diffusion_prefix_of(k)
        if p is None or p == prefix:
            if prefix and p is None and k in names:  # `x` beside `model.diffusion_model.x`
                twins.append((names[k], k))
            continue
        name = k[len(p):]
        if name in names:
            twins.append((names[name], k))
        else:
            names[name] = k
            strays[k] = name
    return DiffusionLayout(prefix, names, strays, twins)


def detect_diffusion_prefix(keys: list[str]) -> str:
    """The prefix under which the diffusion model's weights sit ('' for a bare diffusion-model file)."""
    return diffusion_layout(keys).prefix


def diffusion_view(source: TensorSource) -> TensorSource:
    """Only the diffusion model's keys, prefix stripped: the common ground for merge, extract and compare.
    A file holding one layer under two names is refused; stray keys are read as the model's and noted."""
    layout = diffusion_layout(source.keys())
    layout.check(source.name)
    note = layout.note()
    if note and note not in source.notes:
        source.notes.append(note)
    if not layout.prefix and not layout.strays and len(layout.names) == len(source):
        return source
    return KeyMapView(source, layout.names)


_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "transformer.", "unet.")
_TE_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.", "text_encoder", "te.", "clip_", "t5xxl.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def key_group(key: str) -> str:
    """Which part of a full checkpoint a raw key belongs to: 'unet', 'te', 'vae' or 'other'."""
    if key.startswith(_UNET_PREFIXES):
        return "unet"
    if key.startswith(_TE_PREFIXES):
        return "te"
    if key.startswith(_VAE_PREFIXES):
        return "vae"
    return "other"


def classify_keys(keys: list[str]) -> dict[str, str]:
    """key -> group for a whole file. The diffusion model's keys (`diffusion_layout`: in a bare file every
    key outside the known components, stray prefixed keys included) are 'unet'; in a full checkpoint, keys
    outside the known components stay 'other' (e.g. `alphas_cumprod`)."""
    model = set(diffusion_layout(keys).names.values())
    groups = {}
    for k in keys:
        g = key_group(k)
        groups[k] = "unet" if k in model else ("other" if g == "unet" else g)
    return groups
