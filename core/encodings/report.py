"""What reports say about quantized inputs: which tensors were decoded, from which encoding."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..sources import TensorSource

LIST_LIMIT = 2000  # keys listed per input and encoding in a JSON report (the count is always exact)


def decoded_reads(sources: Mapping[str, TensorSource], reads: Iterable[tuple[str, str]]) -> dict[str, dict]:
    """input label -> encoding label -> {"format", "count", "keys"} over the (input label, key) pairs read;
    inputs and keys stored plain are left out, so a run on plain files gives {}."""
    out: dict[str, dict] = {}
    seen: set[tuple[str, str]] = set()
    for label, key in reads:
        if (label, key) in seen:
            continue
        seen.add((label, key))
        enc = sources[label].encoding(key)
        if enc is None:
            continue
        entry = out.setdefault(label, {}).setdefault(enc.label, {"format": enc.format, "count": 0, "keys": []})
        entry["count"] += 1
        if len(entry["keys"]) < LIST_LIMIT:
            entry["keys"].append(key)
    return out


def decoded_line(decoded: Mapping[str, dict]) -> str:
    """One line for a text report ('' when nothing was decoded)."""
    if not decoded:
        return ""
    parts = [f"{label}: " + ", ".join(f"{e['count']} {enc}" for enc, e in encs.items()) for label, encs in decoded.items()]
    return "decoded from quantized storage (values read as fp32): " + "; ".join(parts)


def source_decoded(label: str, source: TensorSource, keys: Iterable[str] | None = None) -> dict[str, dict]:
    """`decoded_reads` for one source over `keys` (default: all its keys)."""
    return decoded_reads({label: source}, ((label, k) for k in (source.keys() if keys is None else keys)))
