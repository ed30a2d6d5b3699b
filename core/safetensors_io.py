"""safetensors at the byte level: a validating header reader and a streaming, atomic writer.

The header is checked here before any tensor is touched, so that a truncated or hostile file fails with
a clear message instead of an allocation of a declared 10^12-element shape or a crash deep in a merge.
The writer lays out the header from the planned keys, shapes and dtypes, then writes each tensor (or any
byte range of one, from any thread) at its offset as it is produced, so an output never has to sit in RAM
whole. It writes to a temp file beside
the target and renames at the end: an exception, an interrupt or a full disk leave no file at the output
path.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import os
import stat
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, itemsize
from .errors import BadFileError, OutputPathError, UnsupportedEncodingError
from .outputs import place_or_defer
from .paths import check_name_fits, check_writable_folder, create_temp_beside, refuse_input_target
from .provenance import HASH_KEY as _HASH_KEY
from .provenance import HASH_PENDING as _HASH_PENDING

_FOLLOW_STEP = 8 << 20  # written bytes the follower thread waits for before it wakes
_HASH_CHUNK = 1 << 20  # bytes it reads back and hashes at once
_PAGE = 4096

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same limit the safetensors library applies
REFETCH = "download the file again or re-export it"  # what to do about a damaged file
MAX_DIM = 2**63  # torch sizes are int64: a larger dimension, or element count, cannot be held
MAX_NDIM = 64  # torch's limit on dimensions
# safetensors dtypes torch cannot hold that only quantized layouts use (named in the refusal)
QUANTIZED_DTYPES = {
    "F8_E8M0": "MXFP8/MXFP4 block scales (e.g. ComfyUI mixed-precision format mxfp8)",
    "F4": "packed 4-bit floats (NVFP4/MXFP4, e.g. ComfyUI mixed-precision format nvfp4)",
    "F6_E2M3": "packed 6-bit floats (MXFP6)",
    "F6_E3M2": "packed 6-bit floats (MXFP6)",
}


@dataclass(frozen=True, slots=True)  # slots: one per tensor, and headers can list 10^5 tensors
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    offsets: dict[str, tuple[int, int]]  # absolute byte ranges in the file
    metadata: dict[str, str]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)  # in C; only a header that has duplicates pays for finding them
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


@contextmanager
def _gc_paused():
    """A header of 10^5 tensors is 10^5 small dicts and lists: the cyclic collector, triggered by the
    allocations, would walk them all again and again (half the parse time). They hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _regular_file_size(path: Path) -> int:
    """The size of `path`, refusing what is not a regular file: a FIFO or a socket would block the read
    forever, a device would be read without end."""
    if path.is_dir():
        raise BadFileError(f"{path}: is a directory, expected a .safetensors file; give the path of the file itself")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadFileError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise BadFileError(f"{path}: cannot read it ({e.strerror or e}); check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadFileError(f"{path}: is {not_regular_kind(st.st_mode)}, not a regular file; give the path of a model file")
    return st.st_size


def not_regular_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a socket', … for the message refusing it."""
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _parse_json(raw: bytes, path: Path) -> object:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:  # a header of nested brackets; no real header nests more than 3 deep
        raise BadFileError(f"{path}: corrupt safetensors header (JSON nested too deeply to be a tensor "
                           f"table); {REFETCH}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadFileError(f"{path}: corrupt safetensors header ({e}); {REFETCH}") from None


def _shape(value: object) -> tuple[int, ...] | None:
    """A well-formed shape: a list of non-negative ints (not bools) torch can hold, or None."""
    if not isinstance(value, list) or not all(type(s) is int and 0 <= s < MAX_DIM for s in value):
        return None
    if len(value) > MAX_NDIM or math.prod(s for s in value if s) >= MAX_DIM:
        return None
    return tuple(value)


def _check_layout(path: Path, offsets: dict[str, tuple[int, int]], data_start: int, size: int) -> None:
    """The tensors tile the data section exactly, as the safetensors library requires before it reads any
    tensor: sorted by offset, each starts where the previous ends, and the last ends at the end of the file.
    Checked here so that every command (inspect and verify included) judges a file alike. `offsets` are
    absolute; messages give them relative to the data section, as the header does."""
    end = data_start
    for start, stop in sorted(offsets.values()):  # plain tuples: 10^5 of them sort fast; names only for an error
        if start != end:
            key = next(k for k, v in offsets.items() if v == (start, stop))
            prev = next((k for k, v in offsets.items() if v[1] == end and v[0] < end), None)
            what = (f"overlaps tensor {prev!r}" if start < end else
                    f"starts at byte {start - data_start}, leaving bytes {end - data_start}..{start - data_start} "
                    "that belong to no tensor")
            if start < end and prev is None:
                what = "overlaps another tensor"
            raise BadFileError(f"{path}: tensor {key!r} {what}: the header is corrupt; {REFETCH}")
        end = stop
    if end != size:
        raise BadFileError(f"{path}: {size - end} bytes follow the last tensor (the tensors end at byte "
                           f"{end - data_start} of {size - data_start}): the file is corrupt or not safetensors; "
                           f"{REFETCH}")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data: everything the
    safetensors library checks before reading a tensor (dtypes, shapes, sizes, a data section the tensors
    tile exactly, string metadata) is checked here, with a message naming file and key."""
    path = Path(path)
    size = _regular_file_size(path)
    if size < 8:
        raise BadFileError(f"{path}: file is {size} bytes, too short to be safetensors (truncated or empty download?); {REFETCH}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise BadFileError(
                f"{path}: header length {n} exceeds the file ({size} bytes); the file is truncated or not safetensors: "
                f"{REFETCH}"
            )
        raw = f.read(n)
    with _gc_paused():
        return _parse_header(path, raw, size, n)


def _parse_header(path: Path, raw: bytes, size: int, n: int) -> SafetensorsHeader:
    header = _parse_json(raw, path)
    del raw
    if not isinstance(header, dict):
        raise BadFileError(f"{path}: safetensors header is not a JSON object; {REFETCH}")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent, or null as the safetensors library accepts it
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadFileError(f"{path}: __metadata__ must map strings to strings; {REFETCH}")
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}

    def where() -> str:  # formatted only for an error: 10^5 keys would pay for it otherwise
        return f"{path}: tensor {key!r}"

    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise BadFileError(f"{where()}: header entry is not an object; {REFETCH}")
        code = entry.get("dtype")
        if not isinstance(code, str) or code not in SAFETENSORS_TO_TORCH:
            what = QUANTIZED_DTYPES.get(code) if isinstance(code, str) else None
            if what is not None:  # a quantized layout's payload or block scale: say which format
                raise UnsupportedEncodingError(
                    f"{where()}: dtype {code} holds {what}; this pack cannot decode that encoding exactly: use a bf16, "
                    "fp8 or ComfyUI scaled-fp8 version of the model")
            raise BadFileError(f"{where()}: unsupported dtype {code!r}; convert the file to one of "
                               f"{', '.join(SAFETENSORS_TO_TORCH)} with the tool that wrote it")
        shape = _shape(entry.get("shape"))
        if shape is None:
            raise BadFileError(f"{where()}: invalid shape {entry.get('shape')!r}; {REFETCH}")
        offs = entry.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int and o >= 0 for o in offs)
            or offs[0] > offs[1]
        ):
            raise BadFileError(f"{where()}: invalid data_offsets {offs!r}; {REFETCH}")
        info = TensorInfo(shape, SAFETENSORS_TO_TORCH[code])
        if offs[1] > data_len:
            raise BadFileError(
                f"{where()}: data ends at byte {offs[1]} but the file holds {data_len} data bytes: the file is truncated; "
                f"{REFETCH}"
            )
        if offs[1] - offs[0] != info.nbytes:
            raise BadFileError(
                f"{where()}: shape {list(shape)} of {code} needs {info.nbytes} bytes but the header gives "
                f"{offs[1] - offs[0]}: the header is corrupt; {REFETCH}"
            )
        tensors[key] = info
        offsets[key] = (data_start + offs[0], data_start + offs[1])
    _check_layout(path, offsets, data_start, size)
    return SafetensorsHeader(path, tensors, offsets, dict(metadata))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, pos: int, n: int) -> None:
    """Ask Linux to start writing `n` bytes at `pos` to the disk now, without waiting (sync_file_range
    WRITE): the disk writes while later tensors compute, instead of the whole output's dirty pages (up to
    the kernel's dirty limit, gigabytes) waiting for the fsync at commit. A hint: elsewhere, or where the
    file system refuses it, nothing happens."""
    if _SYNC_FILE_RANGE is not None and n > 0:
        _SYNC_FILE_RANGE(fd, pos, n, _SYNC_FILE_RANGE_WRITE)


def _write_all_at(fd: int, data: memoryview, pos: int, lock: threading.Lock) -> None:
    """Write every byte of `data` at file offset `pos`. pwrite keeps no shared file position, so threads
    write their parts side by side; where the OS has none (Windows) a lock serialises seek + write."""
    while len(data):
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, data, pos)
        else:
            with lock:
                os.lseek(fd, pos, os.SEEK_SET)
                n = os.write(fd, data)
        data, pos = data[n:], pos + n


class _WrittenFollower:
    """Follows a file's bytes [start, end) while they are written in any order: writers report each
    written range (`written`), and a thread takes the contiguous prefix as it grows. With `hash`, it
    computes the SHA-256 of those bytes, reading them back from the page cache (pread: a copy, ~0.1 s/GB):
    hashing at commit instead cost the whole hash after the last byte (measured: 0.7 s of a 3.7 s
    scaled-fp8 merge of 2 x 1 GB, with the cores idle), here only the last few MB are left at commit.
    Then it starts the disk writing those bytes (`start_writeback`): without that, the output's dirty
    pages (up to the kernel's dirty limit, gigabytes) all waited for the fsync at commit, with the cores
    idle (measured: the last ~20% of a 2 x 1 GB merge). Behind the frontier, in whole pages, from one
    thread: no page still being written is put under writeback."""

    def __init__(self, fd: int, start: int, end: int, hash: bool, lock: threading.Lock):
        self._fd, self._end, self._lock = fd, end, lock  # the writers' lock (see _read_into)
        self._sha = hashlib.sha256() if hash else None
        # one small buffer reused for every read (a fresh bytes object per read is allocation churn in this
        # thread's malloc arena, which keeps freed chunks once glibc's mmap threshold has risen)
        self._buf = memoryview(bytearray(_HASH_CHUNK)) if hash else None
        self._frontier = self._done = start  # written without gaps up to / taken (hashed) up to
        self._flushed = start  # writeback started up to (a page boundary, or the end)
        self._ahead: dict[int, int] = {}  # written ranges past the frontier: start -> end
        self._cond = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weightsmith-writer", daemon=True)
        self._thread.start()

    def written(self, start: int, end: int) -> None:
        if end <= start:  # an empty tensor: nothing to follow (and its offset may start a real range)
            return
        with self._cond:
            if start != self._frontier:
                self._ahead[start] = end
                return
            self._frontier = end
            while self._frontier in self._ahead:
                self._frontier = self._ahead.pop(self._frontier)
            if self._frontier - self._done >= _FOLLOW_STEP or self._frontier == self._end:
                self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and self._frontier - self._done < _FOLLOW_STEP \
                            and self._frontier != self._end:
                        self._cond.wait()
                    upto = self._frontier
                    if upto == self._done and (self._closing or upto == self._end):
                        return
                pos = self._done
                while self._sha is not None and pos < upto:
                    n = _read_into(self._fd, self._buf, min(_HASH_CHUNK, upto - pos), pos, self._lock)
                    if not n:
                        raise OSError("the temp file is shorter than written")
                    self._sha.update(self._buf[:n])
                    pos += n
                flush_to = upto if upto == self._end else upto - upto % _PAGE
                if flush_to > self._flushed:
                    start_writeback(self._fd, self._flushed, flush_to - self._flushed)
                    self._flushed = flush_to
                with self._cond:
                    self._done = upto
        except BaseException as e:  # raised at commit by finish()
            self._error = e

    def finish(self) -> str | None:
        """Wait for every written byte to be followed and return the hex digest (None without `hash`)."""
        with self._cond:
            self._closing = True  # the thread takes what is written and stops
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise OutputPathError(f"could not read back the output to hash it: {self._error}")
        if self._done != self._end:
            raise RuntimeError(f"output followed up to byte {self._done} of {self._end}: bytes were never written")
        return self._sha.hexdigest() if self._sha is not None else None

    def stop(self) -> None:
        """Abandon the work (the output is being aborted)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()


def _read_into(fd: int, buf: memoryview, n: int, pos: int, lock: threading.Lock) -> int:
    """Read up to `n` bytes at `pos` into the start of `buf`; the count read (0 at the end of the file).
    Where the OS has no positioned read (Windows), seek + read under the writers' lock: their seek +
    write must not be split by ours."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf[:n]], pos)
    with lock:
        os.lseek(fd, pos, os.SEEK_SET)
        chunk = os.read(fd, n)
    buf[:len(chunk)] = chunk
    return len(chunk)


class StreamingWriter:
    """Write a safetensors file tensor by tensor, atomically.

    Usage::

        with StreamingWriter(out, plan={"a": ((3, 4), torch.bfloat16)}, metadata={...}) as w:
            w.write("a", tensor)

    Every planned key must be written exactly once (in any order): whole with `write`, or in disjoint
    byte ranges with `write_at` (thread-safe: row blocks computed by several threads go straight to their
    place). The file appears at `path` only when the block exits cleanly. `protect` lists input files the
    output must never replace, and an existing output is never replaced unless `overwrite=True`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        plan: Mapping[str, tuple[Iterable[int], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
        protect: Iterable[str | os.PathLike] = (),
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.overwrite = overwrite
        self._protect = [Path(p) for p in protect]
        self._check_target()
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        # The header is built as text piece by piece (byte for byte what json.dumps of the nested dicts
        # gives): a dict per tensor would cost ~1 KB each at 10^5 tensors.
        pieces = [json.dumps({"__metadata__": meta}, separators=(",", ":"))[1:-1]] if meta else []
        quote = json.encoder.encode_basestring_ascii
        self.infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        pos = 0
        for key, (shape, dtype) in plan.items():
            if dtype not in TORCH_TO_SAFETENSORS:
                raise BadFileError(f"{self.path}: cannot store tensor {key!r} of dtype {dtype} in safetensors")
            info = TensorInfo(tuple(int(s) for s in shape), dtype)
            end = pos + info.nbytes
            pieces.append(f'{quote(key)}:{{"dtype":"{TORCH_TO_SAFETENSORS[dtype]}","shape":['
                          f'{",".join(map(str, info.shape))}],"data_offsets":[{pos},{end}]}}')
            self.infos[key] = info
            self._offsets[key] = pos
            pos = end
        raw = ("{" + ",".join(pieces) + "}").encode("utf-8")
        del pieces
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors itself writes it
        self._header = struct.pack("<Q", len(raw)) + raw
        self._data_start = len(self._header)
        self.total_bytes = self._data_start + pos
        # modelspec.hash_sha256 (see provenance.py): the placeholder's place in the header, filled at commit
        # with the SHA-256 of the data section, hashed by a thread that follows the written bytes (_WrittenFollower)
        self.sha256: str | None = None
        at = raw.find(_HASH_PENDING.encode()) if meta.get(_HASH_KEY) == _HASH_PENDING else -1
        self._hash_at = 8 + at if at >= 0 else None
        self._follower: _WrittenFollower | None = None
        self._written: set[str] = set()  # keys written whole
        self._filled: dict[str, int] = {}  # bytes written so far by write_at
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._tmp: Path | None = None

    def _check_target(self) -> None:
        check_name_fits(self.path)
        target = self.path.resolve()
        refuse_input_target(self.path, self._protect)  # also every file and the folder of a sharded input
        if target.exists() and not self.overwrite:
            raise OutputPathError(f"refusing to overwrite existing file {self.path}; choose another name or remove it")
        if not target.parent.is_dir():
            raise OutputPathError(f"output folder {target.parent} does not exist; create it or choose another output path")
        check_writable_folder(target.parent, self.path.name)

    def __enter__(self) -> StreamingWriter:
        try:
            self._fd, self._tmp = create_temp_beside(self.path.resolve().parent, self.path.name)
        except OSError as e:
            raise OutputPathError(f"could not create a file beside {self.path}: {e}; check the folder's "
                                  "permissions and free space") from e
        try:
            _write_all_at(self._fd, memoryview(self._header), 0, self._lock)
            if self._hash_at is not None or _SYNC_FILE_RANGE is not None:
                self._follower = _WrittenFollower(self._fd, self._data_start, self.total_bytes,
                                                  hash=self._hash_at is not None, lock=self._lock)
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError):  # a full disk or file size limit already at the header
                raise OutputPathError(f"could not write {self.path}: {e}; free disk space and retry") from e
            raise
        return self

    def _info(self, key: str) -> TensorInfo:
        if self._fd is None:
            raise RuntimeError("StreamingWriter.write outside its with-block")
        info = self.infos.get(key)
        if info is None:
            raise KeyError(f"{self.path}: tensor {key!r} was not planned")
        return info

    def _put(self, key: str, data: memoryview, pos: int) -> None:
        fd = self._fd
        if fd is None:  # aborted by another thread meanwhile
            raise RuntimeError(f"{self.path}: the output was closed while tensor {key!r} was being written")
        try:
            _write_all_at(fd, data, self._data_start + self._offsets[key] + pos, self._lock)
        except OSError as e:  # disk full, file size limit, I/O error: say where, the temp file goes away
            raise OutputPathError(f"could not write {self.path} (tensor {key!r}): {e}; free disk space and retry") from e
        if self._follower is not None:
            start = self._data_start + self._offsets[key] + pos
            self._follower.written(start, start + len(data))

    def _finish_follower(self, fd: int) -> None:
        """Wait for the follower (the hashing thread finishes what it has not hashed yet); the data section's
        digest goes into the header's placeholder."""
        assert self._follower is not None
        digest = self._follower.finish()
        if self._hash_at is not None:
            assert digest is not None
            self.sha256 = "0x" + digest
            _write_all_at(fd, memoryview(self.sha256.encode()), self._hash_at, self._lock)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        info = self._info(key)
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(
                f"{self.path}: tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {info.shape} {info.dtype}"
            )
        with self._lock:
            if key in self._written or key in self._filled:
                raise KeyError(f"{self.path}: tensor {key!r} written twice")
            self._written.add(key)
        self._put(key, _tensor_bytes(tensor), 0)

    def write_at(self, key: str, byte_offset: int, part: torch.Tensor) -> None:
        """Write `part` (flat or not; its bytes, in the key's dtype) at `byte_offset` within tensor `key`.
        The parts of a key must not overlap: together they fill it exactly once."""
        info = self._info(key)
        if part.dtype != info.dtype:
            raise ValueError(f"{self.path}: part of tensor {key!r} is {part.dtype}, planned {info.dtype}")
        data = _tensor_bytes(part)
        if byte_offset < 0 or byte_offset + len(data) > info.nbytes:
            raise ValueError(f"{self.path}: bytes {byte_offset}..{byte_offset + len(data)} lie outside tensor {key!r} "
                             f"({info.nbytes} bytes)")
        with self._lock:
            filled = self._filled.get(key, 0) + len(data)
            if key in self._written or filled > info.nbytes:
                raise KeyError(f"{self.path}: tensor {key!r} written twice")
            self._filled[key] = filled
        self._put(key, data, byte_offset)

    def _abort(self) -> None:
        if self._follower is not None:
            self._follower.stop()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
            self._tmp = None

    def _commit(self) -> None:
        missing = [k for k, info in self.infos.items()
                   if k not in self._written and self._filled.get(k, -1) != info.nbytes]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[:3]}")
        assert self._fd is not None and self._tmp is not None
        if self._follower is not None:
            self._finish_follower(self._fd)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._check_target()  # the target may have appeared while we worked
        tmp, self._tmp = self._tmp, None
        place_or_defer(tmp, self.path, self.overwrite, self._check_target)  # with the run's other outputs

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._commit()
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError) and not isinstance(e, OutputPathError):
                raise OutputPathError(f"could not write {self.path}: {e}; free disk space and retry") from e
            raise


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    **kw,
) -> Path:
    """Write an in-memory dict through the atomic writer (for small outputs such as LoRAs)."""
    plan = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with StreamingWriter(path, plan, metadata, **kw) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(path)
