"""`weightsmith compose` / `rerank` on files: any input format in, comfy / kohya / diffusers out, the
result exact (or optimally re-compressed), and the written files applied in the real ComfyUI equal the
input files applied one after another through ComfyUI's own LoRA loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weightsmith.cli import main
from weightsmith.lora.formats import load_lora, save_lora
from weightsmith.lora.testloras import flux_attn_mlp, random_lora
from weightsmith.testmodels import FluxConfig, flux_shapes, flux_state_dict

CFG = FluxConfig()
SHAPES = flux_shapes(CFG, "dev")


def weight_shape(module: str) -> tuple[int, ...]:
    key = module.removeprefix("diffusion_model.")
    return SHAPES[key if key.endswith(".scale") else key + ".weight"]


def dense(lora, module):
    m = lora.modules.get(module)
    return m.dense_delta(weight_shape(module)) if m is not None else torch.zeros(weight_shape(module))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compose")
    a = random_lora(SHAPES, "flux", rank=4, seed=1, alpha=2.0)  # every linear, incl. modulation
    b = random_lora(SHAPES, "flux", rank=3, seed=2, targets=flux_attn_mlp, alpha=3.0)
    paths = {"a": d / "a_kohya.safetensors", "b": d / "b_diffusers.safetensors", "chroma": d / "c.safetensors"}
    save_lora(a, paths["a"], fmt="kohya", dtype=torch.float32)
    save_lora(b, paths["b"], fmt="diffusers", dtype=torch.float32)  # split to_q/to_k/to_v, proj_mlp
    c = random_lora(flux_shapes(CFG, "chroma"), "chroma", rank=2, seed=3, targets=flux_attn_mlp)
    save_lora(c, paths["chroma"], fmt="comfy", dtype=torch.float32)
    return d, paths


@pytest.mark.parametrize("fmt", ["comfy", "kohya", "diffusers"])
def test_cli_compose_exact_in_every_format(files, fmt, capsys):
    d, p = files
    out = d / f"out_{fmt}.safetensors"
    assert main(["compose", f"{p['a']}:0.8", f"{p['b']}:-0.6", "-o", str(out), "--format", fmt]) == 0
    assert "compose (exact)" in capsys.readouterr().out
    got, a, b = load_lora(out), load_lora(p["a"]), load_lora(p["b"])
    assert got.arch == "flux" and not got.unknown_keys
    assert set(got.modules) == set(a.modules) | set(b.modules)
    for name in got.modules:
        want = 0.8 * dense(a, name) - 0.6 * dense(b, name)
        assert torch.allclose(dense(got, name), want, atol=1e-7, rtol=1e-5), name
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["weightsmith.compose"])["inputs"][1]["strength"] == -0.6
    with safe_open(str(out), "pt") as f:  # --dtype auto: the inputs' dtype (fp32 here)
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


def test_nunchaku_spelling_and_bf16_output(files):
    d, p = files
    one, two = d / "one.safetensors", d / "two.safetensors"
    assert main(["compose", f"{p['a']}:0.5", f"{p['b']}:1.5", "-o", str(one), "--dtype", "bf16"]) == 0
    assert main(["compose", "-i", str(p["a"]), str(p["b"]), "-s", "0.5", "1.5", "-o", str(two), "--dtype", "bf16"]) == 0
    x, y = load_file(one), load_file(two)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert any(v.dtype == torch.bfloat16 for v in x.values())


def test_bf16_files_compose_to_bf16_with_the_largest_input_copied_bit_for_bit(tmp_path):
    """--dtype auto on bf16 inputs writes bf16, built as bf16: the input with the largest coefficient is
    copied byte for byte, the other's smaller factor is rounded once, and the result is exact to that."""
    paths = [tmp_path / "x.safetensors", tmp_path / "y.safetensors"]
    for i, path in enumerate(paths):
        save_lora(random_lora(SHAPES, "flux", rank=4, seed=40 + i, targets=flux_attn_mlp, alpha=4.0), path,
                  fmt="kohya", dtype=torch.bfloat16)
    out = tmp_path / "out.safetensors"
    assert main(["compose", f"{paths[0]}:1.0", f"{paths[1]}:0.3", "-o", str(out)]) == 0
    got, x, y = load_lora(out), load_lora(paths[0]), load_lora(paths[1])
    assert {t.up.dtype for m in got.modules.values() for t in m.terms} == {torch.bfloat16}
    for name, m in got.modules.items():
        t, tx = m.terms[0], x.modules[name].terms[0]
        assert torch.equal(t.up[:, :4], tx.up) and torch.equal(t.down[:4], tx.down), name
        want = dense(x, name).double() + 0.3 * dense(y, name).double()
        err = float((dense(got, name).double() - want).norm() / want.norm())
        assert err < 3e-3, name  # bf16 rounding of 0.3 · the smaller factor of y only


def test_cli_rerank_and_compose_with_rank(files, tmp_path):
    d, p = files
    exact = tmp_path / "exact.safetensors"
    assert main(["compose", f"{p['a']}:1", f"{p['b']}:1", "-o", str(exact)]) == 0
    small, report = tmp_path / "r2.safetensors", tmp_path / "r2.json"
    assert main(["rerank", str(exact), "-o", str(small), "--rank", "2", "--report", str(report)]) == 0
    lo = load_lora(small)
    assert max(m.rank for m in lo.modules.values()) == 2
    data = json.loads(report.read_text())
    assert data["mode"] == "rank 2" and 0 < data["total_rel_error"] < 1
    direct = tmp_path / "direct.safetensors"
    assert main(["compose", f"{p['a']}:1", f"{p['b']}:1", "-o", str(direct), "--rank", "2"]) == 0
    ref = load_lora(exact)
    got = load_lora(direct)
    for name in ref.modules:
        err = float((dense(got, name) - dense(ref, name)).norm() / dense(ref, name).norm())
        row = next(r for r in data["per_module"] if r["module"] == name)
        assert err == pytest.approx(row["rel_error"], rel=1e-3, abs=1e-6), name


def test_cli_errors_are_clear(files, tmp_path, capsys):
    d, p = files
    out = tmp_path / "x.safetensors"
    assert main(["compose", "-i", str(p["a"]), str(p["b"]), "-s", "0.5", "-o", str(out)]) == 2
    assert "one per LoRA" in capsys.readouterr().err
    assert main(["compose", str(p["a"]), str(p["chroma"]), "-o", str(out)]) == 2
    assert "Flux→Chroma" in capsys.readouterr().err
    assert main(["compose", str(p["a"]), "-o", str(p["a"])]) == 2  # never overwrite an input
    assert main(["rerank", str(p["a"]), "-o", str(out)]) == 2
    assert not out.exists()
    assert main(["compose", str(p["a"]), str(p["chroma"]), "-o", str(out), "--target-arch", "chroma"]) == 0
    assert load_lora(out).arch == "chroma"


def test_report_path_is_checked_first_and_fp16_overflow_is_refused(files, tmp_path, capsys):
    """--report naming an input or an existing file fails before any work (exit 2, nothing written); a
    strength whose re-compressed factors do not fit fp16 is refused naming the input, never written as inf."""
    d, p = files
    out = tmp_path / "x.safetensors"
    (tmp_path / "old.json").write_text("{}")
    for argv in (["compose", str(p["a"]), "-o", str(out), "--report", str(p["a"])],
                 ["rerank", str(p["a"]), "--rank", "2", "-o", str(out), "--report", str(tmp_path / "old.json")],
                 ["compose", str(p["a"]), "-o", str(out), "--report", str(out)]):
        assert main(argv) == 2
        assert "choose" in capsys.readouterr().err
        assert sorted(x.name for x in tmp_path.iterdir()) == ["old.json"]
    assert main(["compose", f"{p['a']}:1e14", "--rank", "2", "--dtype", "fp16", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert p["a"].name in err and "fp16" in err and "--dtype fp32" in err and not out.exists()
    assert main(["compose", f"{p['a']}:1e14", "--rank", "2", "--dtype", "fp32", "-o", str(out)]) == 0
    assert all(bool(t.isfinite().all()) for t in load_file(out).values())


@pytest.mark.comfy
@pytest.mark.parametrize("fmt", ["comfy", "kohya", "diffusers"])
def test_composed_file_in_comfy_equals_chained_loaders(files, fmt):
    from comfy_support import apply_lora, effective_weights, flux_patcher

    d, p = files
    out = d / f"chain_{fmt}.safetensors"
    if not out.exists():
        assert main(["compose", f"{p['a']}:0.7", f"{p['b']}:-1.2", "-o", str(out), "--format", fmt]) == 0
    base = flux_state_dict(CFG, "dev", seed=0)
    patcher = flux_patcher(base)
    chained = patcher
    for path, s in ((p["a"], 0.7), (p["b"], -1.2)):
        chained, missing, refused = apply_lora(chained, load_file(path), s)
        assert not missing and not refused
    composed, missing, refused = apply_lora(patcher, load_file(out), 1.0)
    assert not missing and not refused
    wa, wb = effective_weights(chained), effective_weights(composed)
    for k in wa:
        assert torch.allclose(wa[k].detach(), wb[k].detach(), atol=2e-6, rtol=1e-5), k
    assert sum(not torch.equal(wb[k].detach(), base[k]) for k in wb) > 0


@pytest.mark.comfy
@pytest.mark.parametrize("kind,fmt", [("sd15", "kohya"), ("sdxl", "kohya"), ("sdxl", "diffusers")])
def test_sd_unet_composed_file_in_comfy_equals_chained_loaders(tmp_path, kind, fmt):
    from comfy_support import apply_lora, effective_weights, unet_patcher

    from weightsmith.sdunet import sd_unet_shapes, sd_unet_state_dict

    shapes = sd_unet_shapes(kind, "tiny")
    paths = []
    for i, (rank, alpha, src_fmt) in enumerate(((4, 2.0, "kohya"), (2, None, "comfy"))):
        path = tmp_path / f"in{i}.safetensors"
        save_lora(random_lora(shapes, kind, rank=rank, seed=30 + i, alpha=alpha), path, fmt=src_fmt, dtype=torch.float32)
        paths.append(path)
    out = tmp_path / "out.safetensors"
    assert main(["compose", f"{paths[0]}:0.9", f"{paths[1]}:-0.4", "-o", str(out), "--format", fmt]) == 0
    base = sd_unet_state_dict(kind, "tiny", seed=0)
    patcher = unet_patcher(base, kind)
    chained = patcher
    for path, s in zip(paths, (0.9, -0.4)):
        chained, missing, refused = apply_lora(chained, load_file(path), s)
        assert not missing and not refused
    composed, missing, refused = apply_lora(patcher, load_file(out), 1.0)
    assert not missing and not refused
    wa, wb = effective_weights(chained), effective_weights(composed)
    convs = 0
    for k in wa:
        assert torch.allclose(wa[k].detach(), wb[k].detach(), atol=2e-6, rtol=1e-5), k
        convs += base[k].ndim == 4 and not torch.equal(wb[k].detach(), base[k])
    assert convs > 0  # 3x3 / 1x1 conv layers composed too
