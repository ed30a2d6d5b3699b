"""LoRA extraction and the reconstruction report, headless: exactness at full rank, rank policies on known
spectra, randomized vs exact choice, conv layouts, identical / mismatched models, files and prefixes, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from weightsmith.cli import main as cli_main
from weightsmith.errors import MismatchError
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import load_lora
from weightsmith.lora.svd import RankPolicy, clamp_factors, low_rank, use_randomized
from weightsmith.lora.validate import block_of, validate_lora
from weightsmith.safetensors_io import write_safetensors
from weightsmith.sdunet import sd_unet_state_dict
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

CFG = FluxConfig()  # hidden 64


@pytest.fixture(scope="module")
def flux_pair():
    base = flux_state_dict(CFG, "dev", seed=0)
    tuned = finetune(base, seed=1, rank=4, scale=0.05, noise=0.02)  # low rank + full-rank noise
    return base, tuned


def weight_key(module: str) -> str:
    name = module[len("diffusion_model."):]
    return name if name.endswith(".scale") else name + ".weight"


def known_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g)).Q
    return (u * s) @ v.T


def test_full_rank_fp32_reconstructs_delta(flux_pair):
    base, tuned = flux_pair
    lora, report = extract_lora(base, tuned, rank_mode="full", dtype="fp32")
    assert report.summary()["changed"] == len(base)
    for module, md in lora.modules.items():
        key = weight_key(module)
        if md.terms or md.diff is not None:
            delta = tuned[key] - base[key]
            got = md.dense_delta(tuple(delta.shape))
            assert (got - delta).norm() / delta.norm() <= 1e-5, module
            if md.terms:
                assert md.terms[0].alpha == md.terms[0].rank  # scale 1 in every loader
        if md.diff_b is not None:
            bkey = module[len("diffusion_model."):] + ".bias"
            assert torch.allclose(md.diff_b, tuned[bkey] - base[bkey], atol=0, rtol=0)
    assert report.summary()["error_global"] <= 1e-5
    assert all(m.method == "exact" for m in report.modules if m.status == "lowrank")


def test_fixed_rank_is_near_optimal_and_reports_it(flux_pair):
    base, tuned = flux_pair
    lora, report = extract_lora(base, tuned, rank=8, dtype="fp32")
    lowrank = [m for m in report.modules if m.status == "lowrank"]
    assert lowrank and all(m.rank == 8 for m in lowrank)
    for m in lowrank:
        delta = (tuned[m.key] - base[m.key]).reshape(m.shape[0], -1)
        s = torch.linalg.svdvals(delta)
        optimum = float(s[8:].norm() / s.norm())
        assert m.error <= 1.01 * optimum + 1e-7, m.key
        assert m.error == pytest.approx(float((delta - lora.modules["diffusion_model." + m.key[:-7]].dense_delta(
            tuple(delta.shape))).norm() / delta.norm()), rel=1e-5)
        assert optimum * (1 - 1e-5) <= m.optimal_error <= 1.01 * optimum  # randomized: a tight upper bound
    # 8 + 10 probes against a 64-wide matrix: randomized; against 32 columns (vector_in): exact
    for m in lowrank:
        assert m.method == ("randomized" if min(m.shape[0], m.shape[1]) >= 36 else "exact"), m.key
        assert m.optimal_exact == (m.method == "exact")
    assert report.summary()["methods"]["randomized"] == sum(m.method == "randomized" for m in lowrank) > 0


def test_method_choice_randomized_vs_exact():
    assert use_randomized(3072, 3072, 64)
    assert use_randomized(21504, 3072, 256)
    assert not use_randomized(64, 64, 32)
    assert not use_randomized(3072, 3072, 1100)
    a = known_spectrum(200, 120, torch.linspace(1, 0.01, 120))
    assert low_rank(a, RankPolicy("fixed", rank=16)).method == "randomized"
    assert low_rank(a, RankPolicy("fixed", rank=50)).method == "exact"
    assert low_rank(a, RankPolicy("fixed", rank=16), method="exact").method == "exact"


@pytest.mark.parametrize("shape", [(96, 80), (600, 400)])  # exact path / randomized (adaptive) path
def test_energy_mode_picks_the_right_rank(shape):
    m, n = shape
    s = 0.8 ** torch.arange(min(m, n), dtype=torch.float32)  # geometric spectrum, known exactly
    delta = known_spectrum(m, n, s)
    energy = 0.999
    cum = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    expected = int(torch.nonzero(cum >= energy)[0]) + 1
    base = {"blocks.0.proj.weight": torch.randn(m, n)}
    tuned = {"blocks.0.proj.weight": base["blocks.0.proj.weight"] + delta}
    lora, report = extract_lora(base, tuned, rank_mode="energy", energy=energy, dtype="fp32")
    (mod,) = report.modules
    assert mod.rank == expected
    assert mod.energy >= energy
    assert mod.method == ("exact" if m < 200 else "randomized")
    # the error mode is the energy mode with energy = 1 - error²
    _, rep_err = extract_lora(base, tuned, rank_mode="error", error=math.sqrt(1 - energy), dtype="fp32")
    assert rep_err.modules[0].rank == expected
    assert rep_err.modules[0].error <= math.sqrt(1 - energy) * 1.001
    # the cap wins over the target, and says so
    _, capped = extract_lora(base, tuned, rank_mode="energy", energy=energy, max_rank=5, dtype="fp32")
    assert capped.modules[0].rank == 5 and "not reached" in capped.modules[0].note


def test_true_low_rank_delta_is_stored_at_its_rank():
    a = known_spectrum(128, 96, torch.tensor([3.0, 2.0, 1.0]))
    base = {"lin.weight": torch.zeros(128, 96)}
    lora, report = extract_lora(base, {"lin.weight": a}, rank=32, dtype="fp32")
    assert report.modules[0].rank == 3  # numerically-zero directions are not stored
    assert report.modules[0].error < 1e-5


def test_conv_layers_kohya_layout_and_conv_rank():
    base = sd_unet_state_dict("sd15", "tiny", seed=0)
    small = {k: v for k, v in base.items() if v.ndim >= 2 and v.shape[0] <= 320}  # the first level: fast
    keys = [k for k, v in small.items() if v.ndim == 4][:6] + [k for k, v in small.items() if v.ndim == 2][:3]
    base = {k: base[k] for k in keys}
    tuned = finetune(base, seed=3, rank=2, scale=0.1, noise=0.01)
    convs = [k for k in keys if base[k].ndim == 4 and base[k].shape[2:] != (1, 1)]
    assert convs, "the tiny UNet has 3x3 convolutions"
    lora, report = extract_lora(base, tuned, rank=6, conv_rank=4, dtype="fp32")
    for k in keys:
        md = lora.modules["diffusion_model." + k[:-7]]
        (term,) = md.terms
        shape = base[k].shape
        if len(shape) == 4:
            assert term.up.shape[1:] == (term.rank, 1, 1) and term.down.shape[1:] == shape[1:]
            assert term.rank == (4 if shape[2:] != (1, 1) else min(6, *term.down.shape[1:2]))
        else:
            assert term.rank == 6
        delta = tuned[k] - base[k]
        mod = next(m for m in report.modules if m.key == k)
        got = md.dense_delta(tuple(shape))
        assert float((got - delta).norm() / delta.norm()) == pytest.approx(mod.error, rel=1e-4)
    # full rank reproduces convolutions exactly; conv_rank 0 leaves them out, counted
    full, rep_full = extract_lora(base, tuned, rank_mode="full", dtype="fp32")
    for k in convs:
        delta = tuned[k] - base[k]
        got = full.modules["diffusion_model." + k[:-7]].dense_delta(tuple(delta.shape))
        assert (got - delta).norm() / delta.norm() <= 1e-5
    _, rep0 = extract_lora(base, tuned, rank=6, conv_rank=0)
    assert rep0.summary()["dropped"] == len(convs)


def test_identical_models_give_an_empty_lora_with_a_message(flux_pair, tmp_path, capsys):
    base, _ = flux_pair
    lora, report = extract_lora(base, dict(base))
    assert lora.modules == {}
    assert "identical" in report.message and report.unchanged == len(base)
    a = tmp_path / "a.safetensors"
    write_safetensors(a, base)
    out = tmp_path / "out.safetensors"
    assert cli_main(["extract", str(a), str(a), "-o", str(out)]) == 1
    assert "identical" in capsys.readouterr().out and not out.exists()


def test_mismatched_architectures_and_shapes_are_clear_errors(flux_pair):
    base, _ = flux_pair
    schnell = flux_state_dict(CFG, "schnell", seed=0)
    with pytest.raises(MismatchError, match="guidance_in") as e:
        extract_lora(base, schnell)
    assert "flux-dev" in str(e.value) and "flux-schnell" in str(e.value)
    wider = flux_state_dict(FluxConfig(hidden=128), "dev", seed=0)
    with pytest.raises(MismatchError, match=r"shape \[64, 64\]"):
        extract_lora(base, wider)


def test_prefixes_files_and_min_delta(flux_pair, tmp_path):
    base, tuned = flux_pair
    tuned = dict(tuned)
    key = "double_blocks.0.img_attn.proj.weight"
    tuned[key] = base[key].clone()
    tuned[key][0, 0] += 2e-6  # |dW|/|W| ~ 3e-7: below min_delta
    tuned["img_in.weight"] = base["img_in.weight"].clone()  # untouched
    a, b = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    write_safetensors(a, {"model.diffusion_model." + k: v for k, v in base.items()})  # checkpoint-style prefix
    write_safetensors(b, tuned)  # bare diffusion model
    lora, report = extract_lora(a, b, rank=4, min_delta=1e-6)
    s = report.summary()
    assert s["skipped"] == 1 and s["unchanged"] == 1
    assert next(m for m in report.modules if m.key == key).status == "skipped"
    assert not lora.modules["diffusion_model.double_blocks.0.img_attn.proj"].terms  # only its bias changed
    assert not lora.modules["diffusion_model.img_in"].terms
    assert lora.arch == "flux"


def test_clamp_quantile_uses_kthvalue_bounds():
    up, down = torch.randn(300, 8), torch.randn(8, 200)
    cu, cd = clamp_factors(up, down, 0.9)
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    hi = values.sort().values[math.ceil(0.9 * values.numel()) - 1]
    assert cu.abs().max() <= hi and cd.abs().max() <= hi
    assert (cu == up.clamp(-hi, hi)).all()


def test_clamp_adds_error(flux_pair):
    base, tuned = flux_pair
    _, plain = extract_lora(base, tuned, rank=8, dtype="fp32")
    _, clamped = extract_lora(base, tuned, rank=8, dtype="fp32", clamp_quantile=0.9)
    assert clamped.summary()["error_global"] > plain.summary()["error_global"]


def test_report_json_table_chart(flux_pair):
    base, tuned = flux_pair
    _, report = extract_lora(base, tuned, rank=8)
    d = report.to_dict()
    json.dumps(d)
    assert {b["block"] for b in d["blocks"]} >= {"double_blocks.0", "single_blocks.0", "img_in", "final_layer"}
    assert d["summary"]["covered"] == d["summary"]["changed"] == len(base)
    assert "per block" in report.text() and "double_blocks.0" in report.text()
    img = report.chart()
    assert img.shape == (420, 900, 3) and img.dtype.name == "uint8" and img.std() > 0
    assert block_of("single_blocks.12.linear1.weight") == "single_blocks.12"
    assert block_of("img_in.weight") == "img_in"


def test_validate_agrees_with_extraction_through_files(flux_pair, tmp_path):
    from weightsmith.lora.extract import leave_out
    from weightsmith.lora.formats import save_lora, unwritable_modules

    base, tuned = flux_pair
    for fmt in ("comfy", "kohya"):
        lora, report = extract_lora(base, tuned, rank=8)
        unnamed = sorted(unwritable_modules(lora, fmt))
        # kohya has no key for Flux's q/k norm gains; comfy names everything
        assert unnamed == ([] if fmt == "comfy" else sorted(n for n in lora.modules if n.endswith(".scale")))
        leave_out(lora, report, unnamed, f"{fmt} cannot name it")  # the explicit, listed drop
        path = tmp_path / f"lora_{fmt}.safetensors"
        save_lora(lora, path, fmt=fmt)
        assert load_lora(path).arch == "flux"
        v = validate_lora(base, tuned, path)
        assert not v.orphans
        by_key = {m.key: m for m in v.modules}
        for m in report.modules:
            assert by_key[m.key].status == ("missing" if m.status == "dropped" else m.status), (fmt, m.key)
            assert by_key[m.key].error == pytest.approx(m.error, rel=1e-4, abs=1e-6), (fmt, m.key)
            assert by_key[m.key].rank == m.rank
        assert v.summary()["error_global"] == pytest.approx(report.summary()["error_global"], rel=1e-4)
        assert v.summary()["missing"] == len(unnamed)


def test_validate_counts_missing_and_orphan_modules(flux_pair):
    base, tuned = flux_pair
    lora, _ = extract_lora(base, tuned, rank=8, store_diff=False)
    lora.module("diffusion_model.not_a_layer").terms.append(lora.modules["diffusion_model.img_in"].terms[0])
    v = validate_lora(base, tuned, lora)
    s = v.summary()
    assert s["missing"] == s["changed"] - s["covered"] > 0  # biases and norms were left out
    assert all(m.error == 1.0 for m in v.modules if m.status == "missing")
    assert v.orphans == ["diffusion_model.not_a_layer"]


def test_cli_extract_and_validate(flux_pair, tmp_path, capsys):
    base, tuned = flux_pair
    a, b = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    write_safetensors(a, base)
    write_safetensors(b, tuned)
    out, rep, png = tmp_path / "lora.safetensors", tmp_path / "r.json", tmp_path / "c.png"
    rc = cli_main(["extract", str(a), str(b), "-o", str(out), "--rank", "8", "--format", "kohya", "--no-diff",
                   "--report", str(rep), "--chart", str(png)])
    assert rc == 0 and out.exists() and png.stat().st_size > 0
    data = json.loads(rep.read_text())
    assert data["summary"]["lowrank"] > 0 and data["settings"]["rank"] == 8
    text = capsys.readouterr().out
    assert "per block" in text and "wrote" in text
    assert cli_main(["extract", str(a), str(b), "-o", str(out)]) == 2  # never overwrites
    rep2 = tmp_path / "v.json"
    assert cli_main(["validate", str(a), str(b), str(out), "--report", str(rep2)]) == 0
    v = json.loads(rep2.read_text())
    assert v["summary"]["error_global"] == pytest.approx(data["summary"]["error_global"], rel=1e-4)


def test_reported_optimum_is_a_true_bound_on_large_bf16_deltas():
    """‖ΔW‖² − Σσ̃² cancels badly when the residual is a few percent: with fp32 norms drifting by 1e-4
    the 'optimum' fell below the real one. A rank-16 change over a bf16 rounding floor, 1M elements."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 512, generator=g) / 512**0.5
    tuned = finetune({"x.weight": w}, seed=3, rank=16, scale=0.05, noise=0.0025)["x.weight"].to(torch.bfloat16)
    base = w.to(torch.bfloat16)
    _, report = extract_lora({"x.weight": base}, {"x.weight": tuned}, rank=32, dtype="fp32")
    (m,) = report.modules
    delta = tuned.double() - base.double()
    s = torch.linalg.svdvals(delta)
    optimum = float(s[32:].norm() / s.norm())
    assert m.method == "randomized"
    assert optimum * (1 - 1e-6) <= m.optimal_error <= m.error * (1 + 1e-4)  # fp32 σ̃: ~1e-5 slack
    assert m.error <= 1.01 * optimum
    assert m.norm == pytest.approx(float(delta.norm()), rel=1e-6)


def test_cli_diffusers_format_refuses_unnameable_bias_changes_until_told(flux_pair, tmp_path, capsys):
    """diffusers splits q/k/v (qkv, linear1) and swaps the adaLN halves: a bias change there has no name. The
    extraction is refused naming them, nothing written; `--no-diff` (the user's explicit choice) writes."""
    base, tuned = flux_pair
    a, b = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    write_safetensors(a, base)
    write_safetensors(b, tuned)
    out, rep = tmp_path / "lora.safetensors", tmp_path / "r.json"
    assert cli_main(["extract", str(a), str(b), "-o", str(out), "--rank", "8", "--format", "diffusers",
                     "--report", str(rep)]) == 2
    err = capsys.readouterr().err
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
                   "final_layer.adaLN_modulation.1"):
        assert f"diffusion_model.{module} (a bias change" in err
    assert "--no-diff" in err and "comfy" in err
    assert not out.exists() and not rep.exists()
    assert cli_main(["extract", str(a), str(b), "-o", str(out), "--rank", "8", "--format", "diffusers", "--no-diff",
                     "--report", str(rep)]) == 0
    extracted = json.loads(rep.read_text())
    v = validate_lora(a, b, out)
    by_key = {m.key: m for m in v.modules}
    for m in extracted["modules"]:
        if m["status"] == "lowrank":
            assert by_key[m["key"]].error == pytest.approx(m["error"], rel=1e-4, abs=1e-6), m["key"]
