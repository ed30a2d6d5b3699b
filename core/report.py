"""Reports: plain tables for terminals and node text, JSON for files, and charts as RGB pictures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """A fixed-width text table of `rows` (dicts), columns in the given order."""
    if not rows:
        return (title + "\n" if title else "") + "(empty)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append("  ".join(v.rjust(w) if _is_num(v) else v.ljust(w) for v, w in zip(row, widths)))
    return "\n".join(out)


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def write_json(path: str | Path, data: dict) -> Path:
    """Write a JSON report: atomically, never over an existing file (it might be an input model)."""
    from .paths import write_new_file

    return write_new_file(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default).encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def bar_chart(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str = "",
    ylabel: str = "",
    width: int = 900,
    height: int = 420,
    log: bool = False,
) -> np.ndarray:
    """Grouped bars, one group per label, one colour per series. Returns an RGB uint8 array [H, W, 3]."""
    from PIL import Image, ImageDraw

    palette = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (171, 71, 188), (0, 172, 193)]
    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 34, 90
    pw, ph = width - left - right, height - top - bottom
    values = [float(v) for vs in series.values() for v in vs if v is not None and math.isfinite(float(v))]

    def tr(v: float) -> float:
        if log:
            return math.log10(max(v, 1e-12))
        return v

    lo = min([tr(v) for v in values] + [0.0 if not log else tr(max(min(values, default=1e-6), 1e-12))])
    hi = max([tr(v) for v in values] + [lo + 1e-12])
    if not log:
        lo = min(lo, 0.0)
    span = hi - lo or 1.0
    d.text((left, 8), title, fill=(235, 235, 235))
    d.line([(left, top), (left, top + ph), (left + pw, top + ph)], fill=(160, 160, 160))
    for i in range(5):
        v = lo + span * i / 4
        y = top + ph - ph * i / 4
        d.line([(left - 4, y), (left + pw, y)], fill=(55, 55, 60))
        d.text((4, y - 6), _fmt(10**v if log else v), fill=(200, 200, 200))
    if ylabel:
        d.text((4, top - 16), ylabel, fill=(200, 200, 200))
    n = max(len(labels), 1)
    group_w = pw / n
    ns = max(len(series), 1)
    bar_w = max(group_w * 0.8 / ns, 1)
    for si, (name, vals) in enumerate(series.items()):
        color = palette[si % len(palette)]
        for i, v in enumerate(vals):
            if v is None or not math.isfinite(float(v)):
                continue
            x0 = left + i * group_w + group_w * 0.1 + si * bar_w
            y = top + ph - ph * (tr(float(v)) - lo) / span
            d.rectangle([x0, min(y, top + ph), x0 + bar_w - 1, top + ph], fill=color)
        d.rectangle([left + 10 + si * 150, height - 18, left + 20 + si * 150, height - 8], fill=color)
        d.text((left + 24 + si * 150, height - 20), str(name)[:20], fill=(220, 220, 220))
    step = max(1, int(math.ceil(n / max(pw // 14, 1))))
    for i, lab in enumerate(labels):
        if i % step:
            continue
        x = left + i * group_w + group_w / 2
        _vertical_text(img, str(lab)[:14], int(x) - 6, top + ph + 4)
    return np.asarray(img, dtype=np.uint8)


def _vertical_text(img, text: str, x: int, y: int) -> None:
    from PIL import Image, ImageDraw

    tmp = Image.new("RGB", (8 * len(text) + 4, 12), (24, 24, 28))
    ImageDraw.Draw(tmp).text((0, 0), text, fill=(200, 200, 200))
    rot = tmp.rotate(90, expand=True)
    img.paste(rot, (x, y))


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Save a chart as PNG (whatever the file's extension): atomically, never over an existing file."""
    import io

    from PIL import Image

    from .paths import write_new_file

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return write_new_file(path, buf.getvalue())
