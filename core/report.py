"""Reports: plain tables for terminals and node text, JSON for files, and charts as RGB pictures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
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


MAX_LABEL = 32  # characters of an axis or legend label; longer ones keep both ends around a "…"
MIN_PLOT_HEIGHT = 200  # pixels of the plot area, whatever the labels take


def _label(text: str, limit: int = MAX_LABEL) -> str:
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return text[:half] + "…" + text[len(text) - (limit - 1 - half):]


@dataclass(frozen=True)
class Axis:
    """The value axis of a chart: its limits (in plotted units: log10 of the value on a log axis) and
    ticks as (plotted position, label)."""

    lo: float
    hi: float
    ticks: tuple[tuple[float, str], ...]
    log: bool

    def position(self, v: float) -> float:
        """Where value `v` lies between the limits, 0 (bottom) .. 1 (top)."""
        t = math.log10(max(v, 1e-300)) if self.log else v
        return (t - self.lo) / ((self.hi - self.lo) or 1.0)


def value_axis(values: Sequence[float], log: bool = False) -> Axis:
    """Limits and ticks for these values. A log axis starts at a whole decade at least a third of a decade
    below the smallest positive value (so the smallest bar is as visible as a bar at the bottom of a linear
    axis) and ends at the decade above the largest, ticked per decade; a linear axis includes 0."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if log:
        positive = [v for v in finite if v > 0] or [1.0]
        lo_v, hi_v = math.log10(min(positive)), math.log10(max(positive))
        lo = math.floor(lo_v - 1 / 3)
        hi = max(math.ceil(hi_v), lo + 1)
        step = max(1, math.ceil((hi - lo) / 8))  # at most ~8 decade ticks
        ticks = tuple((float(e), f"1e{e}" if not -2 <= e <= 2 else f"{10.0 ** e:g}") for e in range(lo, hi + 1, step))
        return Axis(float(lo), float(hi), ticks, True)
    lo, hi = min(finite + [0.0]), max(finite + [0.0])
    if hi == lo:
        hi = lo + 1.0
    step = _nice_step(hi - lo)  # round ticks (0, 0.2, 0.4 …), the axis ending on one
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step - 1e-9) * step
    count = round((hi - lo) / step)
    ticks = tuple((lo + step * i, f"{lo + step * i:.6g}") for i in range(count + 1))
    return Axis(lo, hi, ticks, False)


def _font():
    """Pillow's built-in font at 12 px (at its 10 px default a '.' merges into the letter before it)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _nice_step(span: float) -> float:
    """A tick step of 1, 2, 2.5 or 5 × 10^k giving about four intervals over `span`."""
    raw = span / 4
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def bar_chart(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str = "",
    ylabel: str = "",
    width: int = 900,
    height: int = 420,
    log: bool = False,
) -> np.ndarray:
    """Grouped bars, one group per label, one colour per series. Returns an RGB uint8 array [H, W, 3].
    Labels are shown whole up to MAX_LABEL characters (the report's own group names), rotated, with room
    below the plot for them and the legend; the picture is `width` x `height` unless labels that long would
    leave the plot less than MIN_PLOT_HEIGHT, then it grows downwards."""
    from PIL import Image, ImageDraw

    palette = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (171, 71, 188), (0, 172, 193)]
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str) -> int:
        return int(measure.textbbox((0, 0), text, font=font)[2])

    shown = [_label(lab) for lab in labels]
    label_px = max([text_w(lab) for lab in shown] + [0])
    axis = value_axis([v for vs in series.values() for v in vs], log)
    left, right, top = max(70, max(text_w(t) for _, t in axis.ticks) + 16), 20, 44
    legend_h = 26
    bottom = label_px + 14 + legend_h
    ph = max(height - top - bottom, MIN_PLOT_HEIGHT)  # the picture keeps its size unless labels leave too little
    height = top + ph + bottom
    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    pw = width - left - right
    d.text((left, 4), title, fill=(235, 235, 235), font=font)
    if ylabel:
        d.text((4, 22), ylabel + (" (log scale)" if log and "log" not in ylabel else ""), fill=(200, 200, 200),
               font=font)
    d.line([(left, top), (left, top + ph), (left + pw, top + ph)], fill=(160, 160, 160))
    for pos, text in axis.ticks:
        y = top + ph - ph * (pos - axis.lo) / ((axis.hi - axis.lo) or 1.0)
        d.line([(left - 4, y), (left + pw, y)], fill=(55, 55, 60))
        d.text((left - 8 - text_w(text), y - 8), text, fill=(200, 200, 200), font=font)
    n = max(len(labels), 1)
    group_w = pw / n
    ns = max(len(series), 1)
    bar_w = max(group_w * 0.8 / ns, 1)
    # bars grow from 0 (from the bottom of a log axis); below 0 they hang down from it
    base = top + ph if log else top + ph - ph * min(max(axis.position(0.0), 0.0), 1.0)
    if base < top + ph:
        d.line([(left, base), (left + pw, base)], fill=(160, 160, 160))
    x_legend = left
    for si, (name, vals) in enumerate(series.items()):
        color = palette[si % len(palette)]
        for i, v in enumerate(vals):
            if v is None or not math.isfinite(float(v)) or (log and float(v) <= 0):
                continue
            x0 = left + i * group_w + group_w * 0.1 + si * bar_w
            y = top + ph - ph * min(max(axis.position(float(v)), 0.0), 1.0)
            d.rectangle([x0, min(y, base), x0 + bar_w - 1, max(y, base)], fill=color)
        name = _label(name, 24)
        d.rectangle([x_legend, height - 19, x_legend + 10, height - 9], fill=color)
        d.text((x_legend + 14, height - 22), name, fill=(220, 220, 220), font=font)
        x_legend += 14 + text_w(name) + 24
    step = max(1, int(math.ceil(n / max(pw // 16, 1))))
    for i, lab in enumerate(shown):
        if i % step:
            continue
        x = left + i * group_w + group_w / 2
        _vertical_text(img, lab, int(x) - 8, top + ph + 6, font)
    return np.asarray(img, dtype=np.uint8)


def _vertical_text(img, text: str, x: int, y: int, font) -> None:
    """`text` reading upwards from the bottom, its last character at (x, y), just under the axis."""
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    tmp = Image.new("RGB", (box[2] + 2, box[3] + 3), (24, 24, 28))
    ImageDraw.Draw(tmp).text((0, 0), text, fill=(200, 200, 200), font=font)
    img.paste(tmp.rotate(90, expand=True), (x, y))


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Save a chart as PNG (whatever the file's extension): atomically, never over an existing file."""
    import io

    from PIL import Image

    from .paths import write_new_file

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return write_new_file(path, buf.getvalue())


# How reports and messages name an architecture: the name its users know, with the article that fits how it
# is spoken ("an SD1.5 LoRA", "a Flux model"), never the internal id ("a sd15").
ARCH_NAMES = {
    "sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3.5", "sd": "Stable Diffusion", "flux": "Flux", "flux-dev": "Flux dev",
    "flux-schnell": "Flux schnell", "flux2": "Flux.2", "chroma": "Chroma", "qwen-image": "Qwen-Image", "wan": "Wan",
    "lumina2": "Lumina 2", "hidream": "HiDream", "unknown": "unknown-architecture",
}


def arch_name(arch: str) -> str:
    """`sd15` -> `SD1.5`; an id not listed is shown as it is."""
    return ARCH_NAMES.get(arch, arch)


def an_arch(arch: str) -> str:
    """`sd15` -> `an SD1.5`, `flux` -> `a Flux`: the name with its article (by sound: S, X, F… read as letters)."""
    name = arch_name(arch)
    spoken_vowel = name[:1].lower() in "aeiou" or (name[:2].isupper() and name[:1] in "FHLMNRSX")
    return f"{'an' if spoken_vowel else 'a'} {name}"
