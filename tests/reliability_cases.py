"""Hostile inputs shared by the reliability tests (tests/test_reliability_*.py): broken and malicious
weight files built on the fly, hostile output names, and the check that an error message is one a user
can act on (it names the file and key involved and says what to do)."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import torch

MARKER = "PWNED-by-pickle"  # a pickle payload's `touch`: this file must never appear


class PicklePayload:
    """Unpickling this runs `touch <marker>`: the canary of code execution from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(folder: Path, good: Path) -> Path:
    data = good.read_bytes()
    return _write(folder / "truncated.safetensors", data[: len(data) // 2])


def _directory(folder: Path, good: Path) -> Path:
    d = folder / "directory.safetensors"
    d.mkdir()
    return d


def _pickle_ckpt(folder: Path, good: Path) -> Path:
    p = folder / "payload.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"w": PicklePayload(folder / MARKER)}}, f)
    return p


def _pickle_pt(folder: Path, good: Path) -> Path:
    p = folder / "payload.pt"
    torch.save({"w": torch.ones(2), "x": PicklePayload(folder / MARKER)}, p)
    return p


# case -> build(folder, a good model file) -> the hostile path (in `folder`)
HOSTILE_FILES: dict[str, Callable[[Path, Path], Path]] = {
    "truncated": _truncated,
    "corrupt_header": lambda f, g: _write(f / "corrupt.safetensors", raw_safetensors(b'{"a": {"dtype": "F32", "sha')),
    "header_past_end": lambda f, g: _write(
        f / "past_end.safetensors",
        raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, length=10**6)),
    "duplicate_keys": lambda f, g: _write(f / "duplicate.safetensors", raw_safetensors(
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)),
    "zero_length": lambda f, g: _write(f / "empty.safetensors", b""),
    "directory": _directory,
    "pickle_ckpt": _pickle_ckpt,
    "pickle_pt": _pickle_pt,
    "unsupported_dtype": lambda f, g: _write(
        f / "complex.safetensors", raw_safetensors({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)),
    "huge_shape": lambda f, g: _write(f / "huge.safetensors", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}}, b"\0" * 4)),
}

# Output names a stranger's API call could send as filename_prefix.
ESCAPING_PREFIXES = {
    "dotdot": "../escaped",
    "dotdot_deep": "weightsmith/../../../escaped",
    "dotdot_backslash": "..\\..\\escaped",
    "absolute": "/tmp/weightsmith-escaped",
    "home": "~/escaped",
    "drive": "C:\\escaped",
    "unc": "\\\\host\\share\\escaped",
    "nul": "escaped\x00.safetensors",
    "control": "esc\naped",
    "long": "x" * 300,
    "empty": "",
    "dots_only": "./.",
}

_ACTIONS = re.compile(
    r"\b(re-?download|download|re-export|convert|choose|give|pick|use|remove|free|add|take|retry|check|set|connect|"
    r"enable|create|shorten|extract|compose|pass|drop|rename|leave|must)\b",
    re.IGNORECASE,
)


def assert_actionable(message: str, *names: str | os.PathLike) -> None:
    """The message names each of `names` (files by full path or base name, keys verbatim) and says what to do."""
    for n in names:
        text = str(n)
        assert text in message or Path(text).name in message, f"message does not name {text!r}:\n{message}"
    assert _ACTIONS.search(message), f"message does not say what to do:\n{message}"


def folder_state(*roots: Path) -> dict[str, int]:
    """Every file under `roots` (hidden temp files included) with its size."""
    out = {}
    for root in roots:
        if root.exists():
            for p in root.rglob("*"):
                if p.is_file() or p.is_symlink():
                    out[str(p)] = p.lstat().st_size
    return out
