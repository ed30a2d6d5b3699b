"""Encoded outputs in the real consumer: merged (and mixed) scaled-fp8 and mixed-precision files load through
ComfyUI 0.3.75's own `comfy.sd.load_diffusion_model` (the UNETLoader path), and the weights ComfyUI
dequantizes from them are exactly the ones our files decode to."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from quant_support import DecodedSource, dequantized, write_mixed, write_scaled_fp8

from weightsmith.merge import execute_merge, plan_merge
from weightsmith.mix import lossless_mix
from weightsmith.safetensors_io import StreamingWriter
from weightsmith.sdunet import sd_unet_state_dict
from weightsmith.testmodels import FluxConfig, flux_shapes

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parents[1]


def comfy_weights(path: Path, keys, **options) -> tuple[object, dict[str, torch.Tensor]]:
    """(model config, every parameter of our file as ComfyUI holds it, dequantized its way: the legacy
    op's convert_weight (weight * scale_weight), or QuantizedTensor.dequantize for mixed precision)."""
    import comfy.sd
    from comfy.quant_ops import QuantizedTensor

    patcher = comfy.sd.load_diffusion_model(str(path), model_options=options)
    model = patcher.model
    mods = dict(model.diffusion_model.named_modules())
    out = {}
    for k in keys:
        mod, name = k.rsplit(".", 1)
        m = mods[mod]
        p = getattr(m, name).detach()
        if isinstance(p, QuantizedTensor):
            p = p.dequantize()
        elif name == "weight" and p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and hasattr(m, "scale_weight"):
            p = m.convert_weight(p, inplace=False)
        out[k] = p.float()
    return model.model_config, out


def assert_comfy_equals_ours(path: Path, fp8: torch.dtype, legacy: bool, **options):
    ours = dequantized(path)
    config, theirs = comfy_weights(path, ours, **options)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_tensor(k).dtype for k in ours}
    if legacy:
        assert config.scaled_fp8 == fp8
    else:
        assert config.layer_quant_config
    for k, w in ours.items():
        if legacy and k.endswith(".bias") and theirs[k].numel() and k[:-5] + ".scale_weight" in _keys(path):
            # ComfyUI 0.3.75 builds a scaled-fp8 Linear's bias in the fp8 dtype too: it rounds the file's bf16
            # bias (its own scaled files load the same way)
            assert torch.equal(theirs[k], w.to(fp8).float()), k
            continue
        assert torch.equal(theirs[k], w), f"{k} ({stored[k]}): max diff {float((theirs[k] - w).abs().max()):g}"
    return config


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def sd15_pair():
    return sd_unet_state_dict("sd15", "tiny", seed=0), sd_unet_state_dict("sd15", "tiny", seed=1)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_scaled_fp8_merge_and_mix_load_in_comfyui(comfy, sd15_pair, tmp_path, fp8):
    a, b = sd15_pair
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_scaled_fp8(pa, a, fp8=fp8)
    write_scaled_fp8(pb, b, fp8=fp8)
    sa, sb = DecodedSource(pa), DecodedSource(pb)
    out = tmp_path / "merged.safetensors"
    execute_merge(plan_merge([sa, sb], "weighted_sum", [0.6, 0.4]), out, "keep")
    config = assert_comfy_equals_ours(out, fp8, legacy=True)
    assert type(config).__name__ == "SD15"
    mixed = tmp_path / "mixed.safetensors"
    pc = tmp_path / "c.safetensors"
    write_scaled_fp8(pc, sd_unet_state_dict("sd15", "tiny", seed=2), fp8=fp8)
    lossless_mix(sa, sb, DecodedSource(pc), out=mixed)
    assert_comfy_equals_ours(mixed, fp8, legacy=True)


def test_mixed_precision_merge_loads_in_comfyui(comfy, sd15_pair, tmp_path):
    a, b = sd15_pair
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_mixed(pa, a, input_scale=0.5)
    write_mixed(pb, b)
    out = tmp_path / "merged.safetensors"
    execute_merge(plan_merge([DecodedSource(pa), DecodedSource(pb)], "weighted_sum", [0.5, 0.5]), out, None)
    config = assert_comfy_equals_ours(out, torch.float8_e4m3fn, legacy=False)
    assert len(config.layer_quant_config) == sum(k.endswith(".weight") and t.ndim == 2 for k, t in a.items())


@pytest.mark.parametrize("choice,fp8", [("fp8_scaled", torch.float8_e4m3fn), ("fp8_scaled_e5m2", torch.float8_e5m2)])
def test_cli_fp8_scaled_from_bf16_inputs_loads_in_comfyui(comfy, sd15_pair, tmp_path, choice, fp8):
    a, b = sd15_pair
    paths = []
    for name, sd in (("a", a), ("b", b)):
        p = tmp_path / f"{name}.safetensors"
        with StreamingWriter(p, {k: (tuple(t.shape), torch.bfloat16) for k, t in sd.items()}) as w:
            for k, t in sd.items():
                w.write(k, t.to(torch.bfloat16))
        paths.append(p)
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-m", "weightsmith", "merge", *map(str, paths), "-o", str(out), "--dtype", choice],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"fp8_scaled ({'fp8_e4m3fn' if fp8 == torch.float8_e4m3fn else 'fp8_e5m2'})" in r.stdout
    assert_comfy_equals_ours(out, fp8, legacy=True)


@contextlib.contextmanager
def _scratch(tmp_path, need_bytes: int):
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * need_bytes:
        with tempfile.TemporaryDirectory(dir=shm, prefix="ws-quant-test-") as d:
            yield Path(d)
    else:
        yield tmp_path


def _flux_scaled_file(path: Path, seed: int) -> None:
    """Flux at ComfyUI's detection width (3072, 1 double block) as ComfyUI scaled fp8, written fast: each
    payload tiles one random block of fp8 codes (holding ±448, as ComfyUI's quantizer leaves them),
    shifted per key and seed, with its own scale."""
    cfg = FluxConfig(hidden=3072, depth=1, depth_single=0, num_heads=24, context_in=4096, vec_in=768)
    shapes = flux_shapes(cfg, "dev")
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(1 << 16, generator=gen) * 100).clamp(-448, 448)
    base[:2] = torch.tensor([448.0, -448.0])
    codes = base.to(torch.float8_e4m3fn).view(torch.uint8)
    plan = {"scaled_fp8": ((2,), torch.float8_e4m3fn)}
    for k, s in shapes.items():
        quant = k.endswith(".weight") and len(s) == 2
        plan[k] = (s, torch.float8_e4m3fn if quant else torch.bfloat16)
        if quant:
            plan[k[:-7] + ".scale_weight"] = ((), torch.float32)
    with StreamingWriter(path, plan) as w:
        w.write("scaled_fp8", torch.zeros(2, dtype=torch.float8_e4m3fn))
        for i, (k, s) in enumerate(shapes.items()):
            n = torch.Size(s).numel()
            tiled = codes.roll(7 * i + seed).repeat(n // codes.numel() + 1)[:n]
            if k.endswith(".weight") and len(s) == 2:
                w.write(k, tiled.view(torch.float8_e4m3fn).reshape(s))
                w.write(k[:-7] + ".scale_weight", torch.tensor(1e-4 * (1 + i % 7 + seed), dtype=torch.float32))
            else:
                w.write(k, (tiled.view(torch.float8_e4m3fn).float() / 448).to(torch.bfloat16).reshape(s))


def test_flux_scaled_fp8_merge_at_full_width_loads_in_comfyui(comfy, tmp_path):
    import comfy.model_management as mm
    import comfy.supported_models as sm

    with _scratch(tmp_path, 1 << 30) as d:
        pa, pb, out = d / "a.safetensors", d / "b.safetensors", d / "o.safetensors"
        _flux_scaled_file(pa, 0)
        _flux_scaled_file(pb, 1)
        sa, sb = DecodedSource(pa), DecodedSource(pb)
        rep = execute_merge(plan_merge([sa, sb], "weighted_sum", [0.5, 0.5]), out, "keep")
        assert rep.encodings["fp8_scaled (fp8_e4m3fn)"] == sum(sa.encoding(k) is not None for k in sa.keys())
        config = assert_comfy_equals_ours(out, torch.float8_e4m3fn, legacy=True)
        assert type(config) is sm.Flux
        mm.unload_all_models()
        mm.soft_empty_cache()


@pytest.fixture
def model_dirs(tmp_path, monkeypatch, comfy):
    import folder_paths
    from safetensors.torch import save_file

    from weightsmith.testmodels import flux_state_dict

    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for i, name in enumerate("abc"):
        sd = flux_state_dict(FluxConfig(), "dev", seed=20 + i)
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(dm / f"{name}.safetensors"))
    return dm


def _same_file(p: str, q: Path) -> None:
    from safetensors import safe_open

    with safe_open(p, "pt") as f, safe_open(str(q), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            x, y = f.get_tensor(k), g.get_tensor(k)
            assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k


def test_file_nodes_write_the_fp8_scaled_choices(model_dirs, tmp_path):
    """The output-dtype widgets of Merge Model Files and Lossless Mix Files offer the encodings and write
    what the core writes for them."""
    from comfy_support import import_pack

    nodes = import_pack().NODE_CLASS_MAPPINGS
    merge_node, mix_node = nodes["WeightsmithMergeFiles"], nodes["WeightsmithLosslessMixFiles"]
    assert "fp8_scaled" in merge_node.INPUT_TYPES()["required"]["dtype"][0]
    assert "fp8_scaled_e5m2" in mix_node.INPUT_TYPES()["optional"]["dtype"][0]
    files = [f"diffusion_models/{n}.safetensors" for n in "abc"]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        merged = merge_node().merge(files[0], files[1], "weighted_sum", "0.5,0.5", "", "", "none", "take", "copy",
                                    "fp8_scaled_e5m2", False, "diffusion_models", "q/merged")["result"][0]
        mixed = mix_node().mix(*files, 1.0, 1.0, "min_diff (nearest)", True, False, False, False,
                               "diffusion_models", "q/mixed", dtype="fp8_scaled")["result"][0]
    want_merge, want_mix = tmp_path / "wm.safetensors", tmp_path / "wx.safetensors"
    paths = [model_dirs / f"{n}.safetensors" for n in "abc"]
    execute_merge(plan_merge(paths[:2], "weighted_sum", [0.5, 0.5]), want_merge, "fp8_scaled_e5m2")
    lossless_mix(*paths, out=want_mix, out_dtype="fp8_scaled")
    _same_file(merged, want_merge)
    _same_file(mixed, want_mix)


@pytest.mark.parametrize("kind", ["legacy", "mixed"])
def test_cli_keep_of_quantized_files_loads_in_comfyui(comfy, sd15_pair, tmp_path, kind):
    """The whole user path: `weightsmith merge a b -o out` (dtype keep) on two quantized files, read by
    the package's own decoding, writes the same encoding, which ComfyUI loads with our weights."""
    a, b = sd15_pair
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for p, sd in zip(paths, (a, b)):
        (write_scaled_fp8 if kind == "legacy" else write_mixed)(p, sd)
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-m", "weightsmith", "merge", *map(str, paths), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert ("fp8_scaled (fp8_e4m3fn)" if kind == "legacy" else "comfy_quant:float8_e4m3fn") in r.stdout
    assert_comfy_equals_ours(out, torch.float8_e4m3fn, legacy=kind == "legacy")
