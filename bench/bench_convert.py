"""LoRA conversion: a kohya Flux LoRA on every block linear at full size (19 double + 38 single blocks,
hidden 3072, rank 64, bf16, modulations included) converted to Chroma — ours to kohya, comfy and diffusers
(split q/k/v) — against the floor of reading the file and writing its bytes back, and a naive
`safetensors.load_file` + drop modulation keys by name + `save_file` (kohya names only, no checks, and no
fsync: it may return before the data is on disk, which our atomic writer never does).
Every contender runs in its own forked process, in the same run, from a warm page cache.

    .venv/bin/python bench/bench_convert.py [--quick]

Target: Flux -> Chroma (kohya in, kohya out) in under 2 s at full size, exactly the modulation modules dropped.
--quick uses 4 double + 8 single blocks (same widths) and only checks that the run works.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import drop_page_cache_hint, measure, table  # noqa: E402

from weightsmith.lora.convert import flux_to_chroma  # noqa: E402
from weightsmith.lora.formats import load_lora, save_lora  # noqa: E402
from weightsmith.safetensors_io import StreamingWriter, read_header  # noqa: E402
from weightsmith.testmodels import FLUX_FULL, FluxConfig, flux_shapes  # noqa: E402

RANK = 64
TARGET_S = 2.0
MODULATION = re.compile(r"(_mod_lin|modulation_lin|adaLN_modulation_1|time_in_|vector_in_|guidance_in_)")


def write_kohya_lora(path: Path, cfg: FluxConfig, seed: int = 0) -> int:
    """A kohya Flux LoRA on every 2-D weight of a Flux model of `cfg`, streamed to disk; returns module count."""
    shapes = {k[: -len(".weight")]: s for k, s in flux_shapes(cfg, "dev").items() if k.endswith(".weight") and len(s) == 2}
    plan = {}
    for name, (out, inp) in shapes.items():
        p = "lora_unet_" + name.replace(".", "_")
        plan[p + ".lora_up.weight"] = ((out, RANK), torch.bfloat16)
        plan[p + ".lora_down.weight"] = ((RANK, inp), torch.bfloat16)
        plan[p + ".alpha"] = ((), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(path, plan, {"ss_network_dim": str(RANK)}) as w:
        for key, (shape, dtype) in plan.items():
            t = torch.tensor(32.0) if key.endswith(".alpha") else (torch.randn(shape, generator=gen) * 0.01).to(dtype)
            w.write(key, t)
    return len(shapes)


def copy_bytes(src: str, dst: str) -> None:
    """The floor of any converter that writes safely: read the input, write the output, fsync it."""
    import os

    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def naive_filter(src: str, dst: str) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(src)
    save_file({k: v for k, v in sd.items() if not MODULATION.search(k)}, dst)


def ours(src: str, dst: str, fmt: str) -> None:
    lora, _report = flux_to_chroma(load_lora(src))
    save_lora(lora, dst, fmt=fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 double + 8 single blocks; no target check")
    args = ap.parse_args(argv)
    cfg = FluxConfig(**{**FLUX_FULL.__dict__, "depth": 4, "depth_single": 8}) if args.quick else FLUX_FULL
    with tempfile.TemporaryDirectory(prefix="ws_bench_convert_") as tmp:
        src = Path(tmp) / "flux_kohya_r64.safetensors"
        # generated in a child too: torch's thread pool must not start in this process before the forks
        gen = measure("generate", write_kohya_lora, src, cfg)
        n_modules = len({k.split(".")[0] for k in read_header(src).tensors})
        size_mb = src.stat().st_size / 2**20
        print(f"input: {n_modules} modules, rank {RANK}, {cfg.depth} double + {cfg.depth_single} single blocks, "
              f"{size_mb:.0f} MB bf16 (generated in {gen.seconds:.1f} s)")
        drop_page_cache_hint([src])
        rows = []
        contenders = [
            ("read + write + fsync (floor)", copy_bytes, "floor"),
            ("naive load_file/filter/save_file", naive_filter, "naive"),
            ("weightsmith -> chroma, kohya", ours, "kohya"),
            ("weightsmith -> chroma, comfy", ours, "comfy"),
            ("weightsmith -> chroma, diffusers", ours, "diffusers"),
        ]
        for name, fn, tag in contenders:
            dst = str(Path(tmp) / f"out_{tag}.safetensors")
            args_ = (str(src), dst) if fn is not ours else (str(src), dst, tag)
            rows.append(measure(name, fn, *args_))
            if fn is ours:
                out_keys = read_header(dst).tensors
                kept = {k.split(".")[0] for k in out_keys} if tag == "kohya" else None
                if kept is not None:
                    want = {k.split(".")[0] for k in read_header(src).tensors if not MODULATION.search(k)}
                    assert kept == want, "kohya output must hold exactly the non-modulation modules"
            Path(dst).unlink(missing_ok=True)
        print(table(rows, "read + write + fsync (floor)"))
    kohya = next(r for r in rows if r.name == "weightsmith -> chroma, kohya")
    dropped = n_modules - len(want)
    print(f"Flux -> Chroma (kohya): {kohya.seconds:.2f} s, {dropped} modulation modules dropped "
          f"(target < {TARGET_S:.0f} s at full size)")
    if args.quick:
        return 0
    ok = kohya.seconds < TARGET_S
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
